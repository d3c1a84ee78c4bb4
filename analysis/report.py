"""``python -m analysis.report``: an experiment's finished runs -> fits, plots, report.

Owns the end of the pipeline (DESIGN.md, data flow step 4):

1. read the records of ``--experiment`` (analysis/records.py);
2. fit L = a N^b over model size (final losses; the lowest per size when a size was
   trained at several budgets) and L = a C^b over the compute-optimal frontier of the
   validation curves (analysis/frontier.py), each with bootstrap CIs; held-out
   prediction of the largest model when there are at least 4 sizes; IsoFLOP minima
   where a budget has at least 3 sizes and N_opt = k C^a through the usable ones
   (Approach 2, t interval and a bootstrap over the runs' loss noise), beside the
   exponent of the sizes that hold the frontier (Approach 1);
3. write ``fits.json``, ``report.md`` and PNGs to ``--out`` and log them as artifacts
   of an analysis run (tag polar.kind = analysis) in the same experiment.

Nothing is written before the records are read and fitted (a bad tracking URI, duplicate
run keys, too few sizes are refused with one message and exit status 2). The files are
written into a temporary sibling of ``--out`` (holding a copy of the folder's other
files) that replaces it only when all of them are written: a report that fails midway
leaves ``--out`` exactly as it was.

``analyse`` is the pure part (records -> dict of fits); ``write_report`` does the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import fit as F
from analysis.frontier import bootstrap_n_opt, envelope, fit_n_opt, frontier_sizes, isoflop_minima, pareto_frontier
from analysis.laws import chinchilla_optimal
from analysis.records import PARAM_COUNTS
from polar import names
from polar.atomic import atomic_path
from polar.names import CURVE_COLUMNS
from polar.sinks import redact

__all__ = ["ReportError", "analyse", "write_report", "main"]


class ReportError(ValueError):
    """The experiment cannot be reported (no finished runs, too few sizes)."""


# ---------------------------------------------------------------- analysis (pure)

# runs that agree on these (where the columns exist) and differ in their seed are replicas
REPLICA_KEYS = ["model", "n_params", "tokens", "compute", "lr", "batch_size", "data_id"]


SEED_STATISTICS = ("mean", "median")


def average_seeds(records: pd.DataFrame, curves: pd.DataFrame,
                  statistic: str = "mean") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replicas (runs whose configuration differs only in the seed) averaged into one
    record each: the mean (or median: one seed that missed a jump in the loss does not
    move it) final loss, with ``loss_std`` (0 for one run) and ``n_seeds``; and one curve
    each, the same statistic over replicas at the steps they all logged. The first
    replica's run_id names the average. Runs without replicas pass through unchanged."""
    if statistic not in SEED_STATISTICS:
        raise ReportError(f"--seeds must be one of {list(SEED_STATISTICS)}, got {statistic!r}")
    keys = [k for k in REPLICA_KEYS if k in records.columns]
    groups = records.groupby(keys, dropna=False, sort=False).groups if len(records) else {}
    rows, means = [], []
    for index in groups.values():
        group = records.loc[index]
        row = group.iloc[0].copy()
        row["loss"] = getattr(group["loss"], statistic)()
        row["loss_std"] = group["loss"].std(ddof=1) if len(group) > 1 else 0.0
        row["n_seeds"] = len(group)
        rows.append(row)
        members = curves[curves["run_id"].isin(group["run_id"])]
        if len(members):
            by_step = members.groupby("step")
            mean = getattr(by_step[CURVE_COLUMNS[2:]], statistic)()[by_step.size() == len(group)]
            means.append(mean.reset_index().assign(run_id=row["run_id"])[curves.columns])
    averaged = pd.DataFrame(rows).reset_index(drop=True) if rows else records.assign(loss_std=[], n_seeds=[])
    mean_curves = pd.concat(means, ignore_index=True) if means else curves.iloc[0:0]
    return averaged, mean_curves


def size_points(records: pd.DataFrame) -> pd.DataFrame:
    """One point per model size: the (seed-averaged) run with the lowest final loss."""
    idx = records.groupby("n_params")["loss"].idxmin()
    return records.loc[idx].sort_values("n_params").reset_index(drop=True)


