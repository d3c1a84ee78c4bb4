"""Benchmark: how robust the demo's scaling laws are to the seeds (not a test).

Runs the demo's ladder (`+experiment=cpu_ladder`: its sizes, data, recipe and budget) with
several disjoint seed sets at once (tracking off, into --out) and analyses each set exactly
as `make demo`'s report does (analysis.report.analyse on that set's runs, N counted as
`--params`: seeds averaged per size by their mean and, in a second table, their median).
A set is `SEEDS` or `SEEDS|TOP`: the largest size gets the seeds TOP, the others SEEDS,
as `make demo` gives the cheap, noisy small sizes seeds 0-5 and the largest 0-2 (default:
four such sets: seeds 0-23 of the smaller sizes and 0-11 of the largest, 108 jobs). Per set it prints R^2 of L = a N^b and of the compute frontier's
L = a C^b, the held-out check (the largest size predicted from the smaller: error, and
whether the 95% interval covers it) and the N exponent. The minimum over sets is what a
new user on another machine can expect at worst. With `--draws K` it also analyses K random
draws of a design (`--design 10k:4,...,300k:3`, seeds per preset, default the first set's;
each preset's seeds drawn on their own from its runs in --out; `--with-replacement` bootstraps
designs with more seeds than there are runs) and
prints how often each of the demo's targets holds (R^2 >= 0.97 and >= 0.95 for both fits,
held-out error <= 5%, covered, its interval from 40 bootstrap resamples per draw): four sets
are a small sample of a wide distribution.
`--sizes` measures another ladder (its last preset held out; finished runs in --out are
reused, and the analysis reads only these presets' runs). Extra overrides (a lever to
measure) go after `--`.

Usage: .venv/bin/python bench/bench_demo_robustness.py [--sets "0-5|0-2;6-11|3-5;..."]
       [--params nonembed] [--draws 300 [--design 10k:4,20k:4,50k:4,100k:4,200k:3,300k:3] [--with-replacement]]
       [--sizes 10k,20k,50k,100k,200k] [--out .cache/bench/robust]
       [--skip-runs] [-- train.schedule=wsd ...]
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.records import PARAM_COUNTS, load_jsonl_records  # noqa: E402
from analysis.report import analyse  # noqa: E402

DEFAULT_SETS = "0-5|0-2;6-11|3-5;12-17|6-8;18-23|9-11"


def ladder_sizes() -> list[str]:
    """The demo ladder's sizes, smallest first, from conf/experiment/cpu_ladder.yaml."""
    exp = yaml.safe_load((ROOT / "conf" / "experiment" / "cpu_ladder.yaml").read_text())
    return str(exp["hydra"]["sweeper"]["params"]["model"]).split(",")


def parse_seeds(text: str) -> list[int]:
    """'0-2,7' -> [0, 1, 2, 7]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def parse_sets(text: str) -> list[tuple[list[int], list[int]]]:
    """'0-5|0-2;6-11' -> [(seeds, seeds of the largest size), ...]."""
    sets = []
    for part in text.split(";"):
        seeds, _, top = part.partition("|")
        sets.append((parse_seeds(seeds), parse_seeds(top) if top else parse_seeds(seeds)))
    return sets


def run_ladder(out: Path, sizes: list[str], sets, overrides: list[str]) -> float:
    """Every set's runs: the smaller sizes with every set's seeds, the largest with its seeds
    (runs already finished in `out` are found by their run key and not repeated)."""
    *small, top = sizes
    start = time.perf_counter()
    for models, seeds in ((top, sorted({s for _, t in sets for s in t})),
                          (",".join(small), sorted({s for g, _ in sets for s in g}))):
        cmd = [sys.executable, "-m", "sweeps.run", "-m", "+experiment=cpu_ladder", "tracking=off",
               f"paths.runs_dir={out / 'runs'}", f"hydra.sweep.dir={out / 'multirun'}",
               f"model={models}", "seed=" + ",".join(map(str, seeds)), *overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def ladder_records(runs_dir: Path, sizes: list[str]):
    """The demo ladder's runs in runs_dir, of these presets only (the directory may hold others)."""
    rec = load_jsonl_records(runs_dir, "cpu_ladder")
    missing = sorted(set(sizes) - set(rec.records["model"]))
    if missing:
        raise SystemExit(f"no finished runs of {missing} in {runs_dir}: run the bench without --skip-runs")
    keep = rec.records[rec.records["model"].isin(sizes)]
    return dataclasses.replace(rec, records=keep, curves=rec.curves[rec.curves["run_id"].isin(keep["run_id"])])


