"""Finished training runs -> ScalingRecords: the only reader of MLflow.

Reads the runs that sweeps.runs wrote, under the names of polar.names (the contract):
job runs carry tag polar.kind = job; parameters are RunParams' fields (strings in MLflow,
converted here); the validation curve is val/loss with tokens_seen and flops_seen at the
same optimizer steps; the record's loss is val/loss_final (else the last val/loss); failed
runs have status FAILED and their reason in tag polar.error.

``load_records`` returns a ``Records`` bundle: one row per FINISHED job run (the
ScalingRecord's columns, then run_name and the other run parameters), the validation
curves (CURVE_COLUMNS) and the failed runs. ``load_jsonl_records`` builds the same bundle
from the runs' own ``metrics.jsonl`` files (written beside the checkpoints by every job,
with or without a tracking server). ``read_csv`` reads records from a CSV with columns
n_params, tokens, compute, loss. mlflow is imported inside the functions (its import
takes seconds).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, get_type_hints

import numpy as np
import pandas as pd

from polar import names
from polar.names import CURVE_COLUMNS, RECORD_COLUMNS, ScalingRecord

__all__ = ["RECORD_COLUMNS", "CURVE_COLUMNS", "FailedRun", "Records", "RunsError", "load_records",
           "load_jsonl_records", "read_csv", "complete_records"]

# run parameters carried beside each record; MLflow holds strings, RunParams says the types
EXTRA_PARAMS = list(names.RECORD_EXTRAS)
_PARAM_TYPES = {k: v for k, v in get_type_hints(names.RunParams).items() if v in (int, float)}
_CURVE_METRICS = {names.VAL_LOSS: "val_loss", names.TOKENS_SEEN: names.TOKENS_SEEN,
                  names.FLOPS_SEEN: names.FLOPS_SEEN}


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


def _number(params: Mapping[str, str], key: str, cast=float):
    v = params.get(key)
    try:
        return cast(float(v))
    except (TypeError, ValueError):
        return np.nan if cast is float else None


def _param(params: Mapping[str, str], key: str):
    return _number(params, key, _PARAM_TYPES[key]) if key in _PARAM_TYPES else params.get(key)


def _row(run_id: str, run_name: str, params: Mapping[str, str], final_loss, curve: pd.DataFrame) -> dict | None:
    """A record row (ScalingRecord, run_name, EXTRA_PARAMS), or None without any loss."""
    loss = final_loss if final_loss is not None else (float(curve["val_loss"].iloc[-1]) if len(curve) else None)
    if loss is None:
        return None
    record = ScalingRecord(run_id=run_id, model=params.get("model", run_name), loss=float(loss),
                           **{k: _number(params, k) for k in ("n_params", "n_params_nonembed", "tokens", "compute")})
    return {**asdict(record), "run_name": run_name, **{k: _param(params, k) for k in EXTRA_PARAMS}}


def _bundle(rows: list[dict], curves: list[pd.DataFrame], failed, unfinished, experiment, exp_id, uri) -> Records:
    records = pd.DataFrame(rows, columns=RECORD_COLUMNS + ["run_name"] + EXTRA_PARAMS)
    records = records.sort_values(["n_params", "compute"], kind="stable").reset_index(drop=True)
    curve_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return Records(records, curve_df, failed, unfinished, experiment, exp_id, uri)


# ---------------------------------------------------------------- MLflow

def _experiment(client, experiment: str, uri: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        found = sorted(e.name for e in client.search_experiments())
        from sweeps.runs import redact

        raise RunsError(f"no MLflow experiment named {experiment!r} at tracking URI {redact(uri)!r}; "
                        f"experiments there: {found or 'none'}")
    return exp


def _job_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{names.KIND_TAG}` = '{names.JOB}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _curve(client, run_id: str) -> pd.DataFrame:
    history = {metric: {m.step: m.value for m in client.get_metric_history(run_id, metric)}
               for metric in _CURVE_METRICS}
    return _curve_frame(run_id, history)


def _curve_frame(run_id: str, metrics: Mapping[str, Mapping[int, float]]) -> pd.DataFrame:
    """A validation curve (CURVE_COLUMNS) from {metric: {step: value}}: one row per step
    that has a validation loss."""
    cols = {col: pd.Series(metrics.get(metric, {}), dtype=float) for metric, col in _CURVE_METRICS.items()}
    df = pd.DataFrame(cols).rename_axis("step").reset_index()
    df = df.dropna(subset=["val_loss"]).sort_values("step")
    df.insert(0, "run_id", run_id)
    return df[CURVE_COLUMNS].reset_index(drop=True)


def load_records(experiment: str, tracking_uri: str | None = None) -> Records:
    """Read the job runs of ``experiment``: FINISHED ones become records.

    Raises RunsError when the experiment does not exist. An experiment with no
    finished runs returns empty frames (callers decide whether that is an error).
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = _experiment(client, experiment, uri)
    rows, curves, failed, unfinished = [], [], [], []
    for run in _job_runs(client, exp.experiment_id):
        status, name, rid = run.info.status, run.info.run_name, run.info.run_id
        if status in ("FAILED", "KILLED"):
            failed.append(FailedRun(name, rid, run.data.tags.get(names.ERROR_TAG, ""), status))
            continue
        if status != "FINISHED":
            unfinished.append(name)
            continue
        curve = _curve(client, rid)
        row = _row(rid, name, run.data.params, run.data.metrics.get(names.VAL_LOSS_FINAL), curve)
        if row is None:
            failed.append(FailedRun(name, rid, f"finished without a {names.VAL_LOSS} metric", status))
            continue
        rows.append(row)
        curves.append(curve)
    return _bundle(rows, curves, failed, unfinished, experiment, exp.experiment_id, uri)


