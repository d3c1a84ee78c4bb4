"""Benchmark: how robust the demo's scaling laws are to the seeds (not a test).

Runs the demo's ladder (`+experiment=cpu_ladder`: 5 sizes, the demo's data, recipe and
budget) with several disjoint seed sets at once (default four sets of three seeds: 60
jobs, tracking off, into --out), then analyses each set exactly as `make demo`'s report
does (analysis.report.analyse on that set's runs: seeds averaged per size, by their mean and,
in a second table, their median) and prints,
per set: R^2 of L = a N^b and of the compute frontier's L = a C^b, the held-out check
(the largest size predicted from the four smaller: error and whether the 95% interval
covers it) and the N exponent. The minimum over sets is what a new user on another
machine can expect at worst. Extra overrides (a lever to measure) go after `--`.

Usage: .venv/bin/python bench/bench_demo_robustness.py [--sets "0,1,2;3,4,5;6,7,8;9,10,11"]
       [--out .cache/bench/robust] [--skip-runs] [-- train.schedule=wsd ...]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.records import load_jsonl_records  # noqa: E402
from analysis.report import analyse  # noqa: E402


def run_ladder(out: Path, seeds: list[int], overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "sweeps.run", "-m", "+experiment=cpu_ladder", "tracking=off",
           f"paths.runs_dir={out / 'runs'}", f"hydra.sweep.dir={out / 'multirun'}",
           "seed=" + ",".join(map(str, seeds)), *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def one_set(rec, seeds: list[int], k: int, statistic: str) -> dict:
    """The demo report's numbers on the runs of these seeds (replicas by their mean or median)."""
    records = rec.records[rec.records["seed"].astype(int).isin(seeds)]
    curves = rec.curves[rec.curves["run_id"].isin(records["run_id"])]
    an = analyse(dataclasses.replace(rec, records=records, curves=curves), bootstrap_k=k, seed=0, seeds=statistic)
    held = an.get("size_holdout")
    return {"seeds": seeds, "runs": len(records), "r2_n": an["size_fit"].r2,
            "r2_c": an["compute_fit"].r2 if "compute_fit" in an else float("nan"),
            "b_n": an["size_fit"].params["b"], "held_err": held["mape"] if held else float("nan"),
            "held_covered": bool(held and held["coverage"] == 1.0)}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="0,1,2;3,4,5;6,7,8;9,10,11", help="seed sets, ';'-separated")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "robust")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--skip-runs", action="store_true", help="analyse the runs already in --out")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.out = args.out.resolve()
    sets = [[int(s) for s in part.split(",")] for part in args.sets.split(";")]
    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; overrides {overrides or 'none'}", flush=True)
    if not args.skip_runs:
        wall = run_ladder(args.out, sorted({s for group in sets for s in group}), overrides)
        print(f"{sum(map(len, sets)) * 5} jobs in {wall / 60:.1f} min (load {os.getloadavg()[0]:.2f})", flush=True)
    rec = load_jsonl_records(args.out / "runs", "cpu_ladder")
    for statistic in ("mean", "median"):
        table([one_set(rec, seeds, args.bootstrap, statistic) for seeds in sets], statistic)


def table(rows: list[dict], statistic: str) -> None:
    print(f"\nreplicas by their {statistic} (analysis.report --seeds {statistic})")
    print(f"{'seeds':<12} {'runs':>4} {'R2 (N)':>7} {'R2 (C)':>7} {'N exponent':>10} {'held-out error':>14} "
          f"{'95% covers':>10}")
    for r in rows:
        print(f"{','.join(map(str, r['seeds'])):<12} {r['runs']:>4} {r['r2_n']:>7.4f} {r['r2_c']:>7.4f} "
              f"{r['b_n']:>10.4f} {r['held_err']:>13.1f}% {str(r['held_covered']):>10}")
    print(f"{'minimum':<12} {'':>4} {min(r['r2_n'] for r in rows):>7.4f} {min(r['r2_c'] for r in rows):>7.4f} "
          f"{'':>10} {max(r['held_err'] for r in rows):>13.1f}% (max)")


if __name__ == "__main__":
    main()