def largest_and_seeds(records):
    """(which runs are of the largest size, each run's seed as an int)."""
    return records["n_params"] == records["n_params"].max(), records["seed"].astype(int)


def one_set(rec, seeds: list[int], top_seeds: list[int], k: int, statistic: str, params: str) -> dict:
    """The demo report's numbers on this set's runs (replicas by their mean or median)."""
    top, seed = largest_and_seeds(rec.records)
    chosen = rec.records[(top & seed.isin(top_seeds)) | (~top & seed.isin(seeds))]
    return {"seeds": seeds, "top_seeds": top_seeds, **analysed(subset(rec, chosen["run_id"]), k, statistic, params)}


def subset(rec, run_ids):
    """These runs of rec, records and curves."""
    records = rec.records[rec.records["run_id"].isin(run_ids)]
    return dataclasses.replace(rec, records=records, curves=rec.curves[rec.curves["run_id"].isin(records["run_id"])])


def copies(rec, run_ids):
    """The runs drawn, each drawn run a run of its own (id, key and seed), so that one
    drawn twice counts twice: draws with replacement, for designs larger than the runs."""
    by_id, curves = rec.records.set_index("run_id", drop=False), dict(tuple(rec.curves.groupby("run_id")))
    names = [f"{run}#{j}" for j, run in enumerate(run_ids)]
    records = pd.concat([by_id.loc[[run]].assign(run_id=name, run_key=name, seed=str(j))
                         for j, (run, name) in enumerate(zip(run_ids, names))], ignore_index=True)
    return dataclasses.replace(rec, records=records, curves=pd.concat(
        [curves[run].assign(run_id=name) for run, name in zip(run_ids, names) if run in curves], ignore_index=True))


def analysed(rec, k: int, statistic: str, params: str) -> dict:
    """R^2 of both fits, the N exponent and the held-out check of rec's runs, as the report gives them."""
    an = analyse(rec, bootstrap_k=k, seed=0, seeds=statistic, params=params)
    held = an.get("size_holdout")
    return {"runs": len(rec.records), "r2_n": an["size_fit"].r2,
            "r2_c": an["compute_fit"].r2 if "compute_fit" in an else float("nan"),
            "b_n": an["size_fit"].params["b"], "held_err": held["mape"] if held else float("nan"),
            "held_covered": bool(held and held["coverage"] == 1.0)}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=DEFAULT_SETS, help="seed sets, ';'-separated, each SEEDS or SEEDS|TOP")
    parser.add_argument("--params", choices=PARAM_COUNTS, default="nonembed", help="what N counts (as make demo)")
    parser.add_argument("--sizes", default=",".join(ladder_sizes()),
                        help="the ladder's presets, smallest first (default: the demo's); the last is held out")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "robust")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--skip-runs", action="store_true", help="analyse the runs already in --out")
    parser.add_argument("--draws", type=int, default=0, help="random draws of a design to analyse")
    parser.add_argument("--design", default=None,
                        help="the drawn design as PRESET:SEEDS,... (default: the first set's, over --sizes)")
    parser.add_argument("--with-replacement", action="store_true",
                        help="draw seeds with replacement (a bootstrap: designs with more seeds than --out has)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.out = args.out.resolve()
    sets = parse_sets(args.sets)
    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; N counts {args.params!r} parameters; "
          f"overrides {overrides or 'none'}", flush=True)
    if not args.skip_runs:
        wall = run_ladder(args.out, args.sizes.split(","), sets, overrides)
        print(f"runs in {wall / 60:.1f} min (load {os.getloadavg()[0]:.2f})", flush=True)
    rec = ladder_records(args.out / "runs", args.sizes.split(","))
    for statistic in ("mean", "median"):
        table([one_set(rec, seeds, top, args.bootstrap, statistic, args.params) for seeds, top in sets], statistic)
    if args.draws:
        *small, top = args.sizes.split(",")
        design = parse_design(args.design) if args.design else {**{m: len(sets[0][0]) for m in small},
                                                                 top: len(sets[0][1])}
        draws_table(random_draws(ladder_records(args.out / "runs", list(design)), design, args.draws, args.params,
                                 args.with_replacement), args.params)


