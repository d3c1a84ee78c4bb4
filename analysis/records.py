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

Before MLflow is asked anything, ``check_tracking_uri`` refuses a URI it cannot read, in
seconds and with one message (MLflow's own client retries an unreachable server for
minutes, and creates an empty store at a mistyped sqlite path or folder: a report never
creates a tracking store). Two finished runs with the same run key (a copied run folder,
a job run twice into MLflow) are kept once when their results agree, and refused when
they differ (``Records.duplicates`` says which one was kept and why).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, get_type_hints
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from polar import names
from polar.names import CURVE_COLUMNS, RECORD_COLUMNS, ScalingRecord

__all__ = ["RECORD_COLUMNS", "CURVE_COLUMNS", "PARAM_COUNTS", "FailedRun", "Records", "RunsError", "check_tracking_uri",
           "load_records", "load_jsonl_records", "read_csv", "complete_records"]

# which parameter count is N in the fits: every parameter (POLAR, Chinchilla) or the
# non-embedding ones (Kaplan et al. 2020: the cleaner law where embeddings are a large share)
PARAM_COUNTS = {"all": "n_params", "nonembed": "n_params_nonembed"}

# run parameters carried beside each record; MLflow holds strings, RunParams says the types
EXTRA_PARAMS = list(names.RECORD_EXTRAS)
_PARAM_TYPES = {k: v for k, v in get_type_hints(names.RunParams).items() if v in (int, float)}
_CURVE_METRICS = {names.VAL_LOSS: "val_loss", names.TOKENS_SEEN: names.TOKENS_SEEN,
                  names.FLOPS_SEEN: names.FLOPS_SEEN}
_DECAY_METRICS = {names.DECAY_VAL_LOSS: "val_loss", names.DECAY_TOKENS: names.TOKENS_SEEN,
                  names.DECAY_FLOPS: names.FLOPS_SEEN}


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
    duplicates: list[str] = field(default_factory=list)  # one line per run key seen twice
    decays: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CURVE_COLUMNS))  # WSD decay points

    def points(self) -> pd.DataFrame:
        """Every converged point: each run's final record and its WSD decay points (a
        decay point is its run at the branch's tokens and FLOPs; run_id RUN@STEP, the
        step where the branch left the run), with a
        column `point` (final | decay). What L(N, D) and the frontier fit on."""
        finals = self.records.reindex(columns=RECORD_COLUMNS).assign(point="final")
        if self.decays.empty:
            return finals
        runs = self.records.set_index("run_id")
        decays = self.decays[self.decays["run_id"].isin(runs.index)]
        decays = pd.DataFrame({
            "run_id": decays["run_id"] + "@" + decays["step"].astype(int).astype(str),
            "model": runs.loc[decays["run_id"], "model"].to_numpy(),
            "n_params": runs.loc[decays["run_id"], "n_params"].to_numpy(),
            "n_params_nonembed": runs.reindex(columns=["n_params_nonembed"]).loc[decays["run_id"]].iloc[:, 0].to_numpy(),
            "tokens": decays[names.TOKENS_SEEN].to_numpy(float), "compute": decays[names.FLOPS_SEEN].to_numpy(float),
            "loss": decays["val_loss"].to_numpy(float), "point": "decay"})
        return pd.concat([finals, decays], ignore_index=True)

    def counting(self, params: str) -> "Records":
        """These records with N (column n_params) = the count ``params`` names (PARAM_COUNTS)."""
        if params not in PARAM_COUNTS:
            raise RunsError(f"the parameter count must be one of {list(PARAM_COUNTS)}, got {params!r}")
        column = PARAM_COUNTS[params]
        if column == "n_params":
            return self
        counts = self.records.reindex(columns=[column])[column]
        if counts.isna().any() or (counts <= 0).any():
            missing = self.records.loc[counts.isna() | (counts <= 0), "run_id"].tolist()
            raise RunsError(f"{len(missing)} run(s) have no {column} (e.g. {missing[:3]}): N cannot count "
                            f"{params!r} parameters for them; use the count 'all'")
        return replace(self, records=self.records.assign(n_params=counts.to_numpy(float)))


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


