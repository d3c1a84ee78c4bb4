"""Robust scaling-law fitting: log space, Huber loss, vectorised multi-start L-BFGS.

Owns how a law (analysis/laws.py) is fitted to points and how sure we are of it:

- ``fit``: minimise sum_i Huber_delta(log Lhat_i - log L_i) (delta = 1e-3 by default),
  the objective of Hoffmann et al. 2022 and Epoch AI's replication, from a grid of
  starting points. The grid is screened (the objective at every start in one
  vectorised call; the best 512 take 5 batched L-BFGS steps; the best 32 distinct
  iterates go on), the survivors run to convergence at once in a batched numpy
  L-BFGS (one matrix product per term per step, no Python loop over starts), and the
  best few distinct optima are polished with scipy's L-BFGS-B. A fit whose best
  optimum is not a stationary point raises ``FitError`` instead of returning numbers.
- goodness of fit: R^2 on L and on log L, MAPE (percent), the objective, n.
- ``bootstrap``: percentile CIs of every parameter from K resamples of the points
  (seeded); all resamples are again fitted in one batch (as per-point weights).
- ``prediction_interval`` for target inputs and ``holdout`` validation (fit on the
  smaller models, predict the larger ones: n, MAPE, max APE, interval coverage).
- CLI: ``python -m analysis.fit --csv FILE --law power|saturating|chinchilla ...``.

Inputs are plain arrays (``x``; or ``n``, ``d`` for chinchilla); ``records_inputs``
turns a ScalingRecord frame (analysis/records.py) into them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from analysis.laws import Law, get_law

__all__ = [
    "FitError",
    "FitResult",
    "huber",
    "objective_and_grad",
    "batched_lbfgs",
    "default_grid",
    "validate_inputs",
    "records_inputs",
    "fit",
    "fit_records",
    "bootstrap",
    "confidence_band",
    "prediction_interval",
    "holdout",
    "json_safe",
    "main",
]

X_CHOICES = ("n_params", "compute")


class FitError(ValueError):
    """Bad input to a fit, or a fit that did not converge."""


@dataclass(frozen=True)
class FitResult:
    """A fitted law; ``theta`` are the log-space coordinates of ``params``."""

    law: str
    params: dict[str, float]
    theta: np.ndarray
    objective: float
    r2: float
    r2_log: float
    mape: float  # percent
    n: int
    seconds: float
    delta: float
    n_starts: int
    residuals_log: np.ndarray  # log Lhat - log L at the fitted points
    ci: dict[str, tuple[float, float]] | None = None
    ci_level: float | None = None
    boot_thetas: np.ndarray | None = field(default=None, repr=False)

    def predict(self, **inputs) -> np.ndarray:
        return get_law(self.law).predict(self.params, **inputs)

    def to_dict(self) -> dict:
        out = {
            "law": self.law,
            "params": dict(self.params),
            "objective": self.objective,
            "r2": self.r2,
            "r2_log": self.r2_log,
            "mape": self.mape,
            "n": self.n,
            "seconds": self.seconds,
        }
        if self.ci is not None:
            out["ci"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()}
        return out


# ---------------------------------------------------------------- objective

def huber(r, delta: float):
    """Huber loss: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


_CHUNK_ELEMENTS = 32768  # rows x points per block: keeps the temporaries in cache


