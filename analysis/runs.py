"""Finished training runs -> ScalingRecords: the only module that knows MLflow names.

Owns the reading side of the MLflow contract in DESIGN.md (and the one write that
analysis does: logging an analysis run with its artifacts):

- the experiment is named after the sweep; job runs carry tag ``polar.kind = job``;
- params ``model, n_params, n_params_nonembed, tokens, compute, ...`` (strings in
  MLflow, converted here);
- metrics ``val/loss``, ``tokens_seen``, ``flops_seen`` at the same optimizer steps, and
  ``val/loss_final`` (the record's loss; else the last ``val/loss``);
- failed runs have status FAILED and tag ``polar.error``.

``load_records`` returns a ``Records`` bundle: one row per FINISHED job run (columns
RECORD_COLUMNS), the validation curves (CURVE_COLUMNS) and the failed runs.
``load_jsonl_records`` builds the same bundle from the runs' own ``metrics.jsonl`` files
(written beside the checkpoints by every job, with or without a tracking server), for
runs whose metrics never reached MLflow. ``read_csv`` reads records from a CSV with
columns n_params, tokens, compute, loss. mlflow is imported inside the functions (its
import takes seconds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "RECORD_COLUMNS",
    "CURVE_COLUMNS",
    "FailedRun",
    "Records",
    "RunsError",
    "load_records",
    "load_jsonl_records",
    "read_csv",
    "complete_records",
    "log_analysis",
]

RECORD_COLUMNS = ["run_id", "model", "n_params", "n_params_nonembed", "tokens", "compute", "loss"]
CURVE_COLUMNS = ["run_id", "step", "tokens_seen", "flops_seen", "val_loss"]

# MLflow names of the contract (DESIGN.md, "Contracts")
KIND_TAG = "polar.kind"
ERROR_TAG = "polar.error"
JOB, ANALYSIS = "job", "analysis"
_FLOAT_PARAMS = ["n_params", "n_params_nonembed", "flops_per_token", "tokens", "compute", "lr"]
_INT_PARAMS = ["batch_size", "seq_len", "seed"]
_EXTRA_PARAMS = ["flops_per_token", "lr", "batch_size", "seq_len", "seed", "data_id", "run_key", "sweep_id"]
_M_VAL, _M_FINAL, _M_TOKENS, _M_FLOPS = "val/loss", "val/loss_final", "tokens_seen", "flops_seen"


class RunsError(ValueError):
    """Records cannot be loaded: missing experiment, no finished runs, bad CSV."""


@dataclass(frozen=True)
class FailedRun:
    name: str
    run_id: str
    error: str
    status: str = "FAILED"


@dataclass(frozen=True)
class Records:
    """Finished runs of an experiment: records, their validation curves, the failures."""

    records: pd.DataFrame
    curves: pd.DataFrame
    failed: list[FailedRun] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # run names still RUNNING etc.
    experiment: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None


# ---------------------------------------------------------------- MLflow

def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _resolved_uri(tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def _experiment(client, experiment: str, uri: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise RunsError(
            f"no MLflow experiment named {experiment!r} at tracking URI {uri!r}; "
            f"experiments there: {names or 'none'}"
        )
    return exp


def _job_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{JOB}'",
            max_results=1000, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _number(params: Mapping[str, str], key: str, cast=float):
    v = params.get(key)
    if v is None or v == "" or v == "None":
        return np.nan if cast is float else None
    try:
        return cast(float(v)) if cast is int else cast(v)
    except ValueError:
        return np.nan if cast is float else None


def _curve(client, run_id: str) -> pd.DataFrame:
    cols = {}
    for name, col in ((_M_VAL, "val_loss"), (_M_TOKENS, "tokens_seen"), (_M_FLOPS, "flops_seen")):
        hist = client.get_metric_history(run_id, name)
        cols[col] = pd.Series({m.step: m.value for m in hist}, dtype=float)
    df = pd.DataFrame(cols).rename_axis("step").reset_index()
    df = df.dropna(subset=["val_loss"]).sort_values("step")
    df.insert(0, "run_id", run_id)
    return df[CURVE_COLUMNS].reset_index(drop=True)


def _record(run, curve: pd.DataFrame) -> dict | None:
    p, metrics = run.data.params, run.data.metrics
    loss = metrics.get(_M_FINAL)
    if loss is None and len(curve):
        loss = float(curve["val_loss"].iloc[-1])
    if loss is None:
        return None
    rec = {
        "run_id": run.info.run_id,
        "model": p.get("model", run.info.run_name),
        "n_params": _number(p, "n_params"),
        "n_params_nonembed": _number(p, "n_params_nonembed"),
        "tokens": _number(p, "tokens"),
        "compute": _number(p, "compute"),
        "loss": float(loss),
        "run_name": run.info.run_name,
    }
    for key in _EXTRA_PARAMS:
        if key in _FLOAT_PARAMS:
            rec[key] = _number(p, key)
        elif key in _INT_PARAMS:
            rec[key] = _number(p, key, int)
        else:
            rec[key] = p.get(key)
    return rec


def load_records(experiment: str, tracking_uri: str | None = None) -> Records:
    """Read the job runs of ``experiment``: FINISHED ones become records.

    Raises RunsError when the experiment does not exist. An experiment with no
    finished runs returns empty frames (callers decide whether that is an error).
    """
    uri = _resolved_uri(tracking_uri)
    client = _client(uri)
    exp = _experiment(client, experiment, uri)
    recs, curves, failed, unfinished = [], [], [], []
    for run in _job_runs(client, exp.experiment_id):
        status, name = run.info.status, run.info.run_name
        if status in ("FAILED", "KILLED"):
            failed.append(FailedRun(name, run.info.run_id, run.data.tags.get(ERROR_TAG, ""), status))
            continue
        if status != "FINISHED":
            unfinished.append(name)
            continue
        curve = _curve(client, run.info.run_id)
        rec = _record(run, curve)
        if rec is None:
            failed.append(FailedRun(name, run.info.run_id, f"finished without a {_M_VAL} metric", status))
            continue
        recs.append(rec)
        curves.append(curve)
    records = pd.DataFrame(recs, columns=RECORD_COLUMNS + ["run_name"] + _EXTRA_PARAMS)
    records = records.sort_values(["n_params", "compute"], kind="stable").reset_index(drop=True)
    curve_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return Records(records, curve_df, failed, unfinished, experiment, exp.experiment_id, uri)


def _run_experiment(run_dir: Path) -> str | None:
    """The experiment_name in a run folder's config.yaml (None when unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return cfg.get("experiment_name") if isinstance(cfg, dict) else None


