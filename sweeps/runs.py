"""The job's tracking: its MLflow run (found by run key, created, resumed, ended) and a
JSONL copy of every metric beside its checkpoints.

- Where: job.tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's default
  `sqlite:///mlflow.db` in the working directory.
- Resume: the run id is kept in RUN_DIR/mlflow_run_id; a re-run of the same run key
  continues that run. Points the trainer logs again after a resume are dropped
  (polar.tracking.SkipLogged), and points of earlier attempts that never reached MLflow
  are replayed from RUN_DIR/metrics.jsonl.
- Outages: every MLflow call goes through polar.tracking.MLflowSink's delivery thread,
  so training never waits on the server; if the server cannot be reached when the job
  opens, the job still trains and finds or creates its run once the server is back.
  This module lowers MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by
  default: minutes per call) to 2 unless set, since the sink retries with backoff itself.
- Failures: an exception ends the run FAILED (KeyboardInterrupt: KILLED) with the message
  in tag polar.error; a run whose process died without a word (SIGKILL, OOM) is found by
  its host/pid tags and marked FAILED by the next sweep (polar.tracking.mark_dead_runs).
- Config: the resolved job config and the Hydra overrides are logged as artifacts
  config.yaml and overrides.yaml, and written beside the checkpoints.

CLI: `python -m sweeps.runs replay RUN_DIR [--uri URI]` delivers what a run's
metrics.jsonl holds and its MLflow run lacks. MLflow is imported lazily; with
tracking.backend=off only the JSONL file is written.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

from sweeps.schema import JobConfig

ENV_EXPERIMENT_ID = "POLAR_MLFLOW_EXPERIMENT_ID"
ENV_PARENT_RUN_ID = "POLAR_PARENT_RUN_ID"
ENV_SWEEP_ID = "POLAR_SWEEP_ID"
RUN_ID_FILE = "mlflow_run_id"
METRICS_FILE = "metrics.jsonl"
_UNDELIVERED: list[str] = []     # repeated as the process's last words


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def quiet_http_retries() -> None:
    """MLflow retries a failed HTTP call 7 times with backoff (minutes); polar's sink
    retries on its own, so keep MLflow's to 2 unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class Tracker:
    """The job's MLflow run (or none with tracking=off) plus a JSONL copy of every metric.

    `sink` is what the trainer logs to; `remote` the MLflowSink (None with tracking=off);
    `undelivered` the metric points that never reached MLflow (set when the run ends).
    """

    def __init__(self, job: JobConfig, run_dir: Path, run_id: str | None = None, *, finished: bool = False,
                 final_loss: float | None = None, resumed: bool = False, resolve=None):
        from polar.tracking import JsonlSink, MLflowSink, NullSink, SkipLogged, TeeSink, read_jsonl

        self.job, self.run_dir, self.run_id = job, Path(run_dir), run_id
        self.finished, self.final_loss, self.resumed = finished, final_loss, resumed
        self.previous = read_jsonl(self.run_dir / METRICS_FILE)   # what earlier attempts logged
        self.labels: dict[str, str] = {}
        self.remote = None
        self.undelivered = 0
        if finished:
            self.sink = NullSink()
            return
        if run_id or resolve:
            self.remote = MLflowSink(run_id, job.tracking.uri, resolve=resolve)
        self.sink = SkipLogged(TeeSink(JsonlSink(self.run_dir / METRICS_FILE), self.remote or NullSink()),
                               self.previous.last_steps())

    # ------------------------------------------------------------ open
    @classmethod
    def open(cls, job: JobConfig, key: str, name: str, run_dir: Path) -> "Tracker":
        tracker = cls._open(job, key, name, Path(run_dir))
        tracker.labels = {"mlflow.runName": name, "run_key": key}   # for readers of metrics.jsonl
        return tracker

    @classmethod
    def _open(cls, job: JobConfig, key: str, name: str, run_dir: Path) -> "Tracker":
        if job.tracking.backend == "off":
            return cls(job, run_dir)
        from polar.tracking import ensure_experiment, find_run, mark_dead_runs, shout

        quiet_http_retries()
        uri, saved = job.tracking.uri, _saved_run_id(run_dir)
        try:
            exp_id = os.environ.get(ENV_EXPERIMENT_ID)
            if not exp_id:                       # not under a sweep: do the sweep's housekeeping
                exp_id = ensure_experiment(job.experiment_name, uri)
                mark_dead_runs(exp_id, uri)
            run = find_run(exp_id, key, uri)
        except Exception as err:                 # noqa: BLE001 - server away: train, log later
            if getattr(err, "error_code", None) == "INVALID_PARAMETER_VALUE":
                raise
            return cls._offline(job, key, name, run_dir, saved, err)
        if run is not None and run.info.status == "FINISHED":
            return cls(job, run_dir, run.info.run_id, finished=True,
                       final_loss=run.data.metrics.get("val/loss_final"))
        if run is not None:
            _refuse_if_running_elsewhere(run, key)
        if run is not None and saved == run.info.run_id:
            return cls(job, run_dir, saved, resumed=True)        # continue the same run
        if run is not None:
            _supersede(run, run_dir, uri)
        if saved:
            shout(f"{run_dir / RUN_ID_FILE} names MLflow run {saved}, which the experiment's runs of key {key} "
                  "do not include; starting a new run (earlier points are replayed from metrics.jsonl)")
        run_id = _create(exp_id, key, name, run_dir, uri)
        return cls(job, run_dir, run_id)

    @classmethod
    def _offline(cls, job, key, name, run_dir, saved, err) -> "Tracker":
        from polar.tracking import ensure_experiment, find_run, read_jsonl, shout

        local = read_jsonl(run_dir / METRICS_FILE)
        if local.status == "FINISHED":
            final = local.metrics.get("val/loss_final", {})
            return cls(job, run_dir, saved, finished=True, final_loss=final[max(final)] if final else None)
        shout(f"MLflow at {job.tracking.uri or os.environ.get('MLFLOW_TRACKING_URI') or 'the default URI'} "
              f"cannot be reached ({type(err).__name__}: {str(err)[:200]}); training goes on, metrics go to "
              f"{run_dir / METRICS_FILE} and are delivered when the server is back")
        if saved:
            return cls(job, run_dir, saved, resumed=True)

        def resolve(client) -> str:              # in the sink's thread, once the server answers
            exp_id = os.environ.get(ENV_EXPERIMENT_ID) or ensure_experiment(job.experiment_name, job.tracking.uri)
            run = find_run(exp_id, key, job.tracking.uri)
            if run is not None and run.info.status != "FINISHED":
                _supersede(run, run_dir, job.tracking.uri)
            return _create(exp_id, key, name, run_dir, job.tracking.uri)

        return cls(job, run_dir, None, resolve=resolve)

    # ------------------------------------------------------------ life
    def start(self, params: dict, config_yaml: str | None = None, overrides: list[str] | None = None) -> None:
        """Log the run parameters (on a resume, only those not logged before: e.g. the
        sweep_id of the first sweep stays) and the config artifacts; mark the run RUNNING."""
        import yaml

        from polar.tracking import ERROR_TAG, JsonlSink, process_tags, replay_missing

        config_yaml = config_yaml if config_yaml is not None else self._config_yaml()
        overrides = overrides if overrides is not None else _hydra_overrides()
        overrides_yaml = yaml.safe_dump(list(overrides), default_flow_style=False)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_yaml)
        (self.run_dir / "overrides.yaml").write_text(overrides_yaml)
        jsonl = JsonlSink(self.run_dir / METRICS_FILE)
        jsonl.log_params(params)
        if self.labels:
            jsonl.set_tags(self.labels)
        if self.remote is None:
            return
        remote, previous = self.remote, self.previous

        def new_params(client, run_id):
            existing = client.get_run(run_id).data.params
            fresh = {k: v for k, v in params.items() if k not in existing}
            if fresh:
                remote.log_params(fresh)

        remote.call(new_params)
        if self.resumed:
            remote.set_status("RUNNING")
            remote.delete_tag(ERROR_TAG)
        remote.set_tags(process_tags())
        remote.log_text(config_yaml, "config.yaml")
        remote.log_text(overrides_yaml, "overrides.yaml")
        if previous.points():
            remote.call(lambda client, run_id: replay_missing(previous, remote, client))

    def complete(self, result, model_dir: Path, log_model: bool) -> None:
        self.sink.log_many([({"val/loss_final": result.val_loss, "val/acc_final": result.val_acc}, result.steps)])
        self.sink.set_tags({"checkpoint_dir": str(self.run_dir.resolve())})
        if self.remote is not None and log_model:
            self.remote.log_artifacts(str(model_dir), "model")
        self._finish("FINISHED")

    def requeued(self, why: BaseException) -> None:
        """The job stopped with a checkpoint and SLURM runs it again: the run waits as
        SCHEDULED (not FAILED) until the next attempt resumes it."""
        from polar.tracking import ERROR_TAG

        self.sink.set_tags({ERROR_TAG: f"requeued: {why}"})
        self._finish("SCHEDULED")

    def fail(self, err: BaseException) -> None:
        from polar.tracking import ERROR_TAG

        message = f"{type(err).__name__}: {err}"[:4000]
        try:
            self.sink.set_tags({ERROR_TAG: message})
            self._finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except Exception as log_err:   # never hide the original error behind a logging one
            print(f"could not mark the run as failed: {log_err}", file=sys.stderr)

    def _finish(self, status: str) -> None:
        self.undelivered = self.sink.finish(status) or 0
        if self.undelivered:
            run_id = self.remote.run_id if self.remote is not None else self.run_id
            note = (f"run {run_id} ({self.run_dir}): {self.undelivered} metric points NOT delivered to "
                    f"MLflow; replay them with `python -m sweeps.runs replay {self.run_dir}`")
            if not _UNDELIVERED:
                atexit.register(_last_words)
            _UNDELIVERED.append(note)

    def _config_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(self.job))


