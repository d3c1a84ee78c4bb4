"""Benchmark of analysis.fit on Epoch AI's Chinchilla data (not a test).

Measures, on the 240 points of ../shared/data/chinchilla (5 highest losses dropped,
D = C / (6 N)), in ONE run so that both see the same machine load:

- the 4,500-start grid fit (``fit("chinchilla", ...)`` with ``default_grid``: screening,
  batched L-BFGS of the survivors, scipy polish), and
- a plain per-start scipy L-BFGS-B loop (same objective, same preconditioning) over a
  random sample of the grid's starts (or all 4,500), extrapolated to 4,500,

alternating: grid fit, loop chunk, grid fit, loop chunk, ... (``--rounds`` of each; the
sample is split into that many chunks). Reports wall and process-CPU times, the ratio
(loop time for 4,500 starts / grid fit time), overall and per round, and the load
average (os.getloadavg) before and after. Then, once each: the exhaustive batched fit
(every start run to convergence: the previous algorithm) and a K-resample bootstrap.

Usage: .venv/bin/python bench/bench_fit.py [--rounds 5] [--loop-sample 500] [--bootstrap 1000]
(``--loop-sample 0``: all 4,500 starts.) Run it with OMP_NUM_THREADS=1.
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

from analysis.fit import _multistart, _problem, bootstrap, default_grid, fit, objective_and_grad  # noqa: E402
from analysis.laws import get_law  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "chinchilla" / "svg_extracted_data.csv"
GRID = 4500


def load():
    """Epoch AI's 240 Chinchilla points: inputs {n, d} and loss."""
    df = pd.read_csv(DATA).sort_values("loss").iloc[:-5]
    n = df["Model Size"].to_numpy(float)
    return {"n": n, "d": df["Training FLOP"].to_numpy(float) / (6 * n)}, df["loss"].to_numpy(float)


def clocks(fn):
    """fn()'s result, wall seconds and process-CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def loop_starts(inputs, y, sample: int, seed: int = 0):
    """The preconditioned starts of the plain loop (all, or a seeded random sample)
    and the scipy objective on one start."""
    law = get_law("chinchilla")
    grid = default_grid(law, inputs, y)
    if 0 < sample < len(grid):
        grid = grid[np.random.default_rng(seed).choice(len(grid), sample, replace=False)]
    M, designs, logy = _problem(law, inputs, y)

    def one(th):
        f, g = objective_and_grad(th[None, :], designs, logy, 1e-3)
        return float(f[0]), g[0]

    return np.linalg.solve(M, grid.T).T, one


def scipy_loop(starts, one) -> float:
    """Plain scipy L-BFGS-B from each start in turn; the best objective."""
    from scipy.optimize import minimize

    return min(minimize(one, s, jac=True, method="L-BFGS-B").fun for s in starts)


def loadavg() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def alternate(inputs, y, rounds: int, sample: int):
    """Grid fit and loop chunk in turn; per round (grid wall, grid cpu, loop wall,
    loop cpu, starts), the last fit and the loop's best objective."""
    starts, one = loop_starts(inputs, y, sample)
    chunks = np.array_split(starts, rounds)
    rows, res, best = [], None, np.inf
    for chunk in chunks:
        res, gw, gc = clocks(lambda: fit("chinchilla", inputs, y))
        b, lw, lc = clocks(lambda: scipy_loop(chunk, one))
        best = min(best, b)
        rows.append((gw, gc, lw, lc, len(chunk)))
    return rows, res, best


def report(rows, res, best) -> None:
    """Print the alternated timings, per round and overall, and the ratio."""
    for i, (gw, gc, lw, lc, k) in enumerate(rows, 1):
        print(f"  round {i}: grid fit {gw:.3f} s (cpu {gc:.3f}); loop {k} starts {lw:.2f} s "
              f"({1000 * lw / k:.2f} ms/start, cpu {1000 * lc / k:.2f}) -> ratio {lw / k * GRID / gw:.0f}x")
    gw = [r[0] for r in rows]
    gc = [r[1] for r in rows]
    k = sum(r[4] for r in rows)
    per_w, per_c = sum(r[2] for r in rows) / k, sum(r[3] for r in rows) / k
    print(f"grid fit ({len(rows)} runs): median {statistics.median(gw):.3f} s, best {min(gw):.3f} s, "
          f"all {[round(t, 3) for t in gw]}; cpu median {statistics.median(gc):.3f} s")
    print(f"  objective {res.objective:.8f} (published best grid fit 0.00101827), n_starts {res.n_starts}")
    print("  params " + ", ".join(f"{name}={v:.5g}" for name, v in res.params.items()))
    print(f"plain scipy L-BFGS-B loop: {k} starts, {1000 * per_w:.2f} ms/start wall ({1000 * per_c:.2f} cpu) "
          f"-> {per_w * GRID:.1f} s for 4,500 ({per_c * GRID:.1f} cpu); best objective in sample {best:.8f}")
    ratios = [r[2] / r[4] * GRID / r[0] for r in rows]
    print(f"RATIO loop(4,500) / grid fit: {per_w * GRID / statistics.median(gw):.0f}x wall "
          f"({per_c * GRID / statistics.median(gc):.0f}x cpu); per round median {statistics.median(ratios):.0f}x, "
          f"range {min(ratios):.0f}-{max(ratios):.0f}x")


def exhaustive(inputs, y) -> None:
    """Time every start run to convergence (the previous algorithm), once."""
    law = get_law("chinchilla")
    M, designs, logy = _problem(law, inputs, y)
    x0 = np.linalg.solve(M, default_grid(law, inputs, y).T).T
    (_, f, _), w, c = clocks(lambda: _multistart(x0, designs, logy, 1e-3, 1000, 4, exhaustive=True))
    print(f"exhaustive batched fit (all 4,500 starts to convergence): {w:.2f} s (cpu {c:.2f}), objective {f:.8f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loop-sample", type=int, default=500, help="random starts for the loop; 0 = all 4,500")
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    inputs, y = load()
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python {platform.python_version()} numpy {np.__version__} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"load average before (1/5/15 min): {loadavg()}")
    fit("chinchilla", inputs, y)  # warm-up: imports, caches
    report(*alternate(inputs, y, args.rounds, args.loop_sample))
    print(f"load average after the alternated runs: {loadavg()}")
    exhaustive(inputs, y)
    if args.bootstrap:
        res = fit("chinchilla", inputs, y)
        b, w, _ = clocks(lambda: bootstrap(res, inputs, y, k=args.bootstrap, seed=0))
        print(f"bootstrap K={args.bootstrap}: {w:.2f} s, {len(b.boot_thetas)} converged; 95% CI "
              + ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in b.ci.items()))
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
