"""Benchmark of training throughput: shared-prefix packing against the naive path (not a test).

For each model preset (conf/model/<name>.yaml) and length mix (prompt/reference/candidate
tokens), one model, one optimizer and one batch of synthetic triplets (random token ids,
fixed lengths, so the token bound is exact) are timed through polar.trainer.train_step
(collation, forward, backward, clipping, AdamW step), alternating the paths A B A B ...
after a warm-up step of each. Reported per path: step time, triplets/s, tokens/s (data
tokens in POLAR's two-sequence layout, what fit() counts as tokens_seen, so the two
paths' figures compare directly), and the achieved FLOP/s of the whole step as a share
of this machine's fp32 matmul peak, measured in the same run (best of timed 2048^3
torch.mm before and after each block). The speedup is the median over A B pairs of
naive time / packed time (a pair runs back to back, so drift cancels), beside the bound.

Two clocks. Wall-clock time is what a user waits for, but on a shared machine it mostly
measures the other processes (steps of one run here varied 3x). So every figure is also
given in process CPU time (getrusage, all threads), which counts only the cycles this
process ran; with --threads 1 (the default) that is the work of one core, spin-waits
aside, and the peak is then one core's peak measured the same way.

FLOPs of a step are the work its path needs: 6 x matmul parameters per processed token
(polar.model.flops_per_token's matmul term) plus 12 x layers x hidden per (query, key)
pair that the mask allows (causal and candidate-isolated: the useful attention work,
not the full-context convention of flops_per_token, and not the masked blocks a dense
SDPA mask also computes). Padding tokens count for nothing.

The bound is the token ratio naive / packed per triplet, (2(3 + 2p + r) + 2c) over
(2 + 2p + r + 2(c + 1)): 390 / 260 = 1.50x for 32/64/64, 1286 / 708 = 1.82x for 256/64/64.

Usage: .venv/bin/python bench/bench_train.py [--models 1m,5m,20m] [--mixes 32/64/64,256/64/64]
       [--batch 8] [--pairs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polar.config import ModelConfig, TrainConfig  # noqa: E402
from polar.data import TokenTriplets  # noqa: E402
from polar.model import build_model, flops_per_token, n_params  # noqa: E402
from polar.trainer import train_step  # noqa: E402

SPECIAL = {"pad": 0, "bos": 1, "sep": 2, "reward": 3}
CLOCKS = ("cpu", "wall")


ARCHITECTURE = ("name", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "rope_theta")


def load_preset(name: str) -> ModelConfig:
    """A preset's architecture alone (random weights: no checkpoint, no Hydra defaults)."""
    import yaml

    preset = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**{k: v for k, v in preset.items() if k in ARCHITECTURE})


def synthetic_batch(n: int, p: int, r: int, c: int, vocab: int, seed: int = 0) -> TokenTriplets:
    rng = np.random.default_rng(seed)

    def pieces(length):
        return [rng.integers(4, vocab, length).tolist() for _ in range(n)]

    return TokenTriplets(pieces(p), pieces(r), pieces(c), pieces(c))