# ---------------------------------------------------------------- metrics.jsonl

def _run_experiment(run_dir: Path) -> str | None:
    """The experiment_name in a run folder's config.yaml (None when unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / names.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return cfg.get("experiment_name") if isinstance(cfg, dict) else None


def jsonl_record(run, run_id: str) -> tuple[dict | None, pd.DataFrame]:
    """One run's metrics.jsonl, read by polar.sinks.read_jsonl, as a record row (None when
    the run logged no validation loss) and its curve (CURVE_COLUMNS)."""
    curve = _curve_frame(run_id, run.metrics)
    final = run.metrics.get(names.VAL_LOSS_FINAL, {})
    name = run.tags.get(names.RUN_NAME_TAG) or run_id
    return _row(run_id, name, run.params, final[max(final)] if final else None, curve), curve


def load_jsonl_records(runs_dir: str | os.PathLike, experiment: str | None = None) -> Records:
    """Records from the ``RUN_KEY/metrics.jsonl`` files under ``runs_dir`` (the jobs'
    ``paths.runs_dir``), keeping only runs of ``experiment`` when given (matched on the
    experiment_name in each run's config.yaml). Runs that ended FAILED are listed as
    failed; runs without an end record (running, or killed) as unfinished.
    Raises RunsError when ``runs_dir`` is not a folder."""
    from polar.sinks import read_jsonl

    root = Path(runs_dir)
    if not root.is_dir():
        raise RunsError(f"runs folder {str(root)!r} does not exist (a sweep's paths.runs_dir, "
                        f"default outputs/runs)")
    rows, curves, failed, unfinished = [], [], [], []
    for path in sorted(root.glob(f"*/{names.METRICS_FILE}")):
        if experiment is not None and _run_experiment(path.parent) != experiment:
            continue
        run = read_jsonl(path)
        row, curve = jsonl_record(run, run.params.get(names.RUN_KEY) or path.parent.name)
        name = run.tags.get(names.RUN_NAME_TAG) or path.parent.name
        if run.status in ("FAILED", "KILLED"):
            failed.append(FailedRun(name, path.parent.name, run.tags.get(names.ERROR_TAG, ""), run.status))
        elif row is None or run.status != "FINISHED":
            unfinished.append(name)
        else:
            rows.append(row)
            curves.append(curve)
    return _bundle(rows, curves, failed, unfinished, experiment or str(root), None, None)


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
            numbers = pd.to_numeric(df[col], errors="coerce")
            text = df[col][numbers.isna() & df[col].notna()]
            if len(text):
                raise RunsError(f"{source}: column {col!r} has non-numeric values {text.tolist()[:3]} at rows "
                                f"{[int(i) for i in text.index[:5]]}; every value must be a number")
            df[col] = numbers
    return df
