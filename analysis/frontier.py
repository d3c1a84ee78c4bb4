"""The compute axis: the compute-optimal frontier and IsoFLOP minima (pure pandas/numpy).

Owns two ways to turn runs into compute-optimal points (Hoffmann et al. 2022):

- Approach 1, the frontier: the lowest validation loss reached with at most C training
  FLOPs, over all runs' curves (the POLAR paper's Fig. 4, right), so it never rises with
  C. ``pareto_frontier`` keeps the observed points no other point beats with less
  compute; ``envelope`` evaluates it on a log-spaced compute grid (evenly weighted
  points for a fit of L = a C^b) from each run's log-log interpolated curve.
- Approach 2, IsoFLOP: for each compute budget with at least 3 model sizes, a parabola
  of loss in log N and its minimum (``isoflop_minima``); a power law N_opt = k C^a
  through the usable minima, fitted by least squares in log space, with a t interval
  for the exponent (``fit_n_opt``) and a bootstrap over the runs' loss noise
  (``bootstrap_n_opt``). ``frontier_sizes`` gives Approach 1's N_opt: the size of the
  run that holds the frontier at each compute.

Curves are frames with CURVE_COLUMNS of polar/names.py (run_id, step, tokens_seen,
flops_seen, val_loss); records have n_params, compute, loss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["pareto_frontier", "envelope", "isoflop_minima", "group_budgets", "fit_n_opt", "bootstrap_n_opt",
           "frontier_sizes"]


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


MINIMA_COLUMNS = ["compute", "n_opt", "loss_opt", "n_sizes", "n_min", "n_max", "curvature", "p0", "p1", "p2",
                  "ok", "reason"]


def _budgets(records: pd.DataFrame, rtol: float, min_sizes: int):
    """(budget label, its rows) for the budgets with >= ``min_sizes`` model sizes."""
    need = {"n_params", "compute", "loss"}
    if not need <= set(records.columns):
        raise ValueError(f"records need columns {sorted(need)}; got {list(records.columns)}")
    r = records[["n_params", "compute", "loss"]].dropna()
    if r.empty:
        return []
    return [(label, g) for label, g in r.groupby(group_budgets(r["compute"], rtol))
            if g["n_params"].nunique() >= min_sizes]


def _vertex(u, p2, p1):
    """The parabola's minimum u* and why it is unusable ('' when it is usable)."""
    if not p2 > 0:
        return np.nan, "parabola opens downwards (no minimum)"
    u_opt = -p1 / (2 * p2)
    if not u.min() <= u_opt <= u.max():
        return u_opt, (f"minimum N = {np.exp(u_opt):.3g} outside the sizes tried "
                       f"({np.exp(u.min()):.3g} to {np.exp(u.max()):.3g})")
    return u_opt, ""


def isoflop_minima(records: pd.DataFrame, rtol: float = 0.05, min_sizes: int = 3) -> pd.DataFrame:
    """Per compute budget with >= ``min_sizes`` model sizes: fit L = p0 + p1 u + p2 u^2
    with u = ln N (least squares) and report its minimum. Budgets whose parabola opens
    downwards or whose minimum lies outside the sizes tried are reported with ``ok``
    False and the ``reason``; their n_opt is the vertex (NaN when it opens downwards).
    Columns MINIMA_COLUMNS (p0, p1, p2 in u = ln N; n_min, n_max the sizes tried).
    """
    rows = []
    for _, g in _budgets(records, rtol, min_sizes):
        u, y = np.log(g["n_params"].to_numpy(float)), g["loss"].to_numpy(float)
        p2, p1, p0 = np.polyfit(u, y, 2)
        u_opt, reason = _vertex(u, p2, p1)
        rows.append({
            "compute": float(np.exp(np.mean(np.log(g["compute"])))),
            "n_opt": float(np.exp(u_opt)) if np.isfinite(u_opt) else np.nan,
            "loss_opt": float(p0 + p1 * u_opt + p2 * u_opt ** 2) if np.isfinite(u_opt) else np.nan,
            "n_sizes": int(g["n_params"].nunique()), "n_min": float(np.exp(u.min())), "n_max": float(np.exp(u.max())),
            "curvature": float(p2), "p0": float(p0), "p1": float(p1), "p2": float(p2),
            "ok": not reason, "reason": reason,
        })
    return pd.DataFrame(rows, columns=MINIMA_COLUMNS)