def objective_and_grad(theta, designs, logy, delta: float, weights=None):
    """Batched Huber objective in log space and its gradient.

    theta (S, P); designs: list of (n, P) term matrices; logy (n,); weights (S, n) or
    None. Returns f (S,) and grad (S, P). Evaluated in blocks of rows whose
    temporaries fit in cache (about 10x faster than one big block).
    """
    theta = np.atleast_2d(np.asarray(theta, dtype=float))
    rows = max(1, _CHUNK_ELEMENTS // max(1, len(logy)))
    if theta.shape[0] <= rows:
        return _objective_block(theta, designs, logy, delta, weights)
    f = np.empty(theta.shape[0])
    g = np.empty_like(theta)
    for i in range(0, theta.shape[0], rows):
        w = None if weights is None else weights[i:i + rows]
        f[i:i + rows], g[i:i + rows] = _objective_block(theta[i:i + rows], designs, logy, delta, w)
    return f, g


def _objective_block(theta, designs, logy, delta, weights):
    ts = [theta @ z.T for z in designs]
    if len(ts) == 1:
        lse, exps, total = ts[0], None, None
    else:
        lse, exps, total = _log_sum_exp(ts)
    r = lse - logy
    u = np.minimum(np.maximum(r, -delta), delta)  # Huber slope
    h = u * (r - 0.5 * u)  # = Huber(r): r^2/2 inside, delta (|r| - delta/2) outside
    if weights is not None:
        h *= weights
        u *= weights
    f = h.sum(axis=1)
    if exps is None:
        return f, u @ designs[0]
    u /= total
    g = (u * exps[0]) @ designs[0]
    for e, z in zip(exps[1:], designs[1:]):
        g += (u * e) @ z
    return f, g


def _log_sum_exp(ts):
    """Stable LSE over terms (per-point max shift); also the exps and their sum."""
    m = np.maximum(ts[0], ts[1])
    for t in ts[2:]:
        np.maximum(m, t, out=m)
    exps = [np.exp(t - m, out=t) for t in ts]  # reuse the buffers
    total = exps[0] + exps[1]
    for e in exps[2:]:
        total += e
    lse = np.log(total)
    lse += m
    return lse, exps, total


# ---------------------------------------------------------------- batched L-BFGS

def batched_lbfgs(
    fun: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    x0: np.ndarray,
    *,
    maxiter: int = 1000,
    history: int = 10,
    gtol: float = 1e-10,
    ftol: float = 1e-10,
    max_halvings: int = 40,
):
    """Minimise S independent problems at once with L-BFGS and backtracking (Armijo).

    ``fun(x, rows)`` evaluates the problems ``rows`` (indices into the batch) at x
    (len(rows), P) and returns (f, grad). Problems leave the active set when their
    gradient is below ``gtol`` (max norm), their relative decrease stays below ``ftol``
    for 3 steps, or the line search cannot decrease f. Returns x, f, g, converged
    (bool, S) and the number of iterations.
    """
    x = np.array(x0, dtype=float)
    S, P = x.shape
    rows = np.arange(S)
    f, g = fun(x, rows)
    s_hist = np.zeros((history, S, P))
    y_hist = np.zeros((history, S, P))
    rho = np.zeros((history, S))
    gamma = np.zeros(S)
    stall = np.zeros(S, dtype=int)
    tlast = np.ones(S)
    converged = np.max(np.abs(g), axis=1) <= gtol
    active = np.isfinite(f) & ~converged
    it = 0
    for it in range(1, maxiter + 1):
        a = np.flatnonzero(active)
        if a.size == 0:
            break
        slots = [(it - 1 - j) % history for j in range(1, min(it, history + 1))]
        ga = g[a]
        d = -_two_loop(ga, s_hist[:, a], y_hist[:, a], rho[:, a], gamma[a], slots)
        gd = np.einsum("ij,ij->i", ga, d)
        bad = ~(gd < 0)
        if bad.any():
            d[bad] = -ga[bad] / np.maximum(np.linalg.norm(ga[bad], axis=1), 1e-300)[:, None]
            gd[bad] = np.einsum("ij,ij->i", ga[bad], d[bad])
            rho[:, a[bad]] = 0.0
        # start from twice the last accepted step (capped at 1): fewer failed trials
        xn, fn, gn, ok, tacc = _backtrack(fun, a, x[a], f[a], d, gd, np.minimum(1.0, 2 * tlast[a]), max_halvings)
        tlast[a] = np.where(ok, tacc, tlast[a])
        _remember((it - 1) % history, a, xn - x[a], gn - ga, ok, s_hist, y_hist, rho, gamma)
        rel = (f[a] - fn) / np.maximum(np.maximum(np.abs(f[a]), np.abs(fn)), 1e-300)
        stall[a] = np.where(ok & (rel <= ftol), stall[a] + 1, 0)
        x[a], f[a], g[a] = np.where(ok[:, None], xn, x[a]), np.where(ok, fn, f[a]), np.where(ok[:, None], gn, ga)
        small = np.max(np.abs(g[a]), axis=1) <= gtol
        converged[a] = small | (stall[a] >= 3)
        active[a] = ok & ~converged[a]
        # a failed line search ends the problem; it counts as converged only if flat
        converged[a] |= ~ok & (np.max(np.abs(g[a]), axis=1) <= np.sqrt(gtol))
    return x, f, g, converged, it


def _remember(slot, a, s, y, ok, s_hist, y_hist, rho, gamma) -> None:
    """Store the step s and gradient change y of problems `a` in history slot `slot`
    (in place); a step without positive curvature is stored as zeros (skipped)."""
    sy = np.einsum("ij,ij->i", s, y)
    yy = np.einsum("ij,ij->i", y, y)
    good = ok & (yy > 1e-300) & (sy > 1e-12 * yy)
    s_hist[slot, a] = np.where(good[:, None], s, 0.0)
    y_hist[slot, a] = np.where(good[:, None], y, 0.0)
    rho[slot, a] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
    gamma[a] = np.where(good, sy / np.where(good, yy, 1.0), gamma[a])


def _two_loop(g, s_hist, y_hist, rho, gamma, slots):
    """L-BFGS two-loop recursion for a batch; slots are newest first."""
    q = g.copy()
    alphas = []
    for j in slots:
        al = rho[j] * np.einsum("ij,ij->i", s_hist[j], q)
        q -= al[:, None] * y_hist[j]
        alphas.append(al)
    scale = np.where(gamma > 0, gamma, 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300))
    r = q * scale[:, None]
    for j, al in zip(reversed(slots), reversed(alphas)):
        be = rho[j] * np.einsum("ij,ij->i", y_hist[j], r)
        r += s_hist[j] * (al - be)[:, None]
    return r


