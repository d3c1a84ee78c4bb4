"""Figures from records and fits (matplotlib, Agg; no I/O beyond saving the PNG).

Owns the pictures of a scaling study, each a function ``plot_*(..., path) -> path``:

- ``plot_loss_vs_params``: final validation loss against parameters (log-log), the
  fitted law and its bootstrap confidence band (POLAR Fig. 4, left);
- ``plot_loss_vs_compute``: every run's validation curve against training FLOPs,
  coloured by model size, the compute-optimal frontier and its fit (Fig. 4, right);
- ``plot_isoflops``: loss against N per compute budget, each budget's parabola and its
  minimum; beside it N_opt against C with the fitted power law (Approach 2) and the
  frontier's sizes (Approach 1);
- ``plot_residuals``: log residuals of each fit against its x.

matplotlib is imported inside the functions; figures are ``Figure`` objects, never
pyplot state, so nothing leaks between calls or threads.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["PARAM_LABELS", "plot_loss_vs_params", "plot_loss_vs_compute", "plot_isoflops", "plot_loss_vs_tokens",
           "plot_residuals", "fit_label"]

_DPI = 130

# the axis label of N for each parameter count (analysis.records.PARAM_COUNTS)
PARAM_LABELS = {"all": "parameters N (count, embeddings included)",
                "nonembed": "non-embedding parameters N (count)"}


def _figure(width=6.4, height=4.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, path) -> str:
    fig.savefig(path)
    return os.fspath(path)


def fit_label(result, x_symbol: str) -> str:
    """'L = 0.9 N^-0.0425 (R² = 0.989)' for a power fit; the law's formula otherwise."""
    p = result.params
    if result.law == "power":
        return f"L = {p['a']:.3g} {x_symbol}^{p['b']:.4f}  (R² = {result.r2:.4f})"
    if result.law == "saturating":
        return f"L = {p['E']:.3g} + {p['A']:.3g} {x_symbol}^-{p['alpha']:.3f}  (R² = {result.r2:.4f})"
    return f"{result.law} fit (R² = {result.r2:.4f})"


def _grid(values, pad=1.5, n=200):
    v = np.asarray(values, float)
    return np.geomspace(v.min() / pad, v.max() * pad, n)


def plot_loss_vs_params(records: pd.DataFrame, result, path, *, band: tuple | None = None,
                        xlabel: str = PARAM_LABELS["all"], title: str | None = None) -> str:
    """Final loss against N (column n_params), the fit over a padded range, ``band`` = (grid, lo, hi)."""
    fig, ax = _figure()
    xs = records["n_params"].to_numpy(float)
    if "n_seeds" in records.columns and (records["n_seeds"] > 1).any():
        ax.errorbar(xs, records["loss"], yerr=records["loss_std"], fmt="o", ms=6, color="C0", zorder=3,
                    capsize=3, label="runs (final val loss, mean ± sd over seeds)")
    else:
        ax.scatter(xs, records["loss"], s=36, color="C0", zorder=3, label="runs (final val loss)")
    g = _grid(xs)
    ax.plot(g, result.predict(x=g), color="C3", lw=1.8, label=fit_label(result, "N"))
    if band is not None:
        bg, lo, hi = band
        level = int(round(100 * (result.ci_level or 0.95)))
        ax.fill_between(bg, lo, hi, color="C3", alpha=0.18, lw=0, label=f"{level}% confidence band (bootstrap)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats / pair)")
    ax.set_title(title or "Loss against model size")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_compute(curves: pd.DataFrame, records: pd.DataFrame, frontier: pd.DataFrame,
                         result, path, *, title: str | None = None, n_label: str = PARAM_LABELS["all"]) -> str:
    """Every run's val-loss curve against FLOPs, coloured by N, the frontier points and their fit."""
    from matplotlib import cm, colors

    fig, ax = _figure(7.2, 4.8)
    sizes = records.set_index("run_id")["n_params"] if len(records) else pd.Series(dtype=float)
    norm = colors.LogNorm(vmin=max(sizes.min(), 1), vmax=max(sizes.max(), 2)) if len(sizes) else None
    cmap = cm.viridis
    for run_id, g in curves[curves["flops_seen"] > 0].groupby("run_id", sort=False):
        n = sizes.get(run_id, np.nan)
        color = cmap(norm(n)) if norm is not None and np.isfinite(n) else "0.6"
        ax.plot(g["flops_seen"], g["val_loss"], color=color, lw=1.1, alpha=0.85)
    if norm is not None:
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax, label=n_label)
    if len(frontier):
        ax.scatter(frontier["compute"], frontier["loss"], s=14, color="k", zorder=4, label="frontier (lower envelope)")
    if result is not None and len(frontier):
        g = _grid(frontier["compute"], pad=1.2)
        ax.plot(g, result.predict(x=g), color="C3", lw=1.8, ls="--", label=fit_label(result, "C"))
    return _loss_axes(fig, ax, "training compute C (FLOPs)", title or "Loss against compute, compute-optimal frontier",
                      path)