def _ols(x, y):
    """Slope, intercept, residual sd (NaN without a residual degree of freedom), Sxx."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * xm)
    dof = len(x) - 2
    s = float(np.sqrt(((y - intercept - slope * x) ** 2).sum() / dof)) if dof > 0 else np.nan
    return slope, intercept, s, sxx


def fit_n_opt(minima: pd.DataFrame, level: float = 0.95) -> dict | None:
    """N_opt = k C^a through the usable (``ok``) minima: least squares of ln N_opt on
    ln C. The exponent's interval is Student's t with n - 2 degrees of freedom (exact
    for normal errors in ln N_opt; None with 2 budgets, where no scatter is left to
    judge it). None with fewer than 2 usable budgets. Keys: k, a, a_ci, se_a, dof,
    n_budgets, compute, n_opt, r2_log, level, interval."""
    from scipy import stats

    ok = minima[minima["ok"].astype(bool)] if len(minima) else minima
    if len(ok) < 2 or ok["compute"].nunique() < 2:
        return None
    lc, ln = np.log(ok["compute"].to_numpy(float)), np.log(ok["n_opt"].to_numpy(float))
    a, b0, s, sxx = _ols(lc, ln)
    dof = len(ok) - 2
    out = {"k": float(np.exp(b0)), "a": a, "a_ci": None, "se_a": None, "dof": dof, "n_budgets": int(len(ok)),
           "compute": ok["compute"].tolist(), "n_opt": ok["n_opt"].tolist(), "level": level,
           "r2_log": None, "interval": "2 budgets leave no degree of freedom for a t interval"}
    if dof > 0:
        se = s / np.sqrt(sxx)
        t = float(stats.t.ppf(0.5 + level / 2, dof))
        ss_tot = float(((ln - ln.mean()) ** 2).sum())
        out.update(a_ci=[a - t * se, a + t * se], se_a=float(se), r2_log=1 - s ** 2 * dof / ss_tot if ss_tot > 0 else None,
                   interval=f"Student t, {dof} degree(s) of freedom (t = {t:.3g}) on the least-squares slope")
    return out


def bootstrap_n_opt(records: pd.DataFrame, *, k: int = 200, seed: int = 0, level: float = 0.95,
                    rtol: float = 0.05, min_sizes: int = 3) -> dict | None:
    """The exponent a of N_opt = k C^a under the runs' loss noise alone: each resample
    adds to every budget's fitted parabola residuals drawn (with replacement) from all
    budgets' residuals (pooled, scaled by sqrt(n / (n - 3 budgets))), refits the
    parabolas, drops the budgets that are not usable in that resample, and refits the
    line. Scatter of the minima about the line beyond what loss noise explains is not
    in it (``fit_n_opt``'s t interval has it). None without residual degrees of freedom
    or fewer than 2 budgets. Keys: a_ci, level, k (resamples used), k_asked."""
    budgets = _budgets(records, rtol, min_sizes)
    if len(budgets) < 2:
        return None
    fitted, resid, us, cs = [], [], [], []
    for _, g in budgets:
        u, y = np.log(g["n_params"].to_numpy(float)), g["loss"].to_numpy(float)
        p = np.polyfit(u, y, 2)
        fitted.append(np.polyval(p, u))
        resid.append(y - fitted[-1])
        us.append(u)
        cs.append(float(np.exp(np.mean(np.log(g["compute"])))))
    pooled = np.concatenate(resid)
    dof = len(pooled) - 3 * len(budgets)
    if dof <= 0 or not np.any(pooled):
        return None
    pooled = pooled * np.sqrt(len(pooled) / dof)
    rng = np.random.default_rng(seed)
    verts = np.full((len(budgets), k), np.nan)
    for i, (u, f) in enumerate(zip(us, fitted)):
        ys = f[:, None] + rng.choice(pooled, size=(len(u), k))
        p2, p1, _ = np.polyfit(u, ys, 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = -p1 / (2 * p2)
        inside = (p2 > 0) & (v >= u.min()) & (v <= u.max())
        verts[i, inside] = v[inside]
    lc = np.log(cs)
    slopes = []
    for j in range(k):
        m = np.isfinite(verts[:, j])
        if m.sum() >= 2 and np.ptp(lc[m]) > 0:
            slopes.append(_ols(lc[m], verts[m, j])[0])
    if len(slopes) < max(10, k // 2):
        return None
    lo, hi = np.quantile(slopes, [0.5 - level / 2, 0.5 + level / 2])
    return {"a_ci": [float(lo), float(hi)], "level": level, "k": len(slopes), "k_asked": k}


def frontier_sizes(frontier: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Approach 1's N_opt: at each frontier point, the size of the run that holds it.
    Columns compute, n_params, run_id (frontier points whose run is unknown are dropped)."""
    if not len(frontier) or "run_id" not in frontier.columns:
        return pd.DataFrame(columns=["compute", "n_params", "run_id"])
    sizes = records.drop_duplicates("run_id").set_index("run_id")["n_params"]
    f = frontier[frontier["run_id"].isin(sizes.index)]
    return pd.DataFrame({"compute": f["compute"].to_numpy(float), "n_params": sizes.loc[f["run_id"]].to_numpy(float),
                         "run_id": f["run_id"].to_numpy()})