def _bundle(entries: list[tuple[str, dict, pd.DataFrame, pd.DataFrame]], failed, unfinished, experiment, exp_id,
            uri) -> Records:
    """Records from ``(source, row, curve, decay points)`` entries, one per run key (see _dedupe)."""
    rows, curves, decays, notes = _dedupe(entries)
    records = pd.DataFrame(rows, columns=RECORD_COLUMNS + ["run_name"] + EXTRA_PARAMS)
    records = records.sort_values(["n_params", "compute"], kind="stable").reset_index(drop=True)

    def frame(parts):
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CURVE_COLUMNS)

    return Records(records, frame(curves), failed, unfinished, experiment, exp_id, uri, notes, frame(decays))


# ---------------------------------------------------------------- tracking URI

PROBE_TIMEOUT_S = 5.0
_REMOTE = ("databricks", "databricks-uc", "uc")   # not checked here
_SQL_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
VALID_URIS = ("valid tracking URIs: http(s)://HOST:PORT (a running tracking server), sqlite:///PATH.db "
              "(an existing store; sqlite:////ABSOLUTE/PATH.db), file:///DIR or a folder path (an existing "
              "file store), postgresql://, mysql://, mssql:// (a reachable database), databricks")


def check_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise RunsError, naming ``uri`` (password redacted) and what would be valid, unless
    MLflow can read it without creating anything: a known scheme; for a server, a host
    that answers within ``timeout``; for sqlite or a folder, a store that exists."""
    if uri in _REMOTE:                      # "databricks" alone: the default profile
        return
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as err:                # a port that is not a number, a broken [IPv6] host
        raise RunsError(_refusal(uri, f"it cannot be parsed ({err})")) from None
    scheme = parts.scheme.lower().split("+")[0]
    if len(scheme) == 1:                    # C:\path: a drive letter, not a scheme
        scheme = ""
    if scheme in ("http", "https"):
        _check_server(uri, parts.hostname, port or (443 if scheme == "https" else 80), timeout,
                      http=scheme == "http")
    elif scheme in _SQL_PORTS:
        _check_server(uri, parts.hostname, port or _SQL_PORTS[scheme], timeout)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("", "file"):
        folder = Path(parts.path if scheme == "file" else uri)
        if not folder.is_dir():
            raise RunsError(_refusal(uri, f"the folder {str(folder)!r} does not exist, and a report never "
                                          "creates a tracking store"))
    elif scheme not in _REMOTE:
        raise RunsError(_refusal(uri, f"MLflow cannot read the scheme {parts.scheme!r}"))


def _refusal(uri: str, why: str) -> str:
    from polar.sinks import redact

    return f"tracking URI {redact(uri)!r}: {why}; {VALID_URIS}"


def _check_server(uri: str, host: str | None, port: int, timeout: float, http: bool = False) -> None:
    """A TCP connection to host:port within ``timeout`` (and, for http, any HTTP answer)."""
    if not host:
        raise RunsError(_refusal(uri, "it names no host"))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if http:
                sock.settimeout(timeout)
                sock.sendall(f"GET /health HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                if not sock.recv(16):
                    raise ConnectionError("the connection was closed without an answer")
    except (OSError, ValueError) as err:
        reason = "no answer" if isinstance(err, socket.timeout) else (err.strerror or str(err) or type(err).__name__)
        raise RunsError(_refusal(uri, f"cannot reach {host}:{port} within {timeout:g} s ({reason}); start the "
                                      "tracking server (mlflow server ...) or give the URI the sweep used")) from None


def _check_sqlite(uri: str) -> None:
    """The sqlite file exists and holds an MLflow store (opened read-only: nothing is created)."""
    rest = uri.split("://", 1)[1].split("?", 1)[0]
    path = rest[1:] if rest.startswith("/") else rest
    if not path or path == ":memory:":
        raise RunsError(_refusal(uri, "it names no database file"))
    if not Path(path).is_file():
        raise RunsError(_refusal(uri, f"the database file {str(Path(path).resolve())!r} does not exist, and a "
                                      "report never creates a tracking store (check the path: sqlite:///REL.db "
                                      "is relative to the current folder)"))
    try:
        with sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        raise RunsError(_refusal(uri, f"{path!r} cannot be read as an sqlite database ({err})")) from None
    if "experiments" not in tables:
        raise RunsError(_refusal(uri, f"{path!r} is not an MLflow tracking store (it has no experiments table)"))


# ---------------------------------------------------------------- duplicate run keys

def _dedupe(entries: list[tuple]) -> tuple[list[dict], list[pd.DataFrame], list[pd.DataFrame], list[str]]:
    """Records ``(source, row, curve, decays)`` -> rows, curves, decays, notes: one record per run key.
    Copies that agree on the result are kept once (the one whose source is named after
    the key, else the first), with a note; copies that disagree raise RunsError."""
    by_key: dict[str, list] = {}
    for entry in entries:
        key = entry[1].get(names.RUN_KEY)
        by_key.setdefault(key if key else id(entry), []).append(entry)
    rows, curves, decays, notes = [], [], [], []
    for key, group in by_key.items():
        if len(group) > 1:
            group, note = _one_of(str(key), group)
            notes.append(note)
        rows.append(group[0][1])
        curves.append(group[0][2])
        decays.append(group[0][3])
    return rows, curves, decays, notes


_SAME = ("loss", "n_params", "tokens", "compute")


def _one_of(key: str, group: list) -> tuple[list, str]:
    sources = [src for src, *_ in group]
    results = {tuple(row.get(k) for k in _SAME) for _, row, *_ in group}
    if len(results) > 1:
        losses = ", ".join(f"{src}: loss {row['loss']:.6g}" for src, row, *_ in group)
        raise RunsError(f"run key {key!r} has {len(group)} finished runs with different results ({losses}); "
                        "one run key is one result: remove or move the copies that are wrong and report again")
    named = [e for e in group if Path(e[0]).name == key]
    keep = named[0] if named else group[0]
    why = "its folder is named after the run key" if named else "the first found; all agree on the result"
    return [keep], (f"run key {key!r} appears in {len(group)} finished runs ({', '.join(sources)}) with the "
                    f"same result; kept {keep[0]} ({why})")


# ---------------------------------------------------------------- MLflow

def _experiment(client, experiment: str, uri: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        found = sorted(e.name for e in client.search_experiments())
        from polar.sinks import redact

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


def _curves(client, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's validation curve and its WSD decay points (both CURVE_COLUMNS)."""
    history = {metric: {m.step: m.value for m in client.get_metric_history(run_id, metric)}
               for metric in (*_CURVE_METRICS, *_DECAY_METRICS)}
    return _curve_frame(run_id, history), _curve_frame(run_id, history, _DECAY_METRICS)