def _backtrack(fun, rows, x, f, d, gd, t0, max_halvings, c1=1e-4, per_round=3):
    """Batched Armijo backtracking; returns x, f, g, success and the step per row.

    Step t0 is tried first; rows that fail try ``per_round`` halvings in one call
    (t/2 ... t/2^per_round stacked), keeping the largest step that passes.
    """
    n, P = x.shape
    xn, fn, gn = x.copy(), f.copy(), np.zeros((n, P))
    ok = np.zeros(n, dtype=bool)
    todo = np.arange(n)
    t = np.array(t0, dtype=float)
    tacc = np.zeros(n)
    steps = np.ones(1)
    while todo.size and np.max(t[todo]) * steps[-1] >= 2.0 ** -max_halvings:
        k = steps.size
        tt = (t[todo, None] * steps[None, :]).ravel()
        idx = np.repeat(todo, k)
        xt = x[idx] + tt[:, None] * d[idx]
        ft, gt = fun(xt, rows[idx])
        acc = (np.isfinite(ft) & (ft <= f[idx] + c1 * tt * gd[idx])).reshape(-1, k)
        hit = acc.any(axis=1)
        first = np.argmax(acc, axis=1)
        sel = np.arange(todo.size) * k + first
        done = todo[hit]
        xn[done], fn[done], gn[done], ok[done] = xt[sel[hit]], ft[sel[hit]], gt[sel[hit]], True
        tacc[done] = tt[sel[hit]]
        t[todo] = t[todo] * steps[-1]
        todo = todo[~hit]
        steps = 0.5 ** np.arange(1, per_round + 1)
    return xn, fn, gn, ok, tacc


# ---------------------------------------------------------------- grids and inputs