# ------------------------------------------------------------ helpers

def _saved_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.exists() else None


def _create(exp_id: str, key: str, name: str, run_dir: Path, uri: str | None) -> str:
    from polar.tracking import create_run, process_tags

    tags = {"run_key": key, "polar.kind": "job", "sweep_id": os.environ.get(ENV_SWEEP_ID, "none"),
            "git_sha": git_sha(), **process_tags()}
    if os.environ.get(ENV_PARENT_RUN_ID):
        tags["mlflow.parentRunId"] = os.environ[ENV_PARENT_RUN_ID]
    run_id = create_run(exp_id, name, tags, uri)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_ID_FILE}.{os.getpid()}"
    tmp.write_text(run_id)
    os.replace(tmp, run_dir / RUN_ID_FILE)
    return run_id


def _refuse_if_running_elsewhere(run, key: str) -> None:
    from polar.tracking import PID_TAG, process_alive

    tags = run.data.tags
    if run.info.status == "RUNNING" and process_alive(tags) and tags.get(PID_TAG) != str(os.getpid()):
        raise RuntimeError(f"run key {key} is being trained right now by process {tags[PID_TAG]} on this host "
                           f"(MLflow run {run.info.run_id}); wait for it to end or kill it first")


def _supersede(run, run_dir: Path, uri: str | None) -> None:
    """A run of this key whose checkpoint folder is not ours (gone, or elsewhere): end it
    as FAILED, saying which folder replaced it, so that it is not taken for a result."""
    from mlflow import MlflowClient

    from polar.tracking import ERROR_TAG

    if run.info.status in ("FAILED", "KILLED"):
        return
    client = MlflowClient(uri)
    client.set_tag(run.info.run_id, ERROR_TAG, f"superseded: its checkpoint folder is not {run_dir}; "
                   "the job started again in a new run")
    client.set_terminated(run.info.run_id, "FAILED")