def plot_isoflops(records: pd.DataFrame, minima: pd.DataFrame, path, *, n_opt_fit: dict | None = None,
                  frontier_sizes: pd.DataFrame | None = None, rtol: float = 0.05, title: str | None = None,
                  n_label: str = PARAM_LABELS["all"]) -> str:
    """Left: loss against N per compute budget (one colour each), its fitted parabola
    in ln N and its minimum (a star; a budget not used is drawn dashed, without its
    vertex, and the legend says why). Right: the usable minima N_opt against C,
    the fitted N_opt = k C^a (``n_opt_fit``, frontier.fit_n_opt's dict) and, where
    given, Approach 1's points (``frontier_sizes``: compute, n_params)."""
    from matplotlib.figure import Figure

    from analysis.frontier import group_budgets

    fig = Figure(figsize=(11.5, 4.6), dpi=_DPI, layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    r = records.dropna(subset=["n_params", "compute", "loss"])
    labels = group_budgets(r["compute"], rtol) if len(r) else np.array([], int)
    budgets = {float(np.exp(np.mean(np.log(g["compute"])))): g for _, g in r.groupby(labels)}
    for i, m in enumerate(minima.sort_values("compute").to_dict(orient="records")):
        color = f"C{i % 10}"
        g = next((g for c, g in budgets.items() if abs(c / m["compute"] - 1) <= rtol), None)
        ok = bool(m["ok"])
        why = "" if ok else (" (not used: opens downwards)" if "downwards" in str(m.get("reason", ""))
                             else " (not used: minimum outside sizes)")
        tag = f"C = {m['compute']:.2g} FLOPs{why}"
        if g is not None:
            ax.scatter(g["n_params"], g["loss"], s=22, color=color, zorder=3, label=tag)
        if {"p0", "p1", "p2"} <= set(m) and np.isfinite(m["p2"]):
            u = np.linspace(np.log(m["n_min"]) - 0.25, np.log(m["n_max"]) + 0.25, 100)
            ax.plot(np.exp(u), m["p0"] + m["p1"] * u + m["p2"] * u ** 2, color=color, lw=1.3, ls="-" if ok else "--")
        if ok:   # an unusable vertex is in the table, not drawn (it may lie far outside the sizes)
            ax.scatter([m["n_opt"]], [m["loss_opt"]], marker="*", s=150, zorder=5, color=color, edgecolor="k",
                       linewidths=0.8)
    ax.scatter([], [], marker="*", s=150, color="0.5", edgecolor="k", label="parabola minimum (used)")
    ax.set_xscale("log")
    ax.set_xlabel(n_label)
    ax.set_ylabel("final validation loss (nats / pair)")
    ax.set_title(title or "IsoFLOP curves: a parabola in ln N per budget")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    _plot_n_opt(ax2, minima, n_opt_fit, frontier_sizes)
    return _save(fig, path)


def _plot_n_opt(ax, minima: pd.DataFrame, fit: dict | None, frontier_sizes: pd.DataFrame | None) -> None:
    ok = minima[minima["ok"].astype(bool)] if len(minima) else minima
    if frontier_sizes is not None and len(frontier_sizes):
        ax.scatter(frontier_sizes["compute"], frontier_sizes["n_params"], s=10, color="0.6", zorder=2,
                   label="Approach 1: size of the run on the frontier")
    if len(ok):
        ax.scatter(ok["compute"], ok["n_opt"], marker="*", s=150, color="C3", edgecolor="k", zorder=4,
                   label="Approach 2: parabola minima")
    if fit is not None:
        c = np.geomspace(min(fit["compute"]) / 1.5, max(fit["compute"]) * 1.5, 50)
        ci = fit.get("a_ci")
        extra = f", {int(round(100 * fit['level']))}% CI {ci[0]:.2f} to {ci[1]:.2f}" if ci else ""
        ax.plot(c, fit["k"] * c ** fit["a"], color="C3", lw=1.6, label=f"N_opt = {fit['k']:.3g} C^{fit['a']:.3f}{extra}")
        fr = fit.get("frontier")
        if fr:
            c = np.geomspace(*fr.get("compute_range", (c[0], c[-1])), 50)
            ax.plot(c, fr["k"] * c ** fr["a"], color="0.5", lw=1.2, ls="--", label=f"Approach 1: N ∝ C^{fr['a']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("compute-optimal parameters N_opt")
    ax.set_title("N_opt against C")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_loss_vs_tokens(points: pd.DataFrame, result, path, *, title: str | None = None,
                        n_label: str = PARAM_LABELS["all"]) -> str:
    """The converged points (run ends filled, WSD decay points open) against tokens, one
    colour per model size, with the fitted L(N, D) at each size."""
    from matplotlib import cm, colors

    fig, ax = _figure(7.2, 4.8)
    norm = colors.LogNorm(vmin=points["n_params"].min(), vmax=max(points["n_params"].max(), points["n_params"].min() * 2))
    for n, g in points.groupby("n_params"):
        color = cm.viridis(norm(n))
        decay = g["point"] == "decay" if "point" in g else pd.Series(False, index=g.index)
        ax.scatter(g.loc[~decay, "tokens"], g.loc[~decay, "loss"], s=26, color=color, zorder=3)
        ax.scatter(g.loc[decay, "tokens"], g.loc[decay, "loss"], s=26, facecolor="none", edgecolor=color, zorder=3)
        d = _grid(g["tokens"], pad=1.2)
        ax.plot(d, result.predict(n=np.full_like(d, n), d=d), color=color, lw=1.2)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cm.viridis), ax=ax, label=n_label)
    p = result.params
    ax.plot([], [], color="0.4", label=f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}")
    ax.scatter([], [], s=26, color="0.4", label="run end")
    ax.scatter([], [], s=26, facecolor="none", edgecolor="0.4", label="WSD decay point")
    return _loss_axes(fig, ax, "training tokens D", title or "Loss against tokens, L(N, D)", path)


def _loss_axes(fig, ax, xlabel: str, title: str, path) -> str:
    """Log-log axes of validation loss against xlabel, titled, gridded, with a legend; saved."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats / pair)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_residuals(series: Mapping[str, tuple], path) -> str:
    """One panel per fit: ``name -> (x values, fit result, x label)``; log residuals
    (log fitted - log observed) in percent against x."""
    from matplotlib.figure import Figure

    k = max(1, len(series))
    fig = Figure(figsize=(5.2 * k, 3.8), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, k))
    for ax, (name, (xv, result, xlabel)) in zip(axes, series.items()):
        ax.axhline(0, color="0.4", lw=1)
        ax.scatter(xv, 100 * np.asarray(result.residuals_log), s=24, color="C0")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("log residual (fit - observed, %)")
        ax.set_title(f"{name}: MAPE {result.mape:.2f} %")
        ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)