def default_grid(law: Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray) -> np.ndarray:
    """Starting points (theta) for a law.

    chinchilla: Epoch AI's 4,500-point grid (alpha, beta in {0, .5, .., 2}; e in
    {-1, -.5, .., 1}; a, b in {0, 5, .., 25}). power: the least-squares line in log
    space plus a small grid around it. saturating: a grid scaled to the data (E a
    fraction of the smallest loss; A matched to the median point for each alpha).
    """
    if law.name == "chinchilla":
        ab = np.arange(0, 2.01, 0.5)
        es = np.arange(-1, 1.01, 0.5)
        amps = np.arange(0, 25.1, 5)
        pts = itertools.product(es, amps, amps, ab, ab)
        return np.array(list(pts), dtype=float)
    lx, ly = np.log(inputs["x"]), np.log(loss)
    if law.name == "power":
        b0, a0 = np.polyfit(lx, ly, 1) if len(lx) > 1 else (0.0, ly[0])
        grid = [(a0 + da, b0 + db) for da in (-2, 0, 2) for db in (-0.5, 0, 0.5)]
        return np.array([(a0, b0)] + grid, dtype=float)
    lmin, lmed, xmed = float(np.min(loss)), float(np.median(loss)), float(np.median(inputs["x"]))
    rows = []
    for frac in (0.02, 0.2, 0.5, 0.8, 0.95):
        e = np.log(frac * lmin)
        gap = max(lmed - frac * lmin, 1e-3 * lmed)
        for alpha in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
            for da in (-1.0, 0.0, 1.0):
                rows.append((e, np.log(gap) + alpha * np.log(xmed) + da, alpha))
    return np.array(rows, dtype=float)


def check_values(label: str, arr: np.ndarray) -> None:
    """Every value finite and > 0 (the fit is in log space); FitError naming `label` (an
    input of the law, or a data column) and the first bad rows."""
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise FitError(f"{label} has NaN or infinite values at rows {bad[:5].tolist()}; all values must be finite")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise FitError(
            f"{label} must be > 0 (the fit is in log space); got {float(arr[bad[0]])!r} at rows {bad[:5].tolist()}"
        )


def validate_inputs(law: Law, inputs: Mapping[str, Sequence[float]], loss, *, for_fit: bool = True):
    """Arrays as float64 after checking what a fit needs; raises FitError naming the issue.

    With ``for_fit`` False (points to predict) only the values are checked, not their count.
    """
    missing = [k for k in law.inputs if k not in inputs]
    if missing:
        raise FitError(f"law {law.name!r} needs inputs {list(law.inputs)}; missing {missing}")
    arrs = {k: np.asarray(inputs[k], dtype=float).ravel() for k in law.inputs}
    y = np.asarray(loss, dtype=float).ravel()
    for name, arr in list(arrs.items()) + [("loss", y)]:
        if arr.shape != y.shape:
            raise FitError(f"input {name!r} has {arr.size} values but loss has {y.size}")
        check_values(repr(name), arr)
    if for_fit and y.size < law.n_params:
        raise FitError(
            f"law {law.name!r} has {law.n_params} parameters {list(law.param_names)} but only "
            f"{y.size} points were given; need at least {law.n_params}"
        )
    if for_fit:
        need = law.n_params if law.inputs == ("x",) else 2
        for name, arr in arrs.items():
            distinct = np.unique(arr).size
            if distinct < need:
                raise FitError(
                    f"law {law.name!r} needs at least {need} distinct values of {name!r} to determine "
                    f"its exponents; got {distinct} ({np.unique(arr)[:5].tolist()})"
                )
        if law.name == "chinchilla":
            corr = np.corrcoef(np.log(arrs["n"]), np.log(arrs["d"]))[0, 1]
            if abs(corr) > 0.999:
                raise FitError(
                    f"law 'chinchilla' cannot separate N from D: log N and log D are collinear "
                    f"(correlation {corr:.4f}, e.g. a fixed tokens-per-parameter ratio); it needs runs "
                    "that vary D at fixed N (an IsoFLOP grid); fit 'power' or 'saturating' instead"
                )
    return arrs, y


_INPUT_COLUMNS = {"n": "n_params", "d": "tokens"}