def load_jsonl_records(runs_dir: str | os.PathLike, experiment: str | None = None) -> Records:
    """Records from the ``RUN_KEY/metrics.jsonl`` files under ``runs_dir`` (the jobs'
    ``paths.runs_dir``), keeping only runs of ``experiment`` when given (matched on the
    experiment_name in each run's config.yaml). Runs that ended FAILED are listed as
    failed; runs without an end record (running, or killed) as unfinished.
    Raises RunsError when ``runs_dir`` is not a folder."""
    from polar.tracking import jsonl_record, read_jsonl

    root = Path(runs_dir)
    if not root.is_dir():
        raise RunsError(f"runs folder {str(root)!r} does not exist (a sweep's paths.runs_dir, "
                        f"default outputs/runs)")
    recs, curves, failed, unfinished = [], [], [], []
    for path in sorted(root.glob("*/metrics.jsonl")):
        if experiment is not None and _run_experiment(path.parent) != experiment:
            continue
        run = read_jsonl(path)
        rec, curve = jsonl_record(run, run.params.get("run_key") or path.parent.name)
        name = run.tags.get("mlflow.runName") or path.parent.name
        if run.status in ("FAILED", "KILLED"):
            failed.append(FailedRun(name, path.parent.name, run.tags.get(ERROR_TAG, ""), run.status))
        elif rec is None or run.status != "FINISHED":
            unfinished.append(name)
        else:
            recs.append(rec)
            curves.append(pd.DataFrame(curve, columns=CURVE_COLUMNS))
    records = pd.DataFrame(recs, columns=RECORD_COLUMNS + ["run_name", "lr", "batch_size", "seed", "data_id"])
    records = records.sort_values(["n_params", "compute"], kind="stable").reset_index(drop=True)
    curve_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return Records(records, curve_df, failed, unfinished, experiment or str(root), None, None)


def log_analysis(
    experiment_id: str,
    tracking_uri: str | None,
    files: Sequence[str | os.PathLike],
    *,
    params: Mapping[str, object] | None = None,
    metrics: Mapping[str, float] | None = None,
    run_name: str = "analysis",
) -> str:
    """Log an analysis run (tag polar.kind = analysis) with ``files`` as artifacts."""
    client = _client(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={KIND_TAG: ANALYSIS})
    rid = run.info.run_id
    try:
        for k, v in (params or {}).items():
            client.log_param(rid, k, v)
        for k, v in (metrics or {}).items():
            if v is not None and np.isfinite(v):
                client.log_metric(rid, k, float(v))
        for f in files:
            client.log_artifact(rid, str(f))
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


# ---------------------------------------------------------------- CSV

def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Records from a CSV with columns among n_params, tokens, compute, loss.

    tokens = compute / (6 n_params) where absent; compute = 6 n_params tokens where
    absent. Raises RunsError naming a missing file or column.
    """
    path = Path(path)
    if not path.is_file():
        raise RunsError(f"CSV file {str(path)!r} does not exist")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RunsError(f"cannot read {str(path)!r} as CSV: {exc}") from None
    return complete_records(df, source=str(path))


def complete_records(df: pd.DataFrame, source: str = "data") -> pd.DataFrame:
    """Fill tokens/compute from each other (C = 6 N D) and check the loss column."""
    df = df.copy()
    if "loss" not in df.columns:
        raise RunsError(f"{source} has no 'loss' column; columns present: {list(df.columns)}")
    have = set(df.columns)
    if "tokens" not in have and {"compute", "n_params"} <= have:
        df["tokens"] = df["compute"] / (6.0 * df["n_params"])
    if "compute" not in have and {"tokens", "n_params"} <= have:
        df["compute"] = 6.0 * df["n_params"] * df["tokens"]
    if not ({"n_params", "compute"} & set(df.columns)):
        raise RunsError(
            f"{source} needs a size or compute column: 'n_params' and/or 'compute' "
            f"(with 'tokens'); columns present: {list(df.columns)}"
        )
    for col in ("n_params", "tokens", "compute", "loss"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df