def mixed_budget_note(sizes: pd.DataFrame) -> str | None:
    """A warning when the size points (each size's best run) differ in their token
    budget: the N fit then compares budgets as well as sizes."""
    tokens = sorted({float(t) for t in sizes.get("tokens", pd.Series(dtype=float)).dropna()})
    if len(tokens) < 2:
        return None
    return (f"The sizes' points come from runs of {len(tokens)} token budgets "
            f"({', '.join(f'{t:.3g}' for t in tokens)}): the fit in N compares each size's best run, "
            "not the sizes at one budget. For a law at one budget, give those runs an experiment of "
            "their own (experiment_name=...), or remove older runs (make clean-demo for the demo).")


def frontier_points(records: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The lower envelope of the validation curves; the records' own points when the
    curves give fewer than 3."""
    pts = envelope(curves) if len(curves) else pd.DataFrame()
    if len(pts) < 3:
        pts = pareto_frontier(records.rename(columns={"compute": "flops_seen", "loss": "val_loss"}))
    return pts


def converged_frontier(points: pd.DataFrame) -> pd.DataFrame:
    """With WSD decay points, the frontier is a fit on converged points (each run's end
    and its decay points), not the envelope of curves that are still in their stable phase."""
    return pareto_frontier(points.rename(columns={"compute": "flops_seen", "loss": "val_loss"}))


def _fit_power(x, y, *, k: int, seed: int):
    res = F.fit("power", {"x": x}, y)
    return F.bootstrap(res, {"x": x}, y, k=k, seed=seed) if k >= 2 and len(y) > 2 else res


def analyse(rec, *, bootstrap_k: int = 200, seed: int = 0, seeds: str = "mean", params: str = "all") -> dict:
    """Fits of an experiment's records; raises ReportError when there are too few.
    N counts every parameter, or with ``params="nonembed"`` the non-embedding ones (a run
    without that count: RunsError, from Records.counting).

    The fit in N is required; the other parts are added when the data allow them, and
    a part whose fit fails is listed in ``out["skipped"]`` with the reason.
    """
    if rec.records.dropna(subset=["n_params", "loss"]).empty:
        raise ReportError(_no_runs_message(rec))
    rec = rec.counting(params)
    records = rec.records.dropna(subset=["n_params", "loss"])
    records, curves = average_seeds(records, rec.curves, seeds)
    sizes = size_points(records)
    if len(sizes) < 2:
        raise ReportError(
            f"experiment {rec.experiment!r} has finished runs of only {len(sizes)} model size(s) "
            f"({sizes['n_params'].tolist()}); a fit of L = a N^b needs at least 2"
        )
    out = {"sizes": sizes, "curves": curves, "skipped": {}, "budget_note": mixed_budget_note(sizes), "params": params}
    try:
        out["size_fit"] = _fit_power(sizes["n_params"].to_numpy(float), sizes["loss"].to_numpy(float),
                                     k=bootstrap_k, seed=seed)
    except F.FitError as exc:
        raise ReportError(f"experiment {rec.experiment!r}: the fit of L = a N^b failed: {exc}") from None
    points = rec.points()          # finals and WSD decay points: the converged ones
    out["points"] = points
    out["frontier"] = frontier_points(records, curves) if rec.decays.empty else converged_frontier(points)
    out["isoflop"] = isoflop_minima(records.dropna(subset=["compute"]))
    out["isoflop_records"] = records.dropna(subset=["compute"])
    for name, part in (("size_holdout", _size_holdout), ("compute_fit", _compute_fit),
                       ("size_prediction", _size_prediction), ("isoflop_fit", _isoflop_fit)):
        try:
            value = part(out, bootstrap_k, seed)
        except F.FitError as exc:
            out["skipped"][name] = str(exc)
            continue
        if value is not None:
            out[name] = value
    chin = chinchilla_fit(records if rec.decays.empty else points, k=bootstrap_k, seed=seed)
    if chin is not None:
        out["chinchilla"] = chin
    return out


def _size_holdout(out, k, seed):
    sizes = out["sizes"]
    if len(sizes) < 4 or k < 2:
        return None
    above = float(sizes["n_params"].iloc[-2])
    h = F.holdout(sizes, "power", above, k=k, seed=seed)
    return {**{key: h[key] for key in ("n", "mape", "max_ape", "coverage", "n_train", "level")}, "above": above}


def _compute_fit(out, k, seed):
    front = out["frontier"]
    if len(front) < 2:
        return None
    return _fit_power(front["compute"].to_numpy(float), front["loss"].to_numpy(float), k=k, seed=seed)


def _size_prediction(out, k, seed):
    if out["size_fit"].boot_thetas is None:
        return None
    n_next = 10 * float(out["sizes"]["n_params"].max())
    pred, lo, hi = F.prediction_interval(out["size_fit"], x=[n_next], seed=seed)
    return {"n_params": n_next, "loss": float(pred[0]), "lo": float(lo[0]), "hi": float(hi[0]), "level": 0.95}


def _isoflop_fit(out, k, seed):
    """Approach 2's N_opt = k C^a (t interval, and the bootstrap over the runs' loss
    noise when k >= 2), with Approach 1's exponent from the frontier's sizes beside it."""
    sizes = out["frontier_sizes"] = frontier_sizes(out["frontier"], out["isoflop_records"])
    fit = fit_n_opt(out["isoflop"])
    if fit is None:
        return None
    fit["bootstrap"] = bootstrap_n_opt(out["isoflop_records"], k=k, seed=seed) if k >= 2 else None
    if sizes["n_params"].nunique() >= 2:
        f1 = fit_n_opt(sizes.rename(columns={"n_params": "n_opt"}).assign(ok=True))
        fit["frontier"] = {"k": f1["k"], "a": f1["a"], "n_points": int(len(sizes)),
                           "compute_range": [float(sizes["compute"].min()), float(sizes["compute"].max())],
                           "sizes": sorted(float(n) for n in sizes["n_params"].unique())}
    return fit


def chinchilla_fit(records: pd.DataFrame, *, k: int = 0, seed: int = 0) -> dict | None:
    """Approach 3 where the points can identify it (>= 10 points, >= 3 sizes and token
    counts, log N and log D not collinear): the fit (with bootstrap intervals when
    k >= 2), or the reason it was skipped. Points: runs, or runs and WSD decay points."""
    r = records.dropna(subset=["n_params", "tokens", "loss"])
    r = r[(r["n_params"] > 0) & (r["tokens"] > 0)]
    if len(r) < 10 or r["n_params"].nunique() < 3 or r["tokens"].nunique() < 3:
        return None
    corr = np.corrcoef(np.log(r["n_params"]), np.log(r["tokens"]))[0, 1]
    if abs(corr) > 0.95:
        return {"skipped": f"log N and log D are collinear (correlation {corr:.3f}); a grid varying "
                           "tokens per parameter is needed"}
    try:
        res = F.fit_records(r, "chinchilla")
        if k >= 2:
            res = F.bootstrap(res, *F.records_inputs(r, "chinchilla"), k=k, seed=seed)
    except F.FitError as exc:
        return {"skipped": str(exc)}
    c_max = float(r["compute"].max()) if "compute" in r and r["compute"].notna().any() else float(
        6 * (r["n_params"] * r["tokens"]).max())
    decays = int((r["point"] == "decay").sum()) if "point" in r else 0
    out = {"fit": res, "compute": c_max, "decay_points": decays, "n_opt": None, "d_opt": None}
    alpha, beta = res.params["alpha"], res.params["beta"]
    if alpha > 0 and beta > 0:      # else loss does not fall in both N and D: no optimal allocation
        out["n_opt"], out["d_opt"] = map(float, chinchilla_optimal(c_max, **res.params))
    return out


def _no_runs_message(rec) -> str:
    extra = []
    if rec.failed:
        extra.append(f"{len(rec.failed)} failed ({', '.join(f.name or f.run_id for f in rec.failed[:5])})")
    if rec.unfinished:
        extra.append(f"{len(rec.unfinished)} not finished")
    detail = f": {'; '.join(extra)}" if extra else " (no job runs at all)"
    return (
        f"experiment {rec.experiment!r} at {redact(rec.tracking_uri)!r} has no FINISHED job runs"
        f"{detail}; run the sweep first (python -m sweeps.run -m +experiment={rec.experiment})"
    )


# ---------------------------------------------------------------- files

def _fit_json(res, x: str) -> dict:
    d = res.to_dict()
    return {"law": d.pop("law"), "x": x, **d}


def fits_json(rec, an: dict) -> dict:
    fits = {"loss_vs_params": _fit_json(an["size_fit"], PARAM_COUNTS[an["params"]])}
    if "size_holdout" in an:
        fits["loss_vs_params"]["holdout"] = an["size_holdout"]
    if "compute_fit" in an:
        fits["loss_vs_compute"] = _fit_json(an["compute_fit"], "compute")
        fits["loss_vs_compute"]["frontier_points"] = int(len(an["frontier"]))
        fits["loss_vs_compute"]["frontier_of"] = ("converged points (run ends, WSD decay points)"
                                                  if (an["points"]["point"] == "decay").any() else "validation curves")
    if "size_prediction" in an:
        fits["loss_vs_params"]["prediction"] = an["size_prediction"]
    if "isoflop_fit" in an:
        fits["n_opt_vs_compute"] = _n_opt_json(an["isoflop_fit"])
    chin = an.get("chinchilla")
    if chin and "fit" in chin:
        p, has_optimum = chin["fit"].params, chin["n_opt"] is not None
        fits["chinchilla"] = {**_fit_json(chin["fit"], f"{PARAM_COUNTS[an['params']]},tokens"),
                              "optimal": {k: chin[k] for k in ("compute", "n_opt", "d_opt")},
                              "n_opt_exponent": p["beta"] / (p["alpha"] + p["beta"]) if has_optimum else None,
                              "decay_points": chin["decay_points"]}
    elif chin:
        fits["chinchilla"] = {"skipped": chin["skipped"]}
    return {
        "experiment": rec.experiment,
        "tracking_uri": redact(rec.tracking_uri),
        "n_params_count": an["params"],    # what N (n_params in fits and size_points) counts; runs carry both
        "fits": fits,
        "size_points": _records(an["sizes"][["model", "n_params", "tokens", "loss", "loss_std", "n_seeds"]]),
        "size_points_note": an["budget_note"],
        "isoflop_minima": _records(an["isoflop"]),
        "runs": _records(rec.records[["run_id", "model", "n_params", "n_params_nonembed", "tokens", "compute", "loss"]]),
        "failed": [{"name": f.name, "run_id": f.run_id, "status": f.status, "error": f.error} for f in rec.failed],
        "unfinished": list(rec.unfinished),
        "skipped": dict(an.get("skipped", {})),
    }


def _n_opt_json(f: dict) -> dict:
    """fits.json's N_opt = a C^b (Approach 2; params a = k, b = the exponent)."""
    d = {"law": "power", "x": "compute", "y": "n_opt", "approach": 2,
         "params": {"a": f["k"], "b": f["a"]}, "n": f["n_budgets"], "dof": f["dof"], "se_b": f["se_a"],
         "r2_log": f["r2_log"], "level": f["level"], "ci_method": f["interval"], "points": {"compute": f["compute"], "n_opt": f["n_opt"]}}
    if f["a_ci"] is not None:
        d["ci"] = {"b": f["a_ci"]}
    if f.get("bootstrap"):
        b = f["bootstrap"]
        d["bootstrap_runs"] = {"ci": {"b": b["a_ci"]}, "level": b["level"], "resamples": b["k"], "asked": b["k_asked"],
                               "method": "residual bootstrap of the parabolas (loss noise of the runs only)"}
    if f.get("frontier"):
        fr = f["frontier"]
        d["frontier_approach_1"] = {"params": {"a": fr["k"], "b": fr["a"]}, "n_points": fr["n_points"], "sizes": fr["sizes"],
                                    "method": "least squares of ln N (the run holding each frontier point) on ln C"}
    return d