def records_inputs(df, law: Law | str, x: str = "n_params") -> tuple[dict, np.ndarray]:
    """Fit inputs from a ScalingRecord frame: x = df[x] (or n, d = n_params, tokens)."""
    law = get_law(law) if isinstance(law, str) else law
    if x not in X_CHOICES:
        raise FitError(f"--x must be one of {list(X_CHOICES)}, got {x!r}")
    cols = [x, "loss"] if law.inputs == ("x",) else ["n_params", "tokens", "loss"]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise FitError(
            f"law {law.name!r} with x={x!r} needs columns {cols}; missing {missing} "
            f"(columns present: {list(df.columns)})"
        )
    for c in cols:                       # named as the data name them, not as the law does ('x')
        check_values(f"column {c!r}", df[c].to_numpy(float))
    if law.inputs == ("x",):
        return {"x": df[x].to_numpy(float)}, df["loss"].to_numpy(float)
    return {k: df[c].to_numpy(float) for k, c in _INPUT_COLUMNS.items()}, df["loss"].to_numpy(float)


# ---------------------------------------------------------------- fitting

def fit(
    law: Law | str,
    inputs: Mapping[str, Sequence[float]],
    loss,
    *,
    delta: float = 1e-3,
    grid: np.ndarray | None = None,
    maxiter: int = 1000,
    polish: int = 4,
) -> FitResult:
    """Fit ``law`` to the points; the best optimum reached from the starts (``grid``,
    default ``default_grid``) after screening them (``_select_starts``) and polishing.

    Raises FitError on bad input or when the best optimum is not stationary (for
    example when ``maxiter`` is too small).
    """
    t0 = time.perf_counter()
    law = get_law(law) if isinstance(law, str) else law
    if not delta > 0:
        raise FitError(f"delta must be > 0, got {delta!r}")
    arrs, y = validate_inputs(law, inputs, loss)
    starts = default_grid(law, arrs, y) if grid is None else np.atleast_2d(np.asarray(grid, float))
    if starts.shape[1] != law.n_params:
        raise FitError(f"grid must have {law.n_params} columns {list(law.theta_names)}, got {starts.shape[1]}")
    M, designs, logy = _problem(law, arrs, y)

    theta_p, fbest, gnorm = _multistart(np.linalg.solve(M, starts.T).T, designs, logy, delta, maxiter, polish)
    theta = M @ theta_p
    _check_converged(law, theta, fbest, gnorm, delta, len(y), maxiter)
    return _summarise(law, theta, fbest, arrs, y, delta, len(starts), time.perf_counter() - t0)


def fit_records(df, law: Law | str, x: str = "n_params", **kw) -> FitResult:
    """``fit`` on a ScalingRecord frame (columns n_params, tokens, compute, loss)."""
    law = get_law(law) if isinstance(law, str) else law
    inputs, y = records_inputs(df, law, x)
    return fit(law, inputs, y, **kw)


def _problem(law: Law, arrs, y):
    """Preconditioned designs: theta = M theta', each term's log-input column
    standardised (mean 0, sd 1) with its shift absorbed by the term's constant.
    Same objective, far better conditioned (log N ~ 20 otherwise dominates)."""
    designs = law.design(arrs)
    P = designs[0].shape[1]
    M = np.eye(P)
    for z in designs:
        sd = z.std(axis=0)
        const = [j for j in np.flatnonzero(sd == 0) if np.all(z[:, j] == 1)]
        if len(const) != 1:
            continue
        for j in np.flatnonzero(sd > 0):
            M[j, j] = 1.0 / sd[j]
            M[const[0], j] = -z[:, j].mean() / sd[j]
    return M, [z @ M for z in designs], np.log(y)


SCREEN_KEEP = 512   # starts kept after one vectorised evaluation of the objective at all
PROBE_ITERS = 5     # batched L-BFGS iterations on those before choosing which to finish
FINISH_KEEP = 32    # distinct probed iterates run to convergence
COINCIDE = 1e-2     # iterates this close (max norm, preconditioned coordinates) are one


def _multistart(x0, designs, logy, delta, maxiter, polish, exhaustive=False):
    """Best optimum from the starts x0 (preconditioned); returns theta', f, max |grad|.

    Screen, probe, finish (``_select_starts``), then polish the best few with scipy.
    ``exhaustive`` runs every start to convergence instead (the reference the screened
    path is tested against; the same optimum on the Chinchilla data and synthetic laws).
    """
    def fun(th, rows):
        return objective_and_grad(th, designs, logy, delta)

    if not exhaustive and len(x0) > FINISH_KEEP:
        chosen = _select_starts(fun, x0)
        x0 = chosen if len(chosen) else x0[:1]  # none finite: fails below, as before
    xs, fs, _, _, _ = batched_lbfgs(fun, x0, maxiter=maxiter)
    return _polish(xs, fs, designs, logy, delta, polish, maxiter)


