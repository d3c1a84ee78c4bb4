"""The compute axis: the compute-optimal frontier and IsoFLOP minima (pure pandas/numpy).

Owns two ways to turn runs into compute-optimal points (Hoffmann et al. 2022):

- Approach 1, the frontier: the lowest validation loss reached with at most C training
  FLOPs, over all runs' curves (the POLAR paper's Fig. 4, right), so it never rises with
  C. ``pareto_frontier`` keeps the observed points no other point beats with less
  compute; ``envelope`` evaluates it on a log-spaced compute grid (evenly weighted
  points for a fit of L = a C^b) from each run's log-log interpolated curve.
- Approach 2, IsoFLOP: for each compute budget with at least 3 model sizes, a parabola
  of loss in log N and its minimum (``isoflop_minima``).

Curves are frames with CURVE_COLUMNS of polar/names.py (run_id, step, tokens_seen,
flops_seen, val_loss); records have n_params, compute, loss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["pareto_frontier", "envelope", "isoflop_minima", "group_budgets"]


def _usable(curves: pd.DataFrame) -> pd.DataFrame:
    need = {"run_id", "flops_seen", "val_loss"}
    missing = need - set(curves.columns)
    if missing:
        raise ValueError(f"curves need columns {sorted(need)}; missing {sorted(missing)}")
    c = curves[["run_id", "flops_seen", "val_loss"]].astype({"flops_seen": float, "val_loss": float})
    return c[np.isfinite(c["flops_seen"]) & np.isfinite(c["val_loss"]) & (c["flops_seen"] > 0) & (c["val_loss"] > 0)]


def pareto_frontier(curves: pd.DataFrame) -> pd.DataFrame:
    """Observed points on the lower envelope: each has a lower loss than every point
    with less or equal compute. Columns compute, loss, run_id; sorted by compute."""
    c = _usable(curves).sort_values(["flops_seen", "val_loss"], kind="stable")
    best = np.minimum.accumulate(c["val_loss"].to_numpy())
    prev = np.concatenate([[np.inf], best[:-1]])
    keep = c["val_loss"].to_numpy() < prev
    out = c[keep].rename(columns={"flops_seen": "compute", "val_loss": "loss"})
    return out[["compute", "loss", "run_id"]].reset_index(drop=True)


def envelope(curves: pd.DataFrame, n_points: int = 24, c_min: float | None = None) -> pd.DataFrame:
    """The lowest loss reached with at most C FLOPs, on ``n_points`` log-spaced C values.

    Each run's curve is interpolated linearly in (log C, log L) within its own compute
    range; a grid point takes the best of the runs that cover it and of every earlier
    grid point (a run that ended at less compute has shown that its loss is reachable:
    the frontier of compute-optimal loss never rises). The grid spans [c_min, largest
    compute], c_min defaulting to the smallest compute any run reaches after its first
    evaluation (a run's very first points are mostly initialisation). Columns
    compute, loss, run_id (the run that reached the point's loss).
    """
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    c = _usable(curves)
    if c.empty:
        return pd.DataFrame(columns=["compute", "loss", "run_id"])
    runs = [g.sort_values("flops_seen") for _, g in c.groupby("run_id", sort=False)]
    if c_min is None:
        c_min = min(float(g["flops_seen"].iloc[min(1, len(g) - 1)]) for g in runs)
    c_max = float(c["flops_seen"].max())
    if not c_max > c_min:
        return pareto_frontier(curves)
    grid = np.geomspace(c_min, c_max, n_points)
    best = np.full(n_points, np.inf)
    who = np.empty(n_points, dtype=object)
    for g in runs:
        lc, ll = np.log(g["flops_seen"].to_numpy()), np.log(g["val_loss"].to_numpy())
        inside = (np.log(grid) >= lc[0] - 1e-12) & (np.log(grid) <= lc[-1] + 1e-12)
        if not inside.any():
            continue
        vals = np.exp(np.interp(np.log(grid[inside]), lc, ll))
        idx = np.flatnonzero(inside)
        better = vals < best[idx]
        best[idx[better]] = vals[better]
        who[idx[better]] = g["run_id"].iloc[0]
    for i in range(1, n_points):          # the best so far: never rises with compute
        if not best[i] <= best[i - 1]:
            best[i], who[i] = best[i - 1], who[i - 1]
    ok = np.isfinite(best)
    return pd.DataFrame({"compute": grid[ok], "loss": best[ok], "run_id": who[ok]})


def group_budgets(compute, rtol: float = 0.05) -> np.ndarray:
    """Label compute values that agree within ``rtol`` (relative) with one budget id."""
    c = np.asarray(compute, dtype=float)
    order = np.argsort(c)
    labels = np.empty(len(c), dtype=int)
    label, anchor = -1, None
    for i in order:
        if anchor is None or c[i] > anchor * (1 + rtol):
            label, anchor = label + 1, c[i]
        labels[i] = label
    return labels


def isoflop_minima(records: pd.DataFrame, rtol: float = 0.05, min_sizes: int = 3) -> pd.DataFrame:
    """Per compute budget with >= ``min_sizes`` model sizes: fit L = p0 + p1 u + p2 u^2
    with u = log N and report its minimum. Budgets whose parabola opens downwards or
    whose minimum lies outside the sizes tried are reported with ``ok`` False.
    Columns compute, n_opt, loss_opt, n_sizes, curvature, ok.
    """
    cols = ["compute", "n_opt", "loss_opt", "n_sizes", "curvature", "ok"]
    need = {"n_params", "compute", "loss"}
    if not need <= set(records.columns):
        raise ValueError(f"records need columns {sorted(need)}; got {list(records.columns)}")
    r = records[list(need)].dropna()
    if r.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for _, g in r.groupby(group_budgets(r["compute"], rtol)):
        if g["n_params"].nunique() < min_sizes:
            continue
        u, y = np.log(g["n_params"].to_numpy(float)), g["loss"].to_numpy(float)
        p2, p1, p0 = np.polyfit(u, y, 2)
        u_opt = -p1 / (2 * p2) if p2 > 0 else np.nan
        ok = bool(p2 > 0 and u.min() <= u_opt <= u.max())
        rows.append({
            "compute": float(np.exp(np.mean(np.log(g["compute"])))),
            "n_opt": float(np.exp(u_opt)) if np.isfinite(u_opt) else np.nan,
            "loss_opt": float(p0 + p1 * u_opt + p2 * u_opt ** 2) if np.isfinite(u_opt) else np.nan,
            "n_sizes": int(g["n_params"].nunique()), "curvature": float(p2), "ok": ok,
        })
    return pd.DataFrame(rows, columns=cols)
