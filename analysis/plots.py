"""Figures from records and fits (matplotlib, Agg; no I/O beyond saving the PNG).

Owns the pictures of a scaling study, each a function ``plot_*(..., path) -> path``:

- ``plot_loss_vs_params``: final validation loss against parameters (log-log), the
  fitted law and its bootstrap confidence band (POLAR Fig. 4, left);
- ``plot_loss_vs_compute``: every run's validation curve against training FLOPs,
  coloured by model size, the compute-optimal frontier and its fit (Fig. 4, right);
- ``plot_isoflops``: loss against N per compute budget with parabola minima;
- ``plot_residuals``: log residuals of each fit against its x.

matplotlib is imported inside the functions; figures are ``Figure`` objects, never
pyplot state, so nothing leaks between calls or threads.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["plot_loss_vs_params", "plot_loss_vs_compute", "plot_isoflops", "plot_residuals", "fit_label"]

_DPI = 130


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
                        x: str = "n_params", title: str | None = None) -> str:
    """Final loss against N, the fit over a padded range, ``band`` = (grid, lo, hi)."""
    fig, ax = _figure()
    xs = records[x].to_numpy(float)
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
    ax.set_xlabel("parameters N (count, embeddings included)" if x == "n_params" else x)
    ax.set_ylabel("validation loss (nats / pair)")
    ax.set_title(title or "Loss against model size")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_compute(curves: pd.DataFrame, records: pd.DataFrame, frontier: pd.DataFrame,
                         result, path, *, title: str | None = None) -> str:
    """Every run's val-loss curve against FLOPs, the frontier points and their fit."""
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
        fig.colorbar(sm, ax=ax, label="parameters N")
    if len(frontier):
        ax.scatter(frontier["compute"], frontier["loss"], s=14, color="k", zorder=4, label="frontier (lower envelope)")
    if result is not None and len(frontier):
        g = _grid(frontier["compute"], pad=1.2)
        ax.plot(g, result.predict(x=g), color="C3", lw=1.8, ls="--", label=fit_label(result, "C"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats / pair)")
    ax.set_title(title or "Loss against compute, compute-optimal frontier")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_isoflops(records: pd.DataFrame, minima: pd.DataFrame, path, *, rtol: float = 0.05) -> str:
    """Loss against N for each budget, with its parabola minimum where one exists."""
    from analysis.frontier import group_budgets

    fig, ax = _figure()
    r = records.dropna(subset=["n_params", "compute", "loss"])
    labels = group_budgets(r["compute"], rtol)
    for i, (_, g) in enumerate(r.groupby(labels)):
        g = g.sort_values("n_params")
        c = float(np.exp(np.mean(np.log(g["compute"]))))
        ax.plot(g["n_params"], g["loss"], "o-", color=f"C{i % 10}", ms=4, lw=1, label=f"C = {c:.2g} FLOPs")
    ok = minima[minima["ok"]] if len(minima) else minima
    if len(ok):
        ax.scatter(ok["n_opt"], ok["loss_opt"], marker="*", s=120, color="k", zorder=5, label="parabola minimum")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (count)")
    ax.set_ylabel("final validation loss (nats / pair)")
    ax.set_title("IsoFLOP curves")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
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