def _hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:   # noqa: BLE001 - not under Hydra
        return []


def _last_words() -> None:
    from polar.tracking import shout

    for note in _UNDELIVERED:
        shout(note)


def replay(run_dir: str | Path, uri: str | None = None, timeout: float = 300.0) -> int:
    """Deliver what RUN_DIR/metrics.jsonl holds and its MLflow run lacks; returns the
    number of points still undelivered (0 on success)."""
    from polar.tracking import MLflowSink, read_jsonl, replay_missing

    run_dir = Path(run_dir)
    run_id = _saved_run_id(run_dir)
    if run_id is None:
        raise FileNotFoundError(f"no {RUN_ID_FILE} in {run_dir}: not a run folder of a tracked job")
    quiet_http_retries()
    local = read_jsonl(run_dir / METRICS_FILE)
    sink = MLflowSink(run_id, uri)
    sent = replay_missing(local, sink)
    if local.status in ("FINISHED", "FAILED", "KILLED"):
        return sink.finish(local.status, timeout=timeout) or 0
    sink.flush(timeout)
    print(f"replayed {sent} points into MLflow run {run_id}", flush=True)
    return sink.pending_points



def terminate_parent_run(reason: str, tracking_uri: str | None = None) -> None:
    """Mark the sweep's MLflow parent run (created by sweeps.callbacks.MlflowSweep before the
    launcher runs) FAILED when the sweep stops before or during launch; Hydra does not call
    on_multirun_end after an error, so it would otherwise stay RUNNING."""
    run_id = os.environ.get(ENV_PARENT_RUN_ID)
    if not run_id:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        client.set_tag(run_id, "polar.error", reason[:4000])
        client.set_terminated(run_id, "FAILED")
    except Exception as err:   # never hide the sweep's own error behind a logging one
        print(f"could not mark the sweep's MLflow run {run_id} as failed: {err}", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sweeps.runs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="deliver a run's metrics.jsonl points that its MLflow run lacks")
    rp.add_argument("run_dir")
    rp.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    a = ap.parse_args()
    sys.exit(1 if replay(a.run_dir, a.uri) else 0)