def _records(df: pd.DataFrame) -> list[dict]:
    def clean(v):
        if isinstance(v, (np.floating, float)):
            return None if not math.isfinite(float(v)) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        return v

    return [{k: clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def _fit_section(title: str, d: dict, symbol: str) -> list[str]:
    p, ci = d["params"], d.get("ci", {})
    lines = [f"## {title}", "",
             f"**L = {p['a']:.4g} · {symbol}^{p['b']:.5f}**  (R² = {d['r2']:.4f}, R² in log space = {d['r2_log']:.4f}, "
             f"MAPE = {d['mape']:.3f} %, n = {d['n']}, Huber objective = {d['objective']:.3g})", "",
             "| parameter | estimate | 95% CI (bootstrap) |", "|---|---|---|"]
    for k, v in p.items():
        lo_hi = f"{ci[k][0]:.4g} to {ci[k][1]:.4g}" if k in ci else "–"
        lines.append(f"| {k} | {v:.5g} | {lo_hi} |")
    if "holdout" in d:
        h = d["holdout"]
        lines += ["", f"Held-out check: fitted on the {h['n_train']} sizes with N ≤ {h['above']:.3g}, predicted the "
                  f"{h['n']} larger: MAPE {h['mape']:.2f} %, max APE {h['max_ape']:.2f} %, "
                  f"{int(100 * h['level'])}% prediction interval covered {100 * h['coverage']:.0f} %."]
    return lines + [""]


def report_markdown(rec, fj: dict, images: dict[str, str]) -> str:
    fits = fj["fits"]
    lines = [f"# Scaling report: {rec.experiment}", "",
             f"{len(rec.records)} finished runs, {len(rec.failed)} failed, {len(rec.unfinished)} unfinished "
             f"(tracking URI `{redact(rec.tracking_uri)}`). Fits: log space, sum of Huber losses (δ = 1e-3) of log "
             "residuals, multi-start L-BFGS (analysis/fit.py); CIs: 95% percentile bootstrap over points."
             + (" N counts the non-embedding parameters in every fit, table and plot below except the runs "
                "table, which gives both counts." if fj["n_params_count"] == "nonembed" else ""), ""]
    counted = "; N counts the non-embedding parameters" if fits["loss_vs_params"]["x"] == "n_params_nonembed" else ""
    lines += _fit_section(f"Loss against model size (final validation loss{counted})", fits["loss_vs_params"], "N")
    if "prediction" in fits["loss_vs_params"]:
        pr = fits["loss_vs_params"]["prediction"]
        lines += [f"Prediction for N = {pr['n_params']:.3g} (10x the largest model): L = {pr['loss']:.4g}, "
                  f"95% prediction interval {pr['lo']:.4g} to {pr['hi']:.4g}.", ""]
    lines += ["| model | N | tokens | final val loss (mean over seeds) | sd | seeds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {_fmt(r['n_params'])} | {_fmt(r['tokens'])} | {_fmt(r['loss'])} | "
              f"{_fmt(r['loss_std']) if r['n_seeds'] > 1 else '–'} | {r['n_seeds']} |" for r in fj["size_points"]]
    lines.append("")
    if fj["size_points_note"]:
        lines += [f"**Note:** {fj['size_points_note']}", ""]
    if "loss_vs_params" in images:
        lines += [f"![loss vs N]({images['loss_vs_params']})", ""]
    if "loss_vs_compute" in fits:
        lines += _fit_section(
            f"Loss against compute (frontier of the {fits['loss_vs_compute']['frontier_of']}, "
            f"{fits['loss_vs_compute']['frontier_points']} points)",
            fits["loss_vs_compute"], "C")
    if "loss_vs_compute" in images:
        lines += [f"![loss vs C]({images['loss_vs_compute']})", ""]
    if fj["isoflop_minima"]:
        lines += _isoflop_section(fj)
        if "isoflop" in images:
            lines += [f"![isoflop]({images['isoflop']})", ""]
    ch = fits.get("chinchilla")
    if ch and "skipped" in ch:
        lines += ["## Chinchilla law (Approach 3)", "", f"Not fitted: {ch['skipped']}", ""]
    elif ch:
        lines += _chinchilla_section(ch)
        if "loss_vs_tokens" in images:
            lines += [f"![loss vs D]({images['loss_vs_tokens']})", ""]
    if "residuals" in images:
        lines += [f"![residuals]({images['residuals']})", ""]
    lines += ["## Runs", "", "| model | N | N (non-embedding) | tokens | compute (FLOPs) | final val loss | run id |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {_fmt(r['n_params'])} | {_fmt(r['n_params_nonembed'])} | {_fmt(r['tokens'])} | "
              f"{_fmt(r['compute'])} | {_fmt(r['loss'])} | `{r['run_id']}` |" for r in fj["runs"]]
    lines.append("")
    return "\n".join(lines + _closing_sections(rec, fj))


def _chinchilla_section(ch: dict) -> list[str]:
    """report.md's L(N, D): the law, its exponents' intervals, the optimum it implies."""
    p, o, ci = ch["params"], ch["optimal"], ch.get("ci") or {}

    def interval(name):
        return f" [{ci[name][0]:.4f}, {ci[name][1]:.4f}]" if name in ci else ""

    points = (f"{ch['n']} converged points: each run's end and {ch['decay_points']} WSD decay points"
              if ch.get("decay_points") else f"{ch['n']} runs")
    optimum = (f"- compute-optimal size N_opt ∝ C^{ch['n_opt_exponent']:.3f} (beta / (alpha + beta)); at "
               f"C = {o['compute']:.3g} FLOPs: N = {o['n_opt']:.3g}, D = {o['d_opt']:.3g} tokens"
               if o["n_opt"] is not None else
               "- no compute-optimal allocation: the loss does not fall in both N and D (alpha or beta <= 0)")
    return ["## Chinchilla law (Approach 3): L(N, D)", "",
            f"L = {p['E']:.4g} + {p['A']:.4g} / N^{p['alpha']:.4f} + {p['B']:.4g} / D^{p['beta']:.4f} "
            f"(R² = {ch['r2']:.4f}, on {points}).", "",
            f"- alpha = {p['alpha']:.4f}{interval('alpha')}, beta = {p['beta']:.4f}{interval('beta')}"
            f"{' (95% bootstrap intervals)' if ci else ''}", optimum, ""]


def _isoflop_section(fj: dict) -> list[str]:
    """report.md's IsoFLOP part: the per-budget minima (unusable budgets with their
    reason) and N_opt = k C^a with its interval, beside the frontier's exponents."""
    fits = fj["fits"]
    lines = ["## IsoFLOP minima (Approach 2)", "",
             "Per budget, L = p0 + p1 ln N + p2 (ln N)² by least squares over the sizes trained at that budget "
             "(seed means); its minimum is used when the parabola opens upwards and the minimum lies within the sizes tried.", "",
             "| compute (FLOPs) | N_opt | loss at N_opt | sizes | sizes tried | curvature p2 | used |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {_fmt(m['compute'])} | {_fmt(m['n_opt'])} | {_fmt(m['loss_opt'])} | {m['n_sizes']} | "
              f"{_fmt(m.get('n_min'))} to {_fmt(m.get('n_max'))} | {_fmt(m['curvature'])} | "
              f"{'yes' if m['ok'] else 'no: ' + (m.get('reason') or 'unusable')} |" for m in fj["isoflop_minima"]]
    lines.append("")
    f = fits.get("n_opt_vs_compute")
    if f is None:
        used = sum(bool(m["ok"]) for m in fj["isoflop_minima"])
        return lines + [f"N_opt against C not fitted: {used} usable budget(s); a power law needs 2 (3 for an interval).", ""]
    p, pct = f["params"], int(round(100 * f["level"]))
    ci = (f"{pct}% interval {f['ci']['b'][0]:.3f} to {f['ci']['b'][1]:.3f} ({f['ci_method']})" if "ci" in f
          else f"no interval ({f['ci_method']})")
    lines += [f"**N_opt = {p['a']:.4g} · C^{p['b']:.4f}** over {f['n']} budgets (least squares of ln N_opt on ln C): "
              f"exponent {p['b']:.4f}, {ci}."]
    if "bootstrap_runs" in f:
        b = f["bootstrap_runs"]
        lines += ["", f"Loss noise alone (residual bootstrap of the parabolas, {b['resamples']} of {b['asked']} resamples "
                  f"usable): exponent {int(round(100 * b['level']))}% interval {b['ci']['b'][0]:.3f} to {b['ci']['b'][1]:.3f}; "
                  "it leaves out the scatter of the minima about the line, which the t interval includes."]
    fr = f.get("frontier_approach_1")
    if fr:
        lines += ["", f"Approach 1 beside it: the runs holding the compute frontier give N_opt ∝ C^{fr['params']['b']:.4f} "
                  f"(least squares over {fr['n_points']} frontier points held by sizes "
                  f"{', '.join(f'{n:.3g}' for n in fr['sizes'])}; no interval: the points are a staircase of a few runs, "
                  "not independent)."]
    if "loss_vs_compute" in fits:
        lines += ["", f"The frontier's loss law (above): L ∝ C^{fits['loss_vs_compute']['params']['b']:.4f}."]
    return lines + [""]


def _closing_sections(rec, fj: dict) -> list[str]:
    """report.md's last sections: duplicate run keys, what was not computed, failed runs."""
    lines = []
    if rec.duplicates:
        lines += ["## Duplicate run keys", ""] + [f"- {d}" for d in rec.duplicates] + [""]
    if fj["skipped"]:
        lines += ["## Not computed", ""] + [f"- {k}: {v}" for k, v in fj["skipped"].items()] + [""]
    if fj["failed"]:
        lines += ["## Failed runs", "", "| run | status | error | run id |", "|---|---|---|---|"]
        lines += [f"| {f['name']} | {f['status']} | {f['error'] or '–'} | `{f['run_id']}` |" for f in fj["failed"]]
        lines.append("")
    return lines


# the files a report writes (the PNGs it did not write this time are removed)
REPORT_FILES = ("report.md", "fits.json", "loss_vs_params.png", "loss_vs_compute.png", "isoflop.png",
                "loss_vs_tokens.png", "residuals.png")


def write_report(rec, an: dict, out_dir: Path) -> list[Path]:
    """fits.json, report.md and the PNGs in ``out_dir``, all or none: they are written
    into a temporary sibling holding a copy of ``out_dir``'s other files, which replaces
    ``out_dir`` when every file is written. Returns the paths written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {str(out_dir)!r} is a file, not a folder")
    with atomic_path(out_dir) as tmp:
        if out_dir.is_dir():
            shutil.copytree(out_dir, tmp, symlinks=True,
                            ignore=lambda folder, _: REPORT_FILES if Path(folder) == out_dir else ())
        else:
            tmp.mkdir()
        written = _write_files(rec, an, tmp)
    return [out_dir / p.name for p in written]


def _write_files(rec, an: dict, out_dir: Path) -> list[Path]:
    """fits.json, report.md and the PNGs in the existing folder ``out_dir``."""
    from analysis import plots

    images: dict[str, str] = {}
    sf, n_label = an["size_fit"], plots.PARAM_LABELS[an["params"]]
    band = None
    if sf.boot_thetas is not None:
        g = np.geomspace(an["sizes"]["n_params"].min() / 1.5, an["sizes"]["n_params"].max() * 1.5, 100)
        band = (g, *F.confidence_band(sf, x=g))
    images["loss_vs_params"] = "loss_vs_params.png"
    plots.plot_loss_vs_params(an["sizes"], sf, out_dir / images["loss_vs_params"], band=band,
                              xlabel=n_label, title=f"{rec.experiment}: loss against model size")
    if len(rec.curves) or "compute_fit" in an:
        images["loss_vs_compute"] = "loss_vs_compute.png"
        plots.plot_loss_vs_compute(rec.curves, rec.counting(an["params"]).records, an["frontier"], an.get("compute_fit"),
                                   out_dir / images["loss_vs_compute"], title=f"{rec.experiment}: loss against compute",
                                   n_label=n_label)
    if len(an["isoflop"]):
        images["isoflop"] = "isoflop.png"
        plots.plot_isoflops(an["isoflop_records"], an["isoflop"], out_dir / images["isoflop"],
                            n_opt_fit=an.get("isoflop_fit"), frontier_sizes=an.get("frontier_sizes"),
                            title=f"{rec.experiment}: IsoFLOP", n_label=n_label)
    chin = an.get("chinchilla", {})
    if "fit" in chin:
        images["loss_vs_tokens"] = "loss_vs_tokens.png"
        plots.plot_loss_vs_tokens(an["points"], chin["fit"], out_dir / images["loss_vs_tokens"],
                                  title=f"{rec.experiment}: L(N, D)", n_label=n_label)
    series = {"L(N)": (an["sizes"]["n_params"], sf, n_label)}
    if "compute_fit" in an:
        series["L(C) frontier"] = (an["frontier"]["compute"], an["compute_fit"], "training compute C (FLOPs)")
    images["residuals"] = "residuals.png"
    plots.plot_residuals(series, out_dir / images["residuals"])
    fj = fits_json(rec, an)
    (out_dir / "fits.json").write_text(json.dumps(F.json_safe(fj), indent=2) + "\n")
    (out_dir / "report.md").write_text(report_markdown(rec, fj, images))
    return [out_dir / "report.md", out_dir / "fits.json"] + [out_dir / v for v in images.values()]


# ---------------------------------------------------------------- CLI

def _parser():
    p = argparse.ArgumentParser(prog="python -m analysis.report",
                                description="Fit, plot and report an experiment's finished runs.")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (= sweep name); required unless --runs-dir is given")
    p.add_argument("--runs-dir", default=None, metavar="DIR",
                   help="read the runs' metrics.jsonl files under DIR (a sweep's paths.runs_dir, e.g. "
                        "outputs/runs) instead of MLflow; --experiment then filters them; nothing is "
                        "logged to MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own default)")
    p.add_argument("--out", default=None, help="output folder (default: reports/EXPERIMENT)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K", help="bootstrap resamples (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", choices=SEED_STATISTICS, default="mean",
                   help="how replicas (runs differing only in the seed) become one point: their mean "
                        "(default) or median final loss and curve")
    p.add_argument("--params", choices=PARAM_COUNTS, default="all",
                   help="what N counts: every parameter (default; POLAR, Chinchilla) or the non-embedding ones "
                        "(Kaplan et al. 2020; the cleaner law for tiny models whose embeddings are most of N)")
    p.add_argument("--no-mlflow-log", action="store_true", help="write the files but log no analysis run")
    return p


# MLflow's HTTP client retries a lost server for minutes by default
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.records import RunsError, load_jsonl_records, load_records

    parser = _parser()
    args = parser.parse_args(argv)
    if args.experiment is None and args.runs_dir is None:
        parser.error("give --experiment NAME (runs in MLflow) or --runs-dir DIR (runs' metrics.jsonl files)")
    t0 = time.perf_counter()
    out_dir = Path(args.out or Path("reports") / (args.experiment or Path(args.runs_dir).name))
    for var, value in MLFLOW_HTTP_DEFAULTS.items():   # a server lost after the check: fail in about a minute, not many
        os.environ.setdefault(var, value)
    try:
        if args.runs_dir is not None:
            rec = load_jsonl_records(args.runs_dir, args.experiment)
        else:
            rec = load_records(args.experiment, args.tracking_uri)
        for note in rec.duplicates:
            print(f"analysis.report: note: {note}", file=sys.stderr)
        an = analyse(rec, bootstrap_k=args.bootstrap, seed=args.seed, seeds=args.seeds, params=args.params)
        files = write_report(rec, an, out_dir)
    except (RunsError, ReportError, F.FitError, OSError) as exc:
        print(f"analysis.report: error: {redact(str(exc))}"
              f"{f'; {out_dir} is unchanged' if isinstance(exc, OSError) else ''}", file=sys.stderr)
        return 2
    status = 0
    if not args.no_mlflow_log and rec.experiment_id is not None:
        from sweeps.runs import log_analysis_run

        fits = {names.FIT_N: an["size_fit"], names.FIT_C: an.get("compute_fit")}
        metrics = {names.fit_metric(law, key): value for law, fit in fits.items() if fit is not None
                   for key, value in (("a", fit.params["a"]), ("b", fit.params["b"]), ("r2", fit.r2))}
        try:
            rid = log_analysis_run(rec.experiment_id, rec.tracking_uri, files, metrics=metrics,
                                   params={names.N_RUNS: len(rec.records), names.N_FAILED: len(rec.failed),
                                           names.N_COUNT: args.params})
            print(f"logged to MLflow: experiment {rec.experiment!r}, analysis run {rid}")
        except Exception as exc:  # the files are written; say what did not happen
            print(f"analysis.report: warning: could not log to MLflow ({type(exc).__name__}: {redact(str(exc))}); "
                  f"the files in {out_dir} are complete", file=sys.stderr)
            status = 1
    sf = an["size_fit"]
    if an["budget_note"]:
        print(f"analysis.report: note: {an['budget_note']}", file=sys.stderr)
    print(f"L = {sf.params['a']:.4g} N^{sf.params['b']:.5f}  (R^2 = {sf.r2:.4f})")
    if "compute_fit" in an:
        cf = an["compute_fit"]
        print(f"L = {cf.params['a']:.4g} C^{cf.params['b']:.5f}  (R^2 = {cf.r2:.4f}, frontier)")
    print(f"report: {out_dir / 'report.md'}  (plots and fits.json beside it; {time.perf_counter() - t0:.1f} s)")
    if rec.tracking_uri:
        print(f"browse the runs: mlflow ui --backend-store-uri {redact(rec.tracking_uri)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
