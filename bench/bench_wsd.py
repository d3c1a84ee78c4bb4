"""Benchmark: a WSD study with decay branches against a grid of cosine runs (not a test).

For the demo's sizes (cpu_ladder: 10k ... 300k, its data, learning rates and 5.24M-token
budget T), one or more seeds (`--seeds 0,1,2`: the points of each configuration averaged over
the seeds before the fits; FLOPs summed over them):

- WSD: `+experiment=wsd_ladder`, one run per size with decay branches ending at
  T/8 ... 7T/8 (each decaying over the last 10% of its length) and the run's own end:
  eight converged points per size, logged as decay/* metrics;
- grid: `+experiment=cpu_ladder` with cosine runs at the same eight token counts per size.

Both through `python -m sweeps.run` (tracking off: the runs' metrics.jsonl, read back by
analysis.records), into --out. Then L(N, D) = E + A/N^alpha + B/D^beta (Approach 3) is fitted
on each study's points, with 95% bootstrap intervals (200 resamples), on all eight token
counts and on four (T/4, T/2, 3T/4, T), and the bench prints each study's training FLOPs
(the WSD study's: its runs plus their branches, each branch decay_fraction x its point's
FLOPs), the exponents with their intervals, and whether they agree (each study's
estimate inside the other's interval).

Usage: .venv/bin/python bench/bench_wsd.py [--out .cache/bench/wsd] [--seeds 0] [--skip-runs]
       [--params all|nonembed]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import fit as F  # noqa: E402
from analysis.records import PARAM_COUNTS, load_jsonl_records  # noqa: E402

SIZES = "10k,20k,50k,100k,300k"
TOKENS = 5.24e6                 # the demo's budget (conf/experiment/cpu_ladder.yaml)
EIGHTHS = [k / 8 for k in range(1, 9)]
DECAY_FRACTION = 0.1            # conf/experiment/wsd_ladder.yaml


def sweep(args, experiment: str, *overrides: str) -> float:
    """Run one sweep through the CLI; its wall time in seconds."""
    cmd = [sys.executable, "-m", "sweeps.run", "-m", f"+experiment={experiment}", "tracking=off",
           f"paths.runs_dir={args.out / 'runs'}", f"hydra.sweep.dir={args.out / 'multirun' / experiment}",
           f"seed={args.seeds}", f"model={args.sizes}", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def nearest(tokens: pd.Series, wanted: list[float], rtol: float = 0.03) -> pd.Series:
    """Rows whose tokens are within rtol of one of the wanted token counts."""
    t = tokens.to_numpy(float)[:, None]
    return pd.Series(np.any(np.abs(t / np.asarray(wanted)[None, :] - 1) <= rtol, axis=1), index=tokens.index)


def study(points: pd.DataFrame, flops: float, k: int, seed: int) -> dict:
    """L(N, D) on the points, with bootstrap intervals."""
    inputs, y = F.records_inputs(points, "chinchilla")
    res = F.bootstrap(F.fit("chinchilla", inputs, y), inputs, y, k=k, seed=seed)
    p = res.params
    return {"points": len(points), "flops": flops, "fit": res, "a_opt": p["beta"] / (p["alpha"] + p["beta"])}


def seed_means(points: pd.DataFrame) -> pd.DataFrame:
    """One point per (size, token count): the mean loss over the seeds' points."""
    return points.groupby(["n_params", "tokens"], as_index=False).agg(loss=("loss", "mean"), compute=("compute", "mean"))


def studies(wsd: pd.DataFrame, grid: pd.DataFrame, fractions: list[float], k: int, seed: int) -> tuple[dict, dict]:
    wanted = [f * TOKENS for f in fractions]
    g = grid[nearest(grid["tokens"], wanted)]
    finals = wsd[wsd["point"] == "final"]
    decays = wsd[(wsd["point"] == "decay") & nearest(wsd["tokens"], wanted)]
    w = pd.concat([finals, decays], ignore_index=True)
    wsd_flops = finals["compute"].sum() + DECAY_FRACTION * decays["compute"].sum()
    return study(seed_means(w), wsd_flops, k, seed), study(seed_means(g), g["compute"].sum(), k, seed)