def _curve_frame(run_id: str, metrics: Mapping[str, Mapping[int, float]],
                 columns: Mapping[str, str] = _CURVE_METRICS) -> pd.DataFrame:
    """A validation curve (CURVE_COLUMNS) from {metric: {step: value}}: one row per step
    that has a validation loss (columns: the metrics of the curve, or of the decay points)."""
    cols = {col: pd.Series(metrics.get(metric, {}), dtype=float) for metric, col in columns.items()}
    df = pd.DataFrame(cols).rename_axis("step").reset_index()
    df = df.dropna(subset=["val_loss"]).sort_values("step")
    df.insert(0, "run_id", run_id)
    return df[CURVE_COLUMNS].reset_index(drop=True)


def load_records(experiment: str, tracking_uri: str | None = None) -> Records:
    """Read the job runs of ``experiment``: FINISHED ones become records.

    Raises RunsError when the tracking URI cannot be read (check_tracking_uri), when
    MLflow fails, when the experiment does not exist, or when two finished runs with one
    run key disagree. An experiment with no finished runs returns empty frames (callers
    decide whether that is an error).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from polar.sinks import redact

    uri = tracking_uri or mlflow.get_tracking_uri()
    check_tracking_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = _experiment(client, experiment, uri)
        entries, failed, unfinished = _read_runs(client, exp.experiment_id)
    except (MlflowException, RequestException, OSError) as err:
        raise RunsError(f"MLflow at {redact(uri)!r} failed while reading experiment {experiment!r} "
                        f"({type(err).__name__}: {redact(str(err))[:300]})") from None
    return _bundle(entries, failed, unfinished, experiment, exp.experiment_id, uri)


def _read_runs(client, experiment_id: str) -> tuple[list, list[FailedRun], list[str]]:
    """The job runs as (source, row, curve) entries of the FINISHED ones, the failed and
    the unfinished ones."""
    entries, failed, unfinished = [], [], []
    for run in _job_runs(client, experiment_id):
        status, name, rid = run.info.status, run.info.run_name, run.info.run_id
        if status in ("FAILED", "KILLED"):
            failed.append(FailedRun(name, rid, run.data.tags.get(names.ERROR_TAG, ""), status))
            continue
        if status != "FINISHED":
            unfinished.append(name)
            continue
        curve, decays = _curves(client, rid)
        row = _row(rid, name, run.data.params, run.data.metrics.get(names.VAL_LOSS_FINAL), curve)
        if row is None:
            failed.append(FailedRun(name, rid, f"finished without a {names.VAL_LOSS} metric", status))
            continue
        entries.append((f"MLflow run {rid}", row, curve, decays))
    return entries, failed, unfinished


# ---------------------------------------------------------------- metrics.jsonl

def _run_experiment(run_dir: Path) -> str | None:
    """The experiment_name in a run folder's config.yaml (None when unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / names.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return cfg.get("experiment_name") if isinstance(cfg, dict) else None


