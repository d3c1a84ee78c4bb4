"""Benchmark: how much of the demo's error is its validation set, not its seeds (not a test).

Scores every finished run of the robustness bench (`--runs`, default .cache/bench/robust/runs:
the demo's ladder, many seeds) on a larger validation set (`--rows`, default 4096: the demo's
1024 triplets and the next ones of the corpus's validation region, `data.n_val=ROWS`) and prints

- per size: the seeds' mean final loss on the demo's 1024 rows and on all ROWS, the seeds' sd,
  and the validation set's standard error of that mean (a bootstrap over rows, the same rows
  for every run: an error shared by every machine, which no number of seeds removes);
- the held-out check (the largest size predicted from the others, every run's seeds averaged)
  and its sd from the validation set alone, with 1024 rows and with ROWS;
- the robustness bench's fixed sets and random draws with each run's loss on ROWS rows.

Each run's mean over the first 1024 rows must reproduce its recorded final loss (to 2e-3):
a run trained on other validation rows is refused, not mixed in. Per-example losses are kept
in --runs/../val_rows{ROWS}/RUN_ID.npy (scoring is the slow part: 5-40 s a run on one thread).

Usage: .venv/bin/python bench/bench_val_rows.py [--runs .cache/bench/robust/runs] [--rows 4096]
       [--sets "0-5|0-2;..."] [--draws 300] [--params nonembed] [--sizes 10k,...,300k]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_demo_robustness as robust  # noqa: E402  (bench/ is this script's directory)

from analysis import fit as F  # noqa: E402
from analysis.records import PARAM_COUNTS  # noqa: E402

DEMO_ROWS = 1024


def validation_set(rows: int):
    """The demo's validation triplets, `rows` of them, and the special token ids."""
    from hydra import compose, initialize_config_dir

    from polar.inputs import pretrain_inputs
    from sweeps.schema import register, to_job_config

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        # n_train only sizes the synthesis here: the validation rows come from their own region
        job = to_job_config(compose("config", ["+experiment=cpu_ladder", f"data.n_val={rows}", "data.n_train=1024"]))
    inputs = pretrain_inputs(job.model, job.data, job.paths.cache_dir, 0, with_model=False)
    return inputs.val, inputs.special


def per_example_losses(model_dir: Path, val, special, batch: int = 128) -> np.ndarray:
    """The Bradley-Terry loss of one saved reward model on every validation triplet."""
    import torch
    import transformers

    from polar.model import load_model
    from polar.trainer import collate, scores

    transformers.utils.logging.disable_progress_bar()
    model = load_model(model_dir).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(val), batch):
            chunk = val.subset(np.arange(start, min(start + batch, len(val))))
            pos, neg = scores(model, collate(chunk, special, False, model), "cpu")
            out.append(torch.nn.functional.softplus(neg - pos).numpy())   # polar.loss.pretrain_loss, per triplet
    return np.concatenate(out)


def scored_runs(records, runs_dir: Path, rows: int) -> dict[str, np.ndarray]:
    """run_id -> its per-example losses on `rows` validation triplets (cached, checked)."""
    import torch

    torch.set_num_threads(1)
    cache = runs_dir.parent / f"val_rows{rows}"
    cache.mkdir(exist_ok=True)
    val, special, out, start = None, None, {}, time.perf_counter()
    for i, (run_id, recorded) in enumerate(zip(records["run_id"], records["loss"]), 1):
        path = cache / f"{run_id}.npy"
        if not path.exists():
            if val is None:
                val, special = validation_set(rows)
            np.save(path, per_example_losses(runs_dir / run_id / "model", val, special))
            print(f"  scored {i}/{len(records)} runs ({time.perf_counter() - start:.0f} s)", flush=True)
        out[run_id] = losses = np.load(path)
        if len(losses) != rows or abs(losses[:DEMO_ROWS].mean() - recorded) > 2e-3:
            raise SystemExit(f"run {run_id}: its first {DEMO_ROWS} rows give {losses[:DEMO_ROWS].mean():.4f}, its "
                             f"recorded final loss is {recorded:.4f}: it was validated on other rows (or {path} is stale)")
    return out


