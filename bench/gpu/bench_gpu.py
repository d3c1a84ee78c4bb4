"""GPU benchmark: a few bf16 training steps of a large preset, packed (FlexAttention) vs naive.

Not a test. Builds the preset (default 1.8b: InternLM2.5's shape, hidden 2048, 24 layers,
16 heads, 8 KV heads, FFN 8192, vocab 92544) with random weights on one GPU, makes one
batch of synthetic triplets (random ids; lengths around prompt/reference/candidate
with +-jitter, so the naive path pads as it would on real data), and times
polar.trainer.train_step (bf16 autocast, fp32 weights and AdamW, clipping,
accumulation over micro-batches) on the same model and batch:

- packed: model.set_attn_implementation("flex_attention"), shared-prefix rows of up to
  polar.packing.FLEX_ROW tokens, a BlockMask built from the rows' document and
  candidate ids (masked blocks skipped, the mask never materialised);
- naive: "sdpa" on the (2B, T) right-padded batch.

After timing, if time is left, it checks on one micro-batch in fp32 that both paths
give the same rewards. Prints, per path: step time, triplets/s, tokens/s (data tokens in
POLAR's two-sequence layout, comparable across paths; and the tokens the path itself
processes, padding excluded), and MFU = the step's useful FLOPs
(bench/bench_train.step_flops: 6 x matmul params per processed token plus
12 x layers x hidden per attended (query, key) pair) / time / peak, with the bf16 dense
peak 989 TFLOP/s for an H100 or H200 (--peak to override). A deadline (--time-limit,
default 210 s) stops between steps; bench/gpu/run.sh adds a hard limit of 240 s.
Needs no download.

With --runs, each run is path:micro-batch[:ckpt] (ckpt: activation checkpointing); after
each, the peak of torch.cuda.max_memory_allocated is printed beside sweeps.memory's
estimate for the same micro-batch (the dry run's figure, without its 2 GB overhead).

Usage: bash bench/gpu/run.sh [--preset 1.8b] [--batch 32] [--steps 4] [--runs packed:4,packed:16:ckpt,naive:4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import SPECIAL, load_preset, step_flops  # noqa: E402

from polar.config import TrainConfig  # noqa: E402
from polar.data import TokenTriplets, naive_batch  # noqa: E402
from polar.model import build_model, n_params, set_attention  # noqa: E402
from polar.packing import pack_triplets  # noqa: E402
from polar.trainer import scores, set_checkpointing, set_compiled, train_step  # noqa: E402

PEAKS = {"H100": 989e12, "H200": 989e12}     # bf16 dense, SXM


def jittered_batch(n: int, mix: tuple[int, int, int], jitter: float, vocab: int, seed: int = 0) -> TokenTriplets:
    gen = torch.Generator().manual_seed(seed)

    def piece(mean):
        low, high = max(1, int(mean * (1 - jitter))), int(mean * (1 + jitter)) + 1
        length = int(torch.randint(low, high, (1,), generator=gen))
        return torch.randint(4, vocab, (length,), generator=gen).tolist()

    p, r, c = mix
    return TokenTriplets([piece(p) for _ in range(n)], [piece(r) for _ in range(n)],
                         [piece(c) for _ in range(n)], [piece(c) for _ in range(n)])


def peak_flops(override: float | None, device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    if override:
        return name, override
    return name, next((v for k, v in PEAKS.items() if k in name), None)


def packed_attention(device: torch.device) -> str:
    """FlexAttention on CUDA; SDPA with the dense mask elsewhere (CPU smoke runs only)."""
    return "flex_attention" if device.type == "cuda" else "sdpa"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def check_equal(model, batch: TokenTriplets, device: torch.device) -> float:
    """Max |reward difference| of packed vs naive (sdpa) in fp32, no autocast."""
    set_attention(model, "sdpa")
    naive = torch.cat(scores(model, naive_batch(batch, SPECIAL), device))
    set_attention(model, packed_attention(device))
    packed = torch.cat(scores(model, pack_triplets(batch, SPECIAL, max_len=8192), device))
    return float((naive - packed).abs().max())


def time_path(model, optimizer, batch, cfg: TrainConfig, steps: int, deadline: float, device) -> list[float]:
    """Warm-up (compilation) step, then up to `steps` timed steps before the deadline."""
    times = []
    for i in range(steps + 1):
        if time.monotonic() > deadline:
            print(f"  deadline reached after {len(times)} timed steps", flush=True)
            break
        sync(device)
        t = time.perf_counter()
        loss = train_step(model, optimizer, batch, SPECIAL, cfg, device)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
        print(f"  step {i}{' (warm-up)' if not i else ''}: {time.perf_counter() - t:.3f} s, loss {loss:.4f}",
              flush=True)
    return times


def report(path: str, times: list[float], batch, flops: float, tokens: int, peak: float | None) -> None:
    if not times:
        print(f"{path}: no timed step")
        return
    t = statistics.median(times)
    mfu = f"{100 * flops / t / peak:.1f}%" if peak else "n/a (unknown GPU; pass --peak)"
    print(f"{path}: {t:.3f} s/step, {len(batch) / t:.1f} triplets/s, "
          f"{batch.naive_tokens().sum() / t:,.0f} data tokens/s, {tokens / t:,.0f} processed (non-pad) tokens/s, "
          f"{flops / t / 1e12:.1f} TFLOP/s, MFU {mfu}", flush=True)


def parse_runs(text: str) -> list[tuple[str, int, bool, bool]]:
    """'packed:4,packed:16:ckpt,packed:16:compile' -> [(path, micro-batch, checkpointing, compiled)]."""
    runs = []
    for item in text.split(","):
        path, micro, *flags = item.split(":")
        if path not in ("packed", "naive") or not set(flags) <= {"ckpt", "compile"}:
            raise SystemExit(f"--runs item {item!r}: expected packed|naive:MICRO[:ckpt][:compile]")
        runs.append((path, int(micro), "ckpt" in flags, "compile" in flags))
    return runs


def planned_gb(cfg, params: int, batch: TokenTriplets, mix, jitter: float, micro: int, packing: bool,
               ckpt: bool, compiled: bool) -> tuple[float, float]:
    """(the dry run's per-GPU estimate, sweeps.memory, for rows as long as the batch's
    longest, without its 2 GB overhead; the same for this batch's largest micro-batch)."""
    from polar.config import DataConfig
    from sweeps.memory import activation_bytes_per_token, estimate

    p, r, _ = mix
    data = DataConfig(prefix_min=max(1, int(p * (1 - jitter))), prefix_max=int(p * (1 + jitter)) + 1,
                      max_response_tokens=int(r * (1 + jitter)) + 1)
    plan = estimate(cfg, params, data, micro_batch=micro, ranks=1, sharded=False, packing=packing,
                    checkpointing=ckpt, on_gpu=True, compiled=compiled)
    chunks = [batch.subset(range(i, min(len(batch), i + micro))) for i in range(0, len(batch), micro)]
    tokens = max(step_flops(cfg, c, packing)[1] if packing else
                 2 * len(c) * int(c.naive_tokens().max() / 2 + 1) for c in chunks)
    fixed = plan.state_gb + plan.casts_gb
    return fixed + plan.activations_gb, fixed + tokens * activation_bytes_per_token(cfg, True, compiled, ckpt) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="1.8b")
    parser.add_argument("--mix", default="256/64/64", help="mean prompt/reference/candidate tokens")
    parser.add_argument("--jitter", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=32, help="triplets per optimizer step")
    parser.add_argument("--runs", default="packed:4,naive:4",
                        help="path:micro-batch[:ckpt], comma-separated (ckpt: activation checkpointing)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run, after one warm-up")
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s for MFU")
    parser.add_argument("--time-limit", type=float, default=210.0, help="seconds; stops between steps")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the plumbing (packed uses SDPA)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --device cpu for a smoke run)")
    gpu, peak = peak_flops(args.peak, device)
    cfg = load_preset(args.preset)
    runs = parse_runs(args.runs)
    torch.manual_seed(0)
    with device:
        model = build_model(cfg)
    params = n_params(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    mix = tuple(int(x) for x in args.mix.split("/"))
    batch = jittered_batch(args.batch, mix, args.jitter, cfg.vocab_size)
    print(f"{gpu}, torch {torch.__version__}; {args.preset}: {params / 1e9:.2f}B params; batch "
          f"{args.batch} triplets, mix {args.mix} +-{args.jitter:.0%}; fused AdamW; "
          f"bound (naive / packed tokens) {batch.naive_tokens().sum() / batch.packed_tokens().sum():.2f}x", flush=True)
    results = {}
    for path, micro, ckpt, compiled in runs:
        packing = path == "packed"
        name = f"{path} micro {micro}{' +ckpt' if ckpt else ''}{' +compile' if compiled else ''}"
        set_attention(model, packed_attention(device) if packing else "sdpa")
        set_checkpointing(model, ckpt)
        set_compiled(model, compiled)
        train = TrainConfig(lr=1e-5, batch_size=args.batch, micro_batch_size=micro, packing=packing)
        print(f"{name}:", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times = time_path(model, optimizer, batch, train, args.steps, deadline, device)
        except Exception as err:      # out of memory, a compile failure: the next run still runs
            print(f"{name}: failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}", flush=True)
            optimizer.zero_grad(set_to_none=True)
            continue
        flops, tokens = step_flops(cfg, batch, packing)
        report(name, times, batch, flops, tokens, peak)
        bound, actual = planned_gb(cfg, params, batch, mix, args.jitter, micro, packing, ckpt, compiled)
        if device.type == "cuda":
            print(f"  memory: max_memory_allocated {torch.cuda.max_memory_allocated() / 1e9:.1f} GB; estimate "
                  f"(sweeps.memory, no overhead) {actual:.1f} GB at this batch's largest micro-batch, "
                  f"{bound:.1f} GB planned for rows of the longest length", flush=True)
        results[name] = statistics.median(times) if times else None
    naive, packed = results.get("naive micro 4"), results.get("packed micro 4")
    if naive and packed:
        print(f"packed speedup {naive / packed:.2f}x (triplets/s, micro 4)")
    if deadline - time.monotonic() > 45:      # the check compiles an fp32 forward kernel
        set_checkpointing(model, False)
        set_compiled(model, False)
        diff = check_equal(model, batch.subset(range(min(4, len(batch)))), device)
        print(f"packed ({packed_attention(device)}) vs naive (sdpa) fp32 rewards, max |diff|: {diff:.2e}")
    else:
        print("no time left for the packed-vs-naive reward check")


if __name__ == "__main__":
    main()
