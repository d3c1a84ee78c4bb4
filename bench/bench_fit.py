"""Benchmark of analysis.fit on Epoch AI's Chinchilla data (not a test).

Measures, on the 240 points of ../shared/data/chinchilla (5 highest losses dropped,
D = C / (6 N)):

- the full 4,500-start grid fit (batched L-BFGS over all starts, then scipy polish of
  the best few): wall time of each of ``--repeats`` runs, median and best;
- a 1,000-resample bootstrap of that fit (all resamples in one batch);
- for comparison, a plain scipy L-BFGS-B loop over a random sample of the starts,
  extrapolated to 4,500.

Usage: .venv/bin/python bench/bench_fit.py [--repeats 5] [--scipy-sample 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.fit import _problem, bootstrap, default_grid, fit, objective_and_grad  # noqa: E402
from analysis.laws import get_law  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "chinchilla" / "svg_extracted_data.csv"


def load():
    df = pd.read_csv(DATA).sort_values("loss").iloc[:-5]
    n = df["Model Size"].to_numpy(float)
    return {"n": n, "d": df["Training FLOP"].to_numpy(float) / (6 * n)}, df["loss"].to_numpy(float)


def scipy_loop(inputs, y, sample: int, seed: int = 0) -> tuple[float, float]:
    """Seconds per start of scipy L-BFGS-B (same objective, same preconditioning)."""
    from scipy.optimize import minimize

    law = get_law("chinchilla")
    grid = default_grid(law, inputs, y)
    starts = grid[np.random.default_rng(seed).choice(len(grid), sample, replace=False)]
    M, designs, logy = _problem(law, inputs, y)

    def one(th):
        f, g = objective_and_grad(th[None, :], designs, logy, 1e-3)
        return float(f[0]), g[0]

    t0 = time.perf_counter()
    best = np.inf
    for s in np.linalg.solve(M, starts.T).T:
        best = min(best, minimize(one, s, jac=True, method="L-BFGS-B").fun)
    return (time.perf_counter() - t0) / sample, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--scipy-sample", type=int, default=100)
    args = p.parse_args()
    inputs, y = load()
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python {platform.python_version()} numpy {np.__version__}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    fit("chinchilla", inputs, y)  # warm-up: imports, caches
    times, res = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = fit("chinchilla", inputs, y)
        times.append(time.perf_counter() - t0)
    print(f"4,500-start grid fit, {args.repeats} runs: median {statistics.median(times):.2f} s, "
          f"best {min(times):.2f} s, all {[round(t, 2) for t in times]}")
    print(f"  objective {res.objective:.8f} (published best grid fit 0.00101827)")
    print("  params " + ", ".join(f"{k}={v:.5g}" for k, v in res.params.items()))
    t0 = time.perf_counter()
    b = bootstrap(res, inputs, y, k=args.bootstrap, seed=0)
    print(f"bootstrap K={args.bootstrap}: {time.perf_counter() - t0:.2f} s, {len(b.boot_thetas)} converged; 95% CI "
          + ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in b.ci.items()))
    if args.scipy_sample:
        per, best = scipy_loop(inputs, y, args.scipy_sample)
        print(f"plain scipy L-BFGS-B loop: {per * 1000:.1f} ms per start on {args.scipy_sample} random starts "
              f"-> {per * 4500:.1f} s extrapolated to 4,500 (best objective in sample {best:.8f})")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