def inside(value: float, ci: tuple[float, float]) -> bool:
    return ci[0] <= value <= ci[1]


def table(label: str, wsd: dict, grid: dict) -> list[str]:
    lines = [f"\n{label}: WSD {wsd['points']} points, grid {grid['points']} runs; FLOPs WSD {wsd['flops']:.3g} vs grid "
             f"{grid['flops']:.3g} = {wsd['flops'] / grid['flops']:.2f}x",
             f"{'study':<6} {'E':>8} {'alpha':>8} {'alpha 95%':>18} {'beta':>8} {'beta 95%':>18} {'R2':>7} "
             f"{'N_opt exp':>9}"]
    for name, s in (("WSD", wsd), ("grid", grid)):
        p, ci = s["fit"].params, s["fit"].ci
        lines.append(f"{name:<6} {p['E']:>8.4f} {p['alpha']:>8.4f} {ci['alpha'][0]:>8.4f}-{ci['alpha'][1]:<9.4f} "
                     f"{p['beta']:>8.4f} {ci['beta'][0]:>8.4f}-{ci['beta'][1]:<9.4f} {s['fit'].r2:>7.4f} "
                     f"{s['a_opt']:>9.3f}")
    for e in ("alpha", "beta"):
        a, b = wsd["fit"], grid["fit"]
        both = inside(a.params[e], b.ci[e]) and inside(b.params[e], a.ci[e])
        overlap = max(a.ci[e][0], b.ci[e][0]) <= min(a.ci[e][1], b.ci[e][1])
        lines.append(f"{e}: {'agree' if both else 'intervals overlap' if overlap else 'DISAGREE'} "
                     f"(WSD {a.params[e]:.4f} in grid's interval: {inside(a.params[e], b.ci[e])}; grid "
                     f"{b.params[e]:.4f} in WSD's: {inside(b.params[e], a.ci[e])})")
    return lines


def of_seeds(rec, seeds: str):
    """The records of these training seeds only."""
    keep = rec.records["seed"].astype(int).isin([int(s) for s in seeds.split(",")])
    return dataclasses.replace(rec, records=rec.records[keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "wsd")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated (points averaged over them)")
    parser.add_argument("--sizes", default=SIZES)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--skip-runs", action="store_true", help="report on the runs already in --out")
    parser.add_argument("--params", choices=PARAM_COUNTS, default="all", help="what N counts in L(N, D)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; N counts {args.params!r} parameters", flush=True)
    if not args.skip_runs:
        wall_wsd = sweep(args, "wsd_ladder")
        wall_grid = sweep(args, "cpu_ladder", "budget.tokens=" + ",".join(f"{f * TOKENS:.6g}" for f in EIGHTHS))
        print(f"wall time: WSD study {wall_wsd:.0f} s, cosine grid {wall_grid:.0f} s "
              f"({wall_wsd / wall_grid:.2f}x); load {os.getloadavg()[0]:.2f}", flush=True)
    wsd = of_seeds(load_jsonl_records(args.out / "runs", "wsd_ladder").counting(args.params), args.seeds).points()
    grid = of_seeds(load_jsonl_records(args.out / "runs", "cpu_ladder").counting(args.params), args.seeds).records
    for label, fractions in (("8 token counts (T/8 ... T)", EIGHTHS), ("4 token counts (T/4, T/2, 3T/4, T)", EIGHTHS[1::2])):
        try:
            print("\n".join(table(label, *studies(wsd, grid, fractions, args.bootstrap, 0))), flush=True)
        except F.FitError as exc:
            print(f"\n{label}: no fit ({exc})", flush=True)


if __name__ == "__main__":
    main()