def size_table(records, per: dict[str, np.ndarray], size_col: str, rng) -> None:
    print(f"\n{'size':<8} {'runs':>4} {'mean (1024)':>11} {'mean (all)':>10} {'seed sd':>8} {'val-set SE 1024':>15} "
          f"{'val-set SE all':>14}")
    for n, group in records.groupby(size_col):
        mat = np.stack([per[r] for r in group["run_id"]])       # runs x rows
        se = [_bootstrap_sd(mat[:, :k].mean(0), rng) for k in (DEMO_ROWS, mat.shape[1])]
        print(f"{group['model'].iloc[0]:<8} {len(mat):>4} {mat[:, :DEMO_ROWS].mean():>11.4f} {mat.mean():>10.4f} "
              f"{mat.mean(1).std(ddof=1):>8.4f} {se[0]:>8.4f} ({se[0] / mat.mean():.1%}) {se[1]:>7.4f} ({se[1] / mat.mean():.1%})")


def _bootstrap_sd(rows: np.ndarray, rng, k: int = 300) -> float:
    return float(np.std([rows[rng.integers(0, len(rows), len(rows))].mean() for _ in range(k)]))


def holdout_noise(records, per: dict[str, np.ndarray], size_col: str, rng, k: int = 200) -> None:
    """The held-out error of every run's seed-averaged sizes, and its sd over bootstrap
    resamples of the validation rows (the same resample for every size)."""
    sizes = sorted(records[size_col].unique())
    rows = np.stack([np.stack([per[r] for r in records.loc[records[size_col] == n, "run_id"]]).mean(0) for n in sizes])
    for k_rows in (DEMO_ROWS, rows.shape[1]):
        errors = [_holdout_error(sizes, rows[:, idx].mean(1))
                  for idx in [np.arange(k_rows)] + [rng.integers(0, k_rows, k_rows) for _ in range(k)]]
        print(f"held-out error on {k_rows} rows: {errors[0]:+.1f}% (every run's seeds averaged); "
              f"sd from the validation set alone {np.std(errors[1:]):.1f}% ({k} resamples of its rows)")


def _holdout_error(sizes: list[float], losses: np.ndarray) -> float:
    x = np.asarray(sizes, float)
    res = F.fit("power", {"x": x[:-1]}, losses[:-1])
    return float(100 * (res.predict(x=x[-1:])[0] / losses[-1] - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / ".cache" / "bench" / "robust" / "runs")
    parser.add_argument("--rows", type=int, default=4096, help=f"validation triplets to score (> {DEMO_ROWS})")
    parser.add_argument("--sets", default=robust.DEFAULT_SETS, help="seed sets as bench_demo_robustness's")
    parser.add_argument("--draws", type=int, default=0)
    parser.add_argument("--sizes", default=",".join(robust.ladder_sizes()), help="the ladder's presets (the demo's)")
    parser.add_argument("--params", choices=PARAM_COUNTS, default="nonembed")
    args = parser.parse_args()
    if args.rows <= DEMO_ROWS:
        parser.error(f"--rows must exceed the demo's {DEMO_ROWS} validation rows, got {args.rows}")
    warnings.filterwarnings("ignore")
    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; {args.rows} validation rows; N counts "
          f"{args.params!r} parameters", flush=True)
    rec = robust.ladder_records(args.runs.resolve(), args.sizes.split(","))
    per = scored_runs(rec.records, args.runs.resolve(), args.rows)
    size_col, rng = PARAM_COUNTS[args.params], np.random.default_rng(0)
    size_table(rec.records, per, size_col, rng)
    holdout_noise(rec.records, per, size_col, rng)
    rescored = rec.records.assign(loss=[per[r].mean() for r in rec.records["run_id"]])
    rec = dataclasses.replace(rec, records=rescored)
    rows = [robust.one_set(rec, seeds, top, 200, "mean", args.params) for seeds, top in robust.parse_sets(args.sets)]
    print(f"\nwith every run's final loss on {args.rows} rows (the curves, and so the frontier, stay on {DEMO_ROWS}):")
    robust.table(rows, "mean")
    if args.draws:
        (seeds, top), *_ = robust.parse_sets(args.sets)
        *small, largest = args.sizes.split(",")
        design = {**{m: len(seeds) for m in small}, largest: len(top)}
        robust.draws_table(robust.random_draws(rec, design, args.draws, args.params), args.params)


if __name__ == "__main__":
    main()