def parse_design(text: str) -> dict[str, int]:
    """'10k:6,300k:3' -> {'10k': 6, '300k': 3}: seeds per preset."""
    design = {}
    for part in text.split(","):
        name, _, count = part.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--design wants PRESET:SEEDS pairs such as 10k:6,300k:3; got {part!r}")
        design[name] = int(count)
    return design


def random_draws(rec, design: dict[str, int], draws: int, params: str, replace: bool = False,
                 k: int = 40) -> list[dict]:
    """The demo's numbers on `draws` random draws of this design (so many seeds of each
    preset, drawn from its runs in rec, each preset on its own: a seed's runs of different
    sizes share nothing but their data order, which carries no common error); `replace`:
    with replacement, a bootstrap of designs with more seeds than the runs."""
    records, rng = rec.records, np.random.default_rng(0)
    short = {m: n for m, n in design.items() if (records["model"] == m).sum() < n}
    if short and not replace:
        raise SystemExit(f"--design asks for more seeds than --out has finished runs of: {short} "
                         "(--with-replacement draws them as a bootstrap)")
    pools = {m: records.loc[records["model"] == m, "run_id"].to_numpy() for m in design}
    pick = copies if replace else subset
    return [{"design": design, "replace": replace,
             **analysed(pick(rec, [r for m, n in design.items() for r in rng.choice(pools[m], n, replace=replace)]),
                        k, "mean", params)} for _ in range(draws)]


def draws_table(rows: list[dict], params: str) -> None:
    r2n, r2c = np.array([r["r2_n"] for r in rows]), np.array([r["r2_c"] for r in rows])
    held, covered = np.array([r["held_err"] for r in rows]), np.array([r["held_covered"] for r in rows])
    design = ", ".join(f"{m} x{n}" for m, n in rows[0]["design"].items()) + (
        ", drawn with replacement" if rows[0]["replace"] else "")
    print(f"\n{len(rows)} random draws ({design}; N counts {params!r} parameters; replicas by their mean)")
    print(f"{'':<22} {'median':>7} {'10th pct':>8} {'P(>= 0.97)':>10} {'P(>= 0.95)':>10}")
    for name, v in (("R2 (N)", r2n), ("R2 (C)", r2c)):
        print(f"{name:<22} {np.median(v):>7.4f} {np.percentile(v, 10):>8.4f} {np.mean(v >= 0.97):>10.2f} "
              f"{np.mean(v >= 0.95):>10.2f}")
    print(f"{'held-out error':<22} {np.median(held):>6.1f}% {np.percentile(held, 90):>7.1f}% (90th pct); "
          f"P(<= 5%) {np.mean(held <= 5):.2f}; covered {np.mean(covered):.2f}")
    every = (r2n >= 0.97) & (r2c >= 0.97) & (held <= 5) & covered
    print(f"all of the demo's targets (R2 >= 0.97 both, held-out <= 5% and covered): {np.mean(every):.2f}")


def table(rows: list[dict], statistic: str) -> None:
    print(f"\nreplicas by their {statistic} (analysis.report --seeds {statistic})")
    print(f"{'seeds|largest':<20} {'runs':>4} {'R2 (N)':>7} {'R2 (C)':>7} {'N exponent':>10} {'held-out error':>14} "
          f"{'95% covers':>10}")
    for r in rows:
        print(f"{_span(r['seeds']) + '|' + _span(r['top_seeds']):<20} {r['runs']:>4} {r['r2_n']:>7.4f} {r['r2_c']:>7.4f} "
              f"{r['b_n']:>10.4f} {r['held_err']:>13.1f}% {str(r['held_covered']):>10}")
    print(f"{'minimum':<20} {'':>4} {min(r['r2_n'] for r in rows):>7.4f} {min(r['r2_c'] for r in rows):>7.4f} "
          f"{'':>10} {max(r['held_err'] for r in rows):>13.1f}% (max)")


def _span(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 \
        else ",".join(map(str, seeds))


if __name__ == "__main__":
    main()