def _select_starts(fun, x0):
    """The FINISH_KEEP most promising distinct starting points, advanced a few steps.

    Most grid starts are redundant (hundreds reach the same optimum) or hopeless
    (objective orders of magnitude above the rest). One vectorised evaluation ranks
    all of them and keeps the best SCREEN_KEEP; PROBE_ITERS L-BFGS iterations move
    those toward their basins; of the probed iterates, the best FINISH_KEEP whose
    positions do not coincide are returned (to be run to convergence).
    """
    f0, _ = fun(x0, np.arange(len(x0)))
    x0 = x0[_finite_order(f0)[:SCREEN_KEEP]]
    xs, fs, _, _, _ = batched_lbfgs(fun, x0, maxiter=PROBE_ITERS)
    return xs[_distinct(xs, _finite_order(fs), FINISH_KEEP, COINCIDE)]


def _finite_order(f):
    """Indices of the finite entries of f, best (smallest) first."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf), kind="stable")
    return order[np.isfinite(f[order])]


def _distinct(xs, order, k, tol):
    """Up to k indices from ``order`` (best first) whose rows of xs are pairwise more
    than ``tol`` apart (max norm): each coinciding group keeps its best member."""
    picked: list[int] = []
    for i in order:
        if not picked or np.min(np.max(np.abs(xs[picked] - xs[i]), axis=1)) > tol:
            picked.append(int(i))
            if len(picked) >= k:
                break
    return np.array(picked, dtype=int)


def _polish(xs, fs, designs, logy, delta, k, maxiter):
    """scipy L-BFGS-B from the k best distinct batch optima; returns the best."""
    from scipy.optimize import minimize

    order = _finite_order(fs)
    if not order.size:
        return xs[0], float("nan"), float("inf")
    picked = list(xs[_distinct(xs, order, k, 1e-6)])

    def one(th):
        f, g = objective_and_grad(th[None, :], designs, logy, delta)
        return float(f[0]), g[0]

    best = (picked[0], *one(picked[0]))
    for p in picked:
        res = minimize(one, p, jac=True, method="L-BFGS-B",
                       options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20})
        f, g = one(res.x)
        if np.isfinite(f) and f < best[1]:
            best = (res.x, f, g)
    return best[0], best[1], float(np.max(np.abs(best[2])))


def _check_converged(law, theta, f, gnorm, delta, n, maxiter):
    # The objective is a sum of n Huber terms whose slopes are at most delta per point
    # and per unit of a design feature; a gradient below 1e-4 of that scale is flat.
    tol = 1e-4 * delta * n
    if not (np.isfinite(f) and np.all(np.isfinite(theta))) or gnorm > tol:
        raise FitError(
            f"{law.name} fit did not converge within maxiter={maxiter}: best objective {f:.6g}, "
            f"max |gradient| {gnorm:.3g} > tolerance {tol:.3g}; try more iterations or other starts"
        )
    if np.max(np.abs(theta)) > 700:
        raise FitError(
            f"{law.name} fit diverged: log-space parameters {dict(zip(law.theta_names, np.round(theta, 2)))} "
            "overflow; the data do not determine this law (try the power law)"
        )


def _summarise(law, theta, f, arrs, y, delta, n_starts, seconds) -> FitResult:
    params = law.to_params(theta)
    pred = law.predict(params, **arrs)
    rlog = np.log(pred) - np.log(y)
    return FitResult(
        law=law.name, params=params, theta=np.asarray(theta, float), objective=float(f),
        r2=_r2(y, pred), r2_log=_r2(np.log(y), np.log(pred)),
        mape=float(100 * np.mean(np.abs(pred - y) / y)), n=int(y.size), seconds=float(seconds),
        delta=float(delta), n_starts=int(n_starts), residuals_log=rlog,
    )


def _r2(y, pred) -> float:
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    ss_res = float(np.sum((y - pred) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


# ---------------------------------------------------------------- uncertainty

def bootstrap(
    result: FitResult,
    inputs: Mapping[str, Sequence[float]],
    loss,
    *,
    k: int = 200,
    seed: int = 0,
    level: float = 0.95,
    maxiter: int = 1000,
) -> FitResult:
    """Percentile bootstrap CIs: refit K resamples of the points, all in one batch.

    Each resample is a vector of multiplicities on the original points; its fit starts
    at the full-data optimum. Returns ``result`` with ``ci``, ``ci_level`` and
    ``boot_thetas`` (K', P) set; raises FitError if fewer than half the resamples
    converge.
    """
    if k < 2:
        raise FitError(f"bootstrap needs k >= 2 resamples, got {k!r}")
    if not 0 < level < 1:
        raise FitError(f"level must be in (0, 1), got {level!r}")
    law = get_law(result.law)
    arrs, y = validate_inputs(law, inputs, loss)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(y.size, np.full(y.size, 1.0 / y.size), size=k).astype(float)
    M, designs, logy = _problem(law, arrs, y)

    def fun(th, rows):
        return objective_and_grad(th, designs, logy, result.delta, weights[rows])

    x0 = np.repeat(np.linalg.solve(M, result.theta)[None, :], k, axis=0)
    xs, fs, _, conv, _ = batched_lbfgs(fun, x0, maxiter=maxiter)
    keep = conv & np.isfinite(fs) & np.all(np.isfinite(xs), axis=1)
    if keep.sum() < k / 2:
        raise FitError(f"bootstrap: only {int(keep.sum())} of {k} resampled fits converged")
    thetas = xs[keep] @ M.T
    params = np.array([list(law.to_params(t).values()) for t in thetas])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.percentile(params, q, axis=0)
    ci = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(law.param_names)}
    return dataclasses.replace(result, ci=ci, ci_level=level, boot_thetas=thetas)


def confidence_band(result: FitResult, *, level: float = 0.95, **inputs):
    """Bootstrap band of the fitted curve (not of single runs) at the given inputs.

    Returns (lo, hi) arrays; needs ``result`` from ``bootstrap``.
    """
    if result.boot_thetas is None:
        raise FitError("confidence_band needs a bootstrapped result; call bootstrap() first")
    law = get_law(result.law)
    arrs = {k: np.atleast_1d(np.asarray(inputs[k], float)) for k in law.inputs}
    logp = law.log_predict(result.boot_thetas, law.design(arrs))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.exp(np.percentile(logp, q, axis=0))
    return lo, hi


def prediction_interval(result: FitResult, *, level: float = 0.95, seed: int = 0, **inputs):
    """Point prediction and a bootstrap prediction interval at the given inputs.

    Each bootstrap parameter draw predicts log L, plus one log residual of the full fit
    drawn at random (the scatter of single runs). Returns (pred, lo, hi) arrays.
    Needs ``result`` from ``bootstrap``.
    """
    if result.boot_thetas is None:
        raise FitError("prediction_interval needs a bootstrapped result; call bootstrap() first")
    law = get_law(result.law)
    arrs = {k: np.atleast_1d(np.asarray(inputs[k], float)) for k in law.inputs}
    designs = law.design(arrs)
    logp = law.log_predict(result.boot_thetas, designs)  # (K, m)
    rng = np.random.default_rng(seed)
    eps = rng.choice(result.residuals_log, size=logp.shape, replace=True)
    draws = logp - eps
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.exp(np.percentile(draws, q, axis=0))
    return law.predict(result.params, **arrs), lo, hi


def holdout(
    df,
    law: Law | str,
    above: float,
    *,
    x: str = "n_params",
    k: int = 200,
    seed: int = 0,
    level: float = 0.95,
    delta: float = 1e-3,
) -> dict:
    """Fit on rows with n_params <= above, predict the rest.

    Returns {"n", "mape", "max_ape", "coverage", "n_train", "level", "fit"} where mape
    and max_ape are in percent and coverage is the fraction of held-out losses inside
    the ``level`` prediction interval of a K-resample bootstrap.
    """
    law = get_law(law) if isinstance(law, str) else law
    if "n_params" not in df.columns:
        raise FitError("holdout splits on the column 'n_params', which the data lack")
    train, test = df[df["n_params"] <= above], df[df["n_params"] > above]
    if len(test) == 0:
        raise FitError(f"--holdout-above {above:g} leaves no rows to test: the largest n_params is {df['n_params'].max():g}")
    if len(train) < law.n_params:
        raise FitError(
            f"--holdout-above {above:g} leaves {len(train)} training rows; law {law.name!r} needs at least {law.n_params}"
        )
    res = fit_records(train, law, x=x, delta=delta)
    res = bootstrap(res, *records_inputs(train, law, x), k=k, seed=seed, level=level)
    t_inputs, t_y = records_inputs(test, law, x)
    validate_inputs(law, t_inputs, t_y, for_fit=False)
    pred, lo, hi = prediction_interval(res, level=level, seed=seed, **t_inputs)
    ape = 100 * np.abs(pred - t_y) / t_y
    return {
        "n": int(len(t_y)), "mape": float(ape.mean()), "max_ape": float(ape.max()),
        "coverage": float(np.mean((t_y >= lo) & (t_y <= hi))), "n_train": int(len(train)),
        "level": level, "fit": res,
    }


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.fit",
        description="Fit a scaling law to a CSV of runs (columns among n_params, tokens, compute, loss).",
    )
    p.add_argument("--csv", required=True, help="CSV file with columns among n_params, tokens, compute, loss")
    p.add_argument("--law", required=True, choices=["power", "saturating", "chinchilla"])
    p.add_argument("--x", default="n_params", choices=list(X_CHOICES), help="axis of one-variable laws")
    p.add_argument("--holdout-above", type=float, default=None, metavar="N",
                   help="fit on rows with n_params <= N and predict the rest")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K", help="bootstrap resamples for CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log residuals")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    return p


def run_cli(args) -> dict:
    """Everything the CLI does except printing; returns the JSON-able result."""
    from analysis.records import read_csv

    df = read_csv(args.csv)
    law = get_law(args.law)
    inputs, y = records_inputs(df, law, args.x)
    res = fit(law, inputs, y, delta=args.delta)
    if args.bootstrap:
        res = bootstrap(res, inputs, y, k=args.bootstrap, seed=args.seed)
    d = res.to_dict()
    out = {"law": d.pop("law"), "x": args.x if law.inputs == ("x",) else "n_params,tokens", **d}
    if args.holdout_above is not None:
        h = holdout(df, law, args.holdout_above, x=args.x, k=args.bootstrap or 200, seed=args.seed, delta=args.delta)
        out["holdout"] = {key: h[key] for key in ("n", "mape", "max_ape", "coverage")}
    return out


def _table(out: dict) -> str:
    lines = [f"law        {out['law']}   (x = {out['x']}, n = {out['n']} points)"]
    ci = out.get("ci", {})
    for name, v in out["params"].items():
        extra = f"   95% CI [{ci[name][0]:.6g}, {ci[name][1]:.6g}]" if name in ci else ""
        lines.append(f"  {name:<8} {v:>14.6g}{extra}")
    lines += [
        f"objective  {out['objective']:.6g}",
        f"R^2        {out['r2']:.4f}   (log space {out['r2_log']:.4f})",
        f"MAPE       {out['mape']:.3f} %",
        f"seconds    {out['seconds']:.2f}",
    ]
    if "holdout" in out:
        h = out["holdout"]
        lines.append(
            f"holdout    n={h['n']}  MAPE {h['mape']:.3f} %  max APE {h['max_ape']:.3f} %  "
            f"95% PI coverage {h['coverage']:.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = run_cli(args)
    except (FitError, ValueError, FileNotFoundError) as exc:
        msg = f"error: {exc}"
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"analysis.fit: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(out)) if args.json else _table(out))
    return 0


def json_safe(obj):
    """JSON has no NaN/inf: such values become null."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    sys.exit(main())
