"""Benchmark (not a test): a training job's memory does not grow with its data set.

Builds two token-shard sets (polar.data.TokenShards files, written directly: random ids,
piece lengths like the tiny synthesized data: prompt 6..12, reference / positive /
negative 4..16 tokens), of 1,000,000 and of 10,000 training triplets (each with 256
validation triplets), then runs the same short training of the debug model (conf/model/
debug.yaml) on each, in a fresh subprocess, and reports the subprocess's peak RSS
(ru_maxrss) and its RssAnon (anonymous memory, /proc/self/status) after training.
Target: the two within 300 MB of each other. --lists also runs each job as before token
shards (the split read into TokenTriplets, Python lists of ids), for comparison.

Usage: .venv/bin/python bench/bench_data_memory.py [--sizes 1000000,10000] [--steps 40] [--workers 0] [--lists]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECIAL = {"pad": 0, "bos": 1, "sep": 2, "reward": 3}
LENGTHS = ((6, 13), (4, 17), (4, 17), (4, 17))      # [low, high) of prompt, reference, positive, negative


def write_split(folder: Path, split: str, n: int, vocab: int, seed: int, block: int = 100_000) -> int:
    """{split}.ids.npy and {split}.offsets.npy of n random triplets; returns the ids' count."""
    rng = np.random.default_rng(seed)
    lengths = np.stack([rng.integers(lo, hi, n) for lo, hi in LENGTHS], axis=1).ravel()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(folder / f"{split}.offsets.npy", offsets)
    ids = np.lib.format.open_memmap(folder / f"{split}.ids.npy", mode="w+", dtype=np.int32, shape=(int(offsets[-1]),))
    for start in range(0, len(ids), block * 40):
        stop = min(len(ids), start + block * 40)
        ids[start:stop] = rng.integers(len(SPECIAL), vocab, stop - start, dtype=np.int32)
    ids.flush()
    return len(ids)


def child(folder: Path, steps: int, workers: int, lists: bool) -> None:
    """One training job on the shards in folder; prints its memory figures as JSON."""
    import torch
    import yaml

    from polar.config import ModelConfig, TrainConfig
    from polar.data import TokenShards
    from polar.model import build_model
    from polar.trainer import fit

    torch.set_num_threads(1)
    values = yaml.safe_load((ROOT / "conf" / "model" / "debug.yaml").read_text())
    torch.manual_seed(0)
    model = build_model(ModelConfig(**values), bos_token_id=1, pad_token_id=0, reward_token_id=3, sep_token_id=2)
    train = TokenShards(folder / "train.ids.npy", folder / "train.offsets.npy")
    val = TokenShards(folder / "val.ids.npy", folder / "val.offsets.npy")
    if lists:                                        # the old path: the whole split as Python lists
        train, val = train.subset(range(len(train))), val.subset(range(len(val)))
    cfg = TrainConfig(lr=3e-3, batch_size=16, n_evals=2, eval_spacing="linear", dtype="float32", threads=1,
                      data_workers=workers)

    class Null:
        def log_many(self, points):
            pass

    start = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=folder))           # a fresh run: no checkpoint to resume
    result = fit(model, train, val, SPECIAL, cfg, steps, 1.0, run_dir, Null(), progress=False)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"triplets": len(train), "seconds": time.perf_counter() - start, "val_loss": result.val_loss,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_anon_mb": int(status["RssAnon"].split()[0]) / 1024,
                      "rss_file_mb": int(status["RssFile"].split()[0]) / 1024}))


def measure(folder: Path, steps: int, workers: int, lists: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--steps", str(steps),
                          "--workers", str(workers)] + (["--lists"] if lists else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--lists", action="store_true", help="also run each job on TokenTriplets (lists)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.steps, args.workers, args.lists)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{args.steps} steps of 16 triplets, debug model, data_workers={args.workers}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-memory-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            folder = Path(tmp) / str(n)
            folder.mkdir()
            count = write_split(folder, "train", n, 1024, seed=n)
            write_split(folder, "val", 256, 1024, seed=1)
            rows[n] = measure(folder, args.steps, args.workers)
            size = (folder / "train.ids.npy").stat().st_size + (folder / "train.offsets.npy").stat().st_size
            print(f"{n:>9,} triplets ({count:,} ids, {size / 2**20:,.0f} MiB on disk): peak RSS "
                  f"{rows[n]['maxrss_mb']:.0f} MB, RssAnon {rows[n]['rss_anon_mb']:.0f} MB, RssFile "
                  f"{rows[n]['rss_file_mb']:.0f} MB, {rows[n]['seconds']:.1f} s", flush=True)
            if args.lists:
                old = measure(folder, args.steps, args.workers, lists=True)
                print(f"{'':>9}  as TokenTriplets (lists): peak RSS {old['maxrss_mb']:.0f} MB, RssAnon "
                      f"{old['rss_anon_mb']:.0f} MB, {old['seconds']:.1f} s", flush=True)
    big, small = rows[max(rows)], rows[min(rows)]
    print(f"difference: peak RSS {big['maxrss_mb'] - small['maxrss_mb']:+.0f} MB, RssAnon "
          f"{big['rss_anon_mb'] - small['rss_anon_mb']:+.0f} MB (target: within 300 MB)")


if __name__ == "__main__":
    main()