def attended_pairs(prefix: int, candidates: list[int]) -> int:
    """(query, key) pairs a causal, candidate-isolated mask allows in one triplet's packed
    segment; for the naive path call it once per sequence with no candidates."""
    pairs = prefix * (prefix + 1) // 2
    return pairs + sum(m * prefix + m * (m + 1) // 2 for m in candidates)


def step_flops(cfg: ModelConfig, batch: TokenTriplets, packing: bool) -> tuple[float, int]:
    """(FLOPs, processed tokens) of one training step on `batch`."""
    matmul = flops_per_token(cfg, 0.0)
    per_pair = 12.0 * cfg.num_layers * cfg.hidden_size
    flops, tokens = 0.0, 0
    for p, r, a, b in zip(batch.prompt, batch.reference, batch.positive, batch.negative):
        prefix = 2 + 2 * len(p) + len(r)
        cands = [len(a) + 1, len(b) + 1]
        if packing:
            n, pairs = prefix + sum(cands), attended_pairs(prefix, cands)
        else:
            n, pairs = 2 * prefix + sum(cands), sum(attended_pairs(prefix + m, []) for m in cands)
        flops += matmul * n + per_pair * pairs
        tokens += n
    return flops, tokens


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> dict[str, float]:
    """Wall-clock and process CPU seconds of fn()."""
    wall, cpu = time.perf_counter(), cpu_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": cpu_time() - cpu}


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best fp32 FLOP/s of a size^3 torch.mm over `repeats` runs, per clock."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    runs = [timed(lambda: a @ b) for _ in range(repeats)]
    return {clock: 2.0 * size ** 3 / min(r[clock] for r in runs) for clock in CLOCKS}


def timed_step(model, optimizer, batch, packing: bool) -> dict[str, float]:
    cfg = TrainConfig(lr=1e-4, batch_size=len(batch), packing=packing, warmup_fraction=0.0)
    return timed(lambda: train_step(model, optimizer, batch, SPECIAL, cfg, "cpu"))


def bench_block(name: str, mix: tuple[int, int, int], n: int, pairs: int) -> dict:
    """One (model, mix): alternate naive and packed steps on the same model and batch."""
    cfg = load_preset(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = synthetic_batch(n, *mix, cfg.vocab_size)
    peaks, load = [matmul_peak()], [os.getloadavg()[0]]
    for packing in (False, True):
        timed_step(model, optimizer, batch, packing)                       # warm-up
    times = {False: [], True: []}
    for _ in range(pairs):
        for packing in (False, True):
            times[packing].append(timed_step(model, optimizer, batch, packing))
    peaks.append(matmul_peak())
    load.append(os.getloadavg()[0])
    return {"model": name, "n_params": n_params(cfg), "mix": mix, "batch": n, "times": times, "load": load,
            "peak": {clock: max(p[clock] for p in peaks) for clock in CLOCKS},
            "flops": {k: step_flops(cfg, batch, k)[0] for k in (False, True)},
            "data_tokens": int(batch.naive_tokens().sum()),
            "bound": float(batch.naive_tokens().sum() / batch.packed_tokens().sum())}


def report(block: dict, clock: str) -> list[str]:
    """Markdown rows for one clock: per path the median step (and all steps), rates at
    the median, and the speedup as the median of the per-pair ratios beside the bound."""
    times = {k: [t[clock] for t in v] for k, v in block["times"].items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
    bound, peak = block["bound"], block["peak"][clock]
    versus = f"{ratio:.2f}x of {bound:.2f}x ({100 * ratio / bound:.0f}%)"
    p, r, c = block["mix"]
    rows = []
    for packing in (False, True):
        flops = block["flops"][packing] / med[packing]
        rows.append(
            f"| {block['model']} ({block['n_params'] / 1e6:.1f}M) | {p}/{r}/{c} | {clock} "
            f"| {'packed' if packing else 'naive'} "
            f"| {med[packing]:.2f} s ({' / '.join(f'{t:.2f}' for t in times[packing])}) "
            f"| {block['batch'] / med[packing]:.2f} | {block['data_tokens'] / med[packing]:,.0f} "
            f"| {flops / 1e9:.1f} | {100 * flops / peak:.0f}% of {peak / 1e9:.0f} | {versus if packing else ''} |")
    return rows


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="1m,5m,20m")
    parser.add_argument("--mixes", default="32/64/64,256/64/64", help="prompt/reference/candidate tokens")
    parser.add_argument("--batch", type=int, default=8, help="triplets per step")
    parser.add_argument("--pairs", type=int, default=3, help="timed A B pairs after the warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = one core's work)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mixes = [tuple(int(x) for x in m.split("/")) for m in args.mixes.split(",")]
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}; batch {args.batch} triplets")
    print("| model | p/r/c | clock | path | step: median (all) | triplets/s | tokens/s | GFLOP/s "
          "| of peak (GFLOP/s) | speedup vs bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for mix in mixes:
            block = bench_block(name, mix, args.batch, args.pairs)
            for clock in CLOCKS:
                print("\n".join(report(block, clock)))
            print(f"|  |  | load | {block['load'][0]:.1f} -> {block['load'][1]:.1f} |  |  |  |  |  |  |", flush=True)


if __name__ == "__main__":
    main()
