"""GPU smoke run of the trainer's own loop (not a test): polar.trainer.fit on CUDA with
train.compile, packing under FlexAttention, bf16 autocast, evaluations, checkpoints, and a
resume that must continue from the saved step to the same final loss as one run.

Random weights (a preset's shape, default 100m) and random triplets; no download.
Prints each run's final validation loss, its wall time, and whether the resumed run
matches. Usage: python3 bench/gpu/fit_smoke.py [--preset 100m] [--steps 24] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from bench_gpu import jittered_batch  # noqa: E402
from bench_train import SPECIAL, load_preset  # noqa: E402

from polar.config import TrainConfig  # noqa: E402
from polar.model import build_model, flops_per_token  # noqa: E402
from polar.sinks import NullSink  # noqa: E402
from polar.trainer import fit  # noqa: E402


def run(cfg, train, val, steps: int, run_dir: Path, device: str, stop_at: int | None = None):
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg, attn_implementation="flex_attention" if device == "cuda" else "polar_sdpa")
    settings = TrainConfig(lr=3e-4, batch_size=32, micro_batch_size=16, packing=True, compile=True, n_evals=4,
                           eval_spacing="linear", device=device)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return stop_at is not None and calls["n"] >= stop_at

    start = time.perf_counter()
    try:
        result = fit(model, train, val, SPECIAL, settings, steps, flops_per_token(cfg, 0.0), run_dir, NullSink(),
                     progress=False, stop=stop)
    except Exception as err:        # Preempted at stop_at: the checkpoint is written
        if stop_at is None:
            raise
        print(f"  stopped: {type(err).__name__} after {time.perf_counter() - start:.1f} s", flush=True)
        return None
    print(f"  {steps} steps: val loss {result.val_loss:.5f}, {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the plumbing")
    args = parser.parse_args()
    cfg = load_preset(args.preset)
    train = jittered_batch(32 * args.steps, (256, 64, 64), 0.25, cfg.vocab_size, seed=1)
    val = jittered_batch(64, (256, 64, 64), 0.25, cfg.vocab_size, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        print("one run:", flush=True)
        whole = run(cfg, train, val, args.steps, Path(tmp) / "whole", args.device)
        print(f"stopped at step {args.steps // 2}, then resumed:", flush=True)
        run(cfg, train, val, args.steps, Path(tmp) / "split", args.device, stop_at=args.steps // 2)
        resumed = run(cfg, train, val, args.steps, Path(tmp) / "split", args.device)
    same = whole and resumed and abs(whole.val_loss - resumed.val_loss) < 1e-3
    print(f"resumed run's final val loss {'matches' if same else 'DIFFERS from'} the single run's")


if __name__ == "__main__":
    main()