def jsonl_record(run, run_id: str) -> tuple[dict | None, pd.DataFrame, pd.DataFrame]:
    """One run's metrics.jsonl, read by polar.sinks.read_jsonl, as a record row (None when
    the run logged no validation loss), its curve and its WSD decay points (CURVE_COLUMNS)."""
    curve = _curve_frame(run_id, run.metrics)
    final = run.metrics.get(names.VAL_LOSS_FINAL, {})
    name = run.tags.get(names.RUN_NAME_TAG) or run_id
    row = _row(run_id, name, run.params, final[max(final)] if final else None, curve)
    return row, curve, _curve_frame(run_id, run.metrics, _DECAY_METRICS)


def load_jsonl_records(runs_dir: str | os.PathLike, experiment: str | None = None) -> Records:
    """Records from the ``RUN_KEY/metrics.jsonl`` files under ``runs_dir`` (the jobs'
    ``paths.runs_dir``), keeping only runs of ``experiment`` when given (matched on the
    experiment_name in each run's config.yaml). Runs that ended FAILED are listed as
    failed; runs without an end record (running, or killed) as unfinished. Raises
    RunsError when ``runs_dir`` is not a folder, or when two run folders hold finished
    runs with one run key and different results (copies that agree are kept once)."""
    from polar.sinks import read_jsonl

    root = Path(runs_dir)
    if not root.is_dir():
        raise RunsError(f"runs folder {str(root)!r} does not exist (a sweep's paths.runs_dir, "
                        f"default outputs/runs)")
    entries, failed, unfinished = [], [], []
    for path in sorted(root.glob(f"*/{names.METRICS_FILE}")):
        if experiment is not None and _run_experiment(path.parent) != experiment:
            continue
        run = read_jsonl(path)
        row, curve, decays = jsonl_record(run, run.params.get(names.RUN_KEY) or path.parent.name)
        name = run.tags.get(names.RUN_NAME_TAG) or path.parent.name
        if run.status in ("FAILED", "KILLED"):
            failed.append(FailedRun(name, path.parent.name, run.tags.get(names.ERROR_TAG, ""), run.status))
        elif row is None or run.status != "FINISHED":
            unfinished.append(name)
        else:
            entries.append((str(path.parent), row, curve, decays))
    return _bundle(entries, failed, unfinished, experiment or str(root), None, None)


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
