"""The MLflow run lifecycle: the one module that finds, creates, resumes and ends runs.

- Where: tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's default
  `sqlite:///mlflow.db`, made absolute once by the sweep (`resolved_uri`) so that every job
  logs to the same store whatever its working directory. An sqlite store is created and
  migrated once per process under a file lock (`prepare_store`, called by `client`), so
  that parallel jobs can open a new one; its experiments keep their artifacts beside it,
  in <db folder>/mlartifacts/<experiment name> (`artifact_root`). Experiments are created
  tagged as model training (mlflow.experimentKind); MLflow 3.17's UI picks its view from
  the link instead, so `ui_link` gives the address of an experiment's runs table.
- A sweep (`open_sweep` / `close_sweep`, called by the Hydra callback sweeps.callbacks):
  the experiment, created once before any job starts (parallel creation races in MLflow);
  a parent run (tag polar.kind=sweep) whose children the jobs' runs become; the ids go to
  the jobs through the environment (ENV_*). At the end the parent run is FINISHED, or
  FAILED naming the failed jobs; `terminate_parent_run` fails it when the sweep stops early.
- A job (`JobRun`): its run is found by run key; a finished run is skipped, an interrupted
  one resumed (the run id is kept in RUN_DIR/mlflow_run_id), a run of the key whose folder
  is elsewhere is superseded. Metrics go through polar.sinks (never blocking training) and
  to RUN_DIR/metrics.jsonl; points earlier attempts logged but MLflow lacks are replayed.
  If the server cannot be reached when the job opens, the job still trains and finds or
  creates its run once the server is back.
- Dead runs: a RUNNING run whose process is gone (SIGKILL, OOM; its pid on this host, or
  its SLURM job by sacct) is marked FAILED by the next sweep (`mark_dead_runs`).
- Every run ends through `end_run` (or the sink's finish, for a job's own run): a FAILED,
  KILLED or SCHEDULED run carries its reason in tag polar.error.
- Analysis logs its reports as a run of its own (`log_analysis_run`).
- Secrets: a tracking URI may carry credentials (http://user:TOKEN@host); whatever this
  module, sweeps.callbacks and analysis print or store about a URI goes through `redact`.

CLI: `python -m sweeps.runs replay RUN_DIR [--uri URI]` delivers what a run's
metrics.jsonl holds and its MLflow run lacks; for a job that never reached its server
(no mlflow_run_id), it creates the run first. A job that ends with points undelivered
prints that command, ready to run, as its last line. MLflow is imported inside functions; with
tracking.backend=off only the JSONL file is written.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from polar import names
from polar.atomic import write_text_atomic
from polar.names import (
    CONFIG_FILE,
    ERROR_TAG,
    HOST_TAG,
    KIND_TAG,
    METRICS_FILE,
    OVERRIDES_FILE,
    PID_START_TAG,
    PID_TAG,
    SLURM_JOB_TAG,
)
from polar.sinks import (
    JsonlRun,
    JsonlSink,
    MLflowSink,
    NullSink,
    SkipLogged,
    TeeSink,
    hide_run_urls,
    quiet_urllib3_retries,
    read_jsonl,
    redact,
    shout,
)
from sweeps.schema import JobConfig

ENV_EXPERIMENT_ID = "POLAR_MLFLOW_EXPERIMENT_ID"
ENV_PARENT_RUN_ID = "POLAR_PARENT_RUN_ID"
ENV_SWEEP_ID = "POLAR_SWEEP_ID"
RUN_ID_FILE = "mlflow_run_id"
ARTIFACTS_DIR = "mlartifacts"    # beside an sqlite store: the artifacts of its experiments
# MLflow's experiment-kind tag (MLflow 3): the UI opens a training experiment on its runs table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
MAX_REASON = 4000                # characters of a failure reason kept in tag polar.error
# sacct states of a job that may still write to its run (requeued jobs pass through these)
SLURM_LIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                               "SUSPENDED", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED"})
_UNDELIVERED: list[str] = []     # repeated as the process's last words


# ------------------------------------------------------------ where runs go

# scheme://userinfo@ (also as Hydra writes an override: http\://user\:TOKEN@host)
def resolved_uri(uri: str | None) -> str:
    """The tracking URI a job would use, with a relative sqlite path made absolute."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + os.path.abspath(uri[len(prefix):])
    return uri


def ui_link(uri: str | None, experiment_id: str) -> str:
    """Where the MLflow UI shows an experiment's runs table (MLflow 3.17's UI picks its
    view from ?workflowType, not from the experiment's kind tag); for a store without a
    server, on `mlflow ui`'s default address. Credentials hidden."""
    uri = resolved_uri(uri)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return redact(f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")


def quiet_http_retries() -> None:
    """MLflow retries a failed HTTP call 7 times with backoff (minutes); polar's sink
    retries on its own, so keep MLflow's to 2 unless the user set them, and keep urllib3's
    warning per retry out of the log."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    quiet_urllib3_retries()


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of an sqlite tracking URI (absolute), or None for other stores."""
    uri = resolved_uri(uri)
    prefix = "sqlite:///"
    return Path(uri[len(prefix):].split("?", 1)[0]) if uri.startswith(prefix) else None


def artifact_root(uri: str | None) -> Path | None:
    """Where the artifacts of a store's experiments go: `mlartifacts/` beside an sqlite
    database; None for other stores (a server decides with --artifacts-destination)."""
    db = sqlite_path(uri)
    return db.parent / ARTIFACTS_DIR if db is not None else None


_PREPARED: set[str] = set()


def prepare_store(uri: str | None) -> None:
    """Create and migrate an sqlite store once, under a file lock (<db>.lock beside it),
    before this process touches it: MLflow's own first-use migration races when several
    processes open a new store at once. Once per process and URI; other stores: nothing."""
    db = sqlite_path(uri)
    if db is None or str(db) in _PREPARED:
        return
    if not db.parent.is_dir():
        raise FileNotFoundError(f"the folder of the sqlite tracking store {db} does not exist; create it "
                                "or fix tracking.uri / MLFLOW_TRACKING_URI (sqlite:////absolute/path/mlflow.db)")
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            store = SqlAlchemyStore(resolved_uri(uri), str(artifact_root(uri)))   # creates, migrates
            store.engine.dispose()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _PREPARED.add(str(db))


def sweep_id() -> str:
    """The sweep this process's job belongs to (open_sweep exports it), or "none"."""
    return os.environ.get(ENV_SWEEP_ID, "none")


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str | None):
    """An MlflowClient for `uri` (None: $MLFLOW_TRACKING_URI or MLflow's default); an
    sqlite store is created and migrated first (`prepare_store`)."""
    from mlflow import MlflowClient

    hide_run_urls(uri)
    prepare_store(uri)
    return MlflowClient(uri)


# ------------------------------------------------------------ experiments and runs

def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created when missing: tagged as a model-training
    experiment (MLflow UIs that read the tag open it on its runs table), with its
    artifacts in <artifact_root>/<name> for an sqlite store. Call it once, in the
    submitting process, before jobs start (parallel creation can race in MLflow)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
                             f"--experiment-id {found.experiment_id}`) or choose another experiment_name")
        return found.experiment_id
    root = artifact_root(tracking_uri)
    location = str(root / re.sub(r"[^A-Za-z0-9._-]", "_", name)) if root is not None else None
    try:
        return c.create_experiment(name, artifact_location=location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING})
    except MlflowException:         # created meanwhile by another process
        return c.get_experiment_by_name(name).experiment_id


def find_run(experiment_id: str, run_key: str, tracking_uri: str | None = None):
    """The newest run of this run key in the experiment, or None."""
    runs = client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.{names.RUN_KEY} = '{run_key}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def create_run(experiment_id: str, run_name: str, tags: dict, tracking_uri: str | None = None) -> str:
    run = client(tracking_uri).create_run(experiment_id, run_name=run_name,
                                          tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id


def end_run(mlflow_client, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run with `status`; a reason (why it FAILED, was KILLED or waits) goes to
    tag polar.error. Every run that is not a job's own (ended by its sink) ends here."""
    from mlflow.entities import RunTag

    if reason:
        mlflow_client.log_batch(run_id, tags=[RunTag(ERROR_TAG, redact(reason)[:MAX_REASON])])
    mlflow_client.set_terminated(run_id, status)


# ------------------------------------------------- processes that hold a run open

def process_tags(pid: int | None = None) -> dict[str, str]:
    """host, pid and the pid's start time (so a recycled pid is not taken for the job),
    and the SLURM job inside which it runs, if any (asked with sacct from other hosts)."""
    pid = os.getpid() if pid is None else pid
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_START_TAG: _pid_start(pid) or ""}
    job = slurm_job_id()
    if job:
        tags[SLURM_JOB_TAG] = job
    return tags


def slurm_job_id(env=os.environ) -> str | None:
    """This process's SLURM job as sacct names it: ARRAYJOBID_TASKID for an array task."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def slurm_job_alive(job: str, timeout: float = 15.0) -> bool | None:
    """Whether SLURM's accounting says the job may still run (pending, running,
    requeued, ...); None when sacct is missing or cannot tell."""
    try:
        out = subprocess.run(["sacct", "-j", job, "-n", "-X", "-P", "-o", "State"], capture_output=True,
                             text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not states:
        return None
    return states[-1] in SLURM_LIVE_STATES      # "CANCELLED by 0" -> CANCELLED


def _pid_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]      # field 22: start time in clock ticks


def process_alive(tags: dict) -> bool | None:
    """Whether the process named by a run's tags still runs: from its pid on this host,
    else from its SLURM job's state; None when nobody can tell from here."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return slurm_job_alive(tags[SLURM_JOB_TAG]) if tags.get(SLURM_JOB_TAG) else None
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start, recorded = _pid_start(pid), tags.get(PID_START_TAG)
    return not (start and recorded and start != recorded)


def mark_dead_runs(experiment_id: str, tracking_uri: str | None = None) -> list[str]:
    """End as FAILED every RUNNING run of the experiment whose process is gone (its pid on
    this host, or its SLURM job by sacct), e.g. killed with SIGKILL, by the OOM killer or
    a node failure; returns their names."""
    c, marked = client(tracking_uri), []
    for run in c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if process_alive(tags) is False:
            where = (f"SLURM job {tags[SLURM_JOB_TAG]}" if tags.get(HOST_TAG) != socket.gethostname()
                     else f"the process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)}")
            end_run(c, run.info.run_id, "FAILED", f"{where}, which ran this job, ended without closing its run "
                    "(killed: SIGKILL, out of memory, time limit, node failure?)")
            marked.append(run.info.run_name)
    return marked


# ------------------------------------------------------------ a sweep's parent run

def open_sweep(experiment_name: str, uri: str) -> tuple[str, str, str]:
    """Before any job starts: the experiment, dead runs marked FAILED, and a parent run
    for the sweep; exports the ids for the jobs. Returns (experiment id, parent run id,
    sweep id)."""
    quiet_http_retries()
    new_id = f"{experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        exp_id = ensure_experiment(experiment_name, uri)
    except Exception as err:
        raise RuntimeError(f"MLflow at {redact(uri)} cannot be reached or refused the experiment "
                           f"{experiment_name!r} ({type(err).__name__}: {redact(str(err))[:300]}); start the tracking server (see the "
                           "README) or run with tracking=off") from err
    dead = mark_dead_runs(exp_id, uri)
    if dead:
        print(f"marked FAILED (their process is gone): {', '.join(dead)}", flush=True)
    tags = {KIND_TAG: names.SWEEP, names.SWEEP_ID: new_id, names.GIT_SHA: git_sha(), **process_tags()}
    parent = create_run(exp_id, f"sweep-{new_id}", tags, uri)
    os.environ.update({ENV_EXPERIMENT_ID: exp_id, ENV_PARENT_RUN_ID: parent, ENV_SWEEP_ID: new_id})
    return exp_id, parent, new_id


def close_sweep(uri: str | None, experiment_id: str, run_id: str) -> None:
    """End the parent run: FAILED with the failed jobs' names if any child failed. A parent
    run already ended (terminate_parent_run, when the sweep stopped early) stays as it is."""
    try:
        c = client(uri)
        if c.get_run(run_id).info.status != "RUNNING":
            return
        children = c.search_runs([experiment_id], f"tags.{names.PARENT_RUN_TAG} = '{run_id}'", max_results=10000)
        bad = [r.info.run_name for r in children if r.info.status in ("FAILED", "KILLED")]
        reason = f"{len(bad)} of {len(children)} jobs failed: {', '.join(bad)}" if bad else None
        end_run(c, run_id, "FAILED" if bad else "FINISHED", reason)
    except Exception as err:   # noqa: BLE001 - the jobs' results matter more than the parent's status
        print(f"could not end the sweep's parent run {run_id}: {redact(str(err))}", flush=True)


def terminate_parent_run(reason: str, tracking_uri: str | None = None) -> None:
    """Mark the sweep's parent run FAILED when the sweep stops before or during launch;
    Hydra does not call on_multirun_end after an error, so it would otherwise stay RUNNING."""
    run_id = os.environ.get(ENV_PARENT_RUN_ID)
    if not run_id:
        return
    try:
        end_run(client(tracking_uri), run_id, "FAILED", reason)
    except Exception as err:   # never hide the sweep's own error behind a logging one
        print(f"could not mark the sweep's MLflow run {run_id} as failed: {redact(str(err))}", file=sys.stderr)


# ------------------------------------------------------------ a job's run

class JobRun:
    """The job's MLflow run (or none with tracking=off) plus a JSONL copy of every metric.

    `sink` is what the trainer logs to; `remote` the MLflowSink (None with tracking=off);
    `undelivered` the metric points that never reached MLflow (set when the run ends).
    """

    def __init__(self, job: JobConfig, run_dir: Path, run_id: str | None = None, *, finished: bool = False,
                 final_loss: float | None = None, resumed: bool = False, resolve=None,
                 previous: JsonlRun | None = None):
        self.job, self.run_dir, self.run_id = job, Path(run_dir), run_id
        self.finished, self.final_loss, self.resumed = finished, final_loss, resumed
        # what earlier attempts logged (read by the caller already, when it had to)
        self.previous = previous if previous is not None else read_jsonl(self.run_dir / METRICS_FILE)
        self.labels: dict[str, str] = {}
        self.remote = None
        self.undelivered = 0
        if finished:
            self.sink = NullSink()
            return
        if run_id or resolve:
            self.remote = MLflowSink(run_id, job.tracking.uri, resolve=resolve, client=client(job.tracking.uri))
        # the steps each key logged, not the largest one: a damaged step (55 -> 955) must
        # not drop every later point; the resume point is the checkpoint's
        self.sink = SkipLogged(TeeSink(JsonlSink(self.run_dir / METRICS_FILE), self.remote or NullSink()),
                               self.previous.metrics)

    # ------------------------------------------------------------ open
    @classmethod
    def open(cls, job: JobConfig, key: str, name: str, run_dir: Path) -> "JobRun":
        run = cls._open(job, key, name, Path(run_dir))
        run.labels = {names.RUN_NAME_TAG: name, names.RUN_KEY: key}   # for readers of metrics.jsonl
        return run

    @classmethod
    def _open(cls, job: JobConfig, key: str, name: str, run_dir: Path) -> "JobRun":
        if job.tracking.backend == "off":
            return cls._untracked(job, run_dir)
        quiet_http_retries()
        hide_run_urls(job.tracking.uri)
        uri, saved = job.tracking.uri, _saved_run_id(run_dir)
        prepare_store(uri)                       # a bad sqlite path is an error, not an outage
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
                       final_loss=run.data.metrics.get(names.VAL_LOSS_FINAL))
        if run is not None:
            _refuse_if_running_elsewhere(run, key)
        if run is not None and saved == run.info.run_id:
            return cls(job, run_dir, saved, resumed=True)        # continue the same run
        if run is not None:
            _supersede(run, run_dir, uri)
        if saved:
            shout(f"{run_dir / RUN_ID_FILE} names MLflow run {saved}, which the experiment's runs of key {key} "
                  "do not include; starting a new run (earlier points are replayed from metrics.jsonl)")
        return cls(job, run_dir, _create(exp_id, key, name, run_dir, uri))

    @classmethod
    def _untracked(cls, job, run_dir: Path) -> "JobRun":
        """tracking=off: the run folder alone says whether the run finished (its
        metrics.jsonl ends FINISHED), as MLflow would with tracking on."""
        local = read_jsonl(run_dir / METRICS_FILE)
        if local.status == "FINISHED":
            final = local.metrics.get(names.VAL_LOSS_FINAL, {})
            return cls(job, run_dir, finished=True, final_loss=final[max(final)] if final else None, previous=local)
        return cls(job, run_dir)

    @classmethod
    def _offline(cls, job, key, name, run_dir, saved, err) -> "JobRun":
        local = read_jsonl(run_dir / METRICS_FILE)
        if local.status == "FINISHED":
            final = local.metrics.get(names.VAL_LOSS_FINAL, {})
            return cls(job, run_dir, saved, finished=True, final_loss=final[max(final)] if final else None,
                       previous=local)
        uri = redact(job.tracking.uri or os.environ.get('MLFLOW_TRACKING_URI') or 'the default URI')
        shout(f"MLflow at {uri} cannot be reached ({type(err).__name__}: {redact(str(err))[:200]}); training goes on, metrics go to "
              f"{run_dir / METRICS_FILE} and are delivered when the server is back")
        if saved:
            return cls(job, run_dir, saved, resumed=True, previous=local)

        def resolve(mlflow_client) -> str:      # in the sink's thread, once the server answers
            exp_id = os.environ.get(ENV_EXPERIMENT_ID) or ensure_experiment(job.experiment_name, job.tracking.uri)
            run = find_run(exp_id, key, job.tracking.uri)
            if run is not None and run.info.status != "FINISHED":
                _supersede(run, run_dir, job.tracking.uri)
            return _create(exp_id, key, name, run_dir, job.tracking.uri)

        return cls(job, run_dir, None, resolve=resolve, previous=local)

    # ------------------------------------------------------------ life
    def start(self, params: dict, config_yaml: str | None = None, overrides: list[str] | None = None) -> None:
        """Log the run parameters (on a resume, only those not logged before: e.g. the
        sweep_id of the first sweep stays) and the config artifacts; mark the run RUNNING."""
        import yaml

        config_yaml = redact(config_yaml if config_yaml is not None else self._config_yaml())
        overrides = overrides if overrides is not None else _hydra_overrides()
        overrides_yaml = redact(yaml.safe_dump(list(overrides), default_flow_style=False))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(config_yaml)
        (self.run_dir / OVERRIDES_FILE).write_text(overrides_yaml)
        jsonl = JsonlSink(self.run_dir / METRICS_FILE)
        jsonl.log_params(params)
        if self.labels:
            jsonl.set_tags(self.labels)
        if self.remote is not None:
            self._start_remote(params, config_yaml, overrides_yaml)

    def _start_remote(self, params: dict, config_yaml: str, overrides_yaml: str) -> None:
        remote, previous = self.remote, self.previous

        def new_params(mlflow_client, run_id):
            existing = mlflow_client.get_run(run_id).data.params
            fresh = {k: v for k, v in params.items() if k not in existing}
            if fresh:
                remote.log_params(fresh)

        remote.call(new_params)
        if self.resumed:
            remote.set_status("RUNNING")
            remote.delete_tag(ERROR_TAG)
        remote.set_tags(process_tags())
        remote.log_text(config_yaml, CONFIG_FILE)
        remote.log_text(overrides_yaml, OVERRIDES_FILE)
        if previous.points():
            remote.call(lambda mlflow_client, run_id: replay_missing(previous, remote, mlflow_client))

    def complete(self, result, model_dir: Path, log_model: bool) -> None:
        self.sink.log_many([({names.VAL_LOSS_FINAL: result.val_loss, names.VAL_ACC_FINAL: result.val_acc},
                             result.steps)])
        self.sink.set_tags({names.CHECKPOINT_DIR_TAG: str(self.run_dir.resolve())})
        if self.remote is not None and log_model:
            self.remote.log_artifacts(str(model_dir), "model")
        self._end("FINISHED")

    def requeued(self, why: BaseException) -> None:
        """The job stopped with a checkpoint and SLURM runs it again: the run waits as
        SCHEDULED (not FAILED) until the next attempt resumes it."""
        self._end("SCHEDULED", f"requeued: {why}")

    def fail(self, err: BaseException) -> None:
        try:
            self._end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", f"{type(err).__name__}: {err}")
        except Exception as log_err:   # never hide the original error behind a logging one
            print(f"could not mark the run as failed: {redact(str(log_err))}", file=sys.stderr)

    def _end(self, status: str, reason: str | None = None) -> None:
        if reason:
            self.sink.set_tags({ERROR_TAG: reason[:MAX_REASON]})
        self.undelivered = self.sink.finish(status) or 0
        if self.undelivered:
            if not _UNDELIVERED:
                atexit.register(_last_words)
            _UNDELIVERED.append(f"{self.undelivered} metric points await delivery to MLflow; send them with: "
                                f"{replay_command(self.run_dir, self.job.tracking.uri)}")

    def _config_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(self.job))


def _saved_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.exists() else None


def _create(exp_id: str, key: str, name: str, run_dir: Path, uri: str | None, *, sweep: str | None = None,
            with_process: bool = True) -> str:
    tags = {names.RUN_KEY: key, KIND_TAG: names.JOB, names.SWEEP_ID: sweep or sweep_id(),
            names.GIT_SHA: git_sha(), **(process_tags() if with_process else {})}
    if os.environ.get(ENV_PARENT_RUN_ID):
        tags[names.PARENT_RUN_TAG] = os.environ[ENV_PARENT_RUN_ID]
    run_id = create_run(exp_id, name, tags, uri)
    write_text_atomic(run_dir / RUN_ID_FILE, run_id)
    return run_id


def _refuse_if_running_elsewhere(run, key: str) -> None:
    tags = run.data.tags
    if run.info.status == "RUNNING" and process_alive(tags) and tags.get(PID_TAG) != str(os.getpid()):
        raise RuntimeError(f"run key {key} is being trained right now by process {tags[PID_TAG]} on this host "
                           f"(MLflow run {run.info.run_id}); wait for it to end or kill it first")


def _supersede(run, run_dir: Path, uri: str | None) -> None:
    """A run of this key whose checkpoint folder is not ours (gone, or elsewhere): end it
    as FAILED, saying which folder replaced it, so that it is not taken for a result."""
    if run.info.status not in ("FAILED", "KILLED"):
        end_run(client(uri), run.info.run_id, "FAILED", f"superseded: its checkpoint folder is not {run_dir}; "
                "the job started again in a new run")


def _hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:   # noqa: BLE001 - not under Hydra
        return []


def replay_command(run_dir: Path, uri: str | None) -> str:
    """The command that sends what a run folder holds and MLflow lacks (password hidden:
    put it back in place of *** to run it)."""
    uri = redact(uri or os.environ.get("MLFLOW_TRACKING_URI") or resolved_uri(None))
    return f"python -m sweeps.runs replay {shlex.quote(str(Path(run_dir).resolve()))} --uri {shlex.quote(uri)}"


def _last_words() -> None:
    """The process's last lines on stderr: per run, the points awaiting delivery and
    the command that sends them."""
    print("\n" + "!" * 78, file=sys.stderr)
    for note in _UNDELIVERED:
        print(f"!! {note}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ replay

def replay_missing(source, sink, mlflow_client=None) -> int:
    """Queue into `sink` (an MLflowSink) the metric points of a metrics.jsonl (or a JsonlRun
    read earlier) that its MLflow run lacks, compared by key and step; returns how many.
    Reads the run's history, so it needs the server (queue it with sink.call when it may
    be away)."""
    run = source if isinstance(source, JsonlRun) else read_jsonl(source)
    mlflow_client = mlflow_client or sink.client
    missing = []
    for key, steps in run.metrics.items():
        have = {m.step for m in mlflow_client.get_metric_history(sink.run_id, key)}
        missing += [({key: v}, s) for s, v in sorted(steps.items()) if s not in have]
    if missing:
        sink.log_many(missing)
    return len(missing)


def replay(run_dir: str | Path, uri: str | None = None, timeout: float = 300.0) -> int:
    """Deliver what RUN_DIR/metrics.jsonl holds and its MLflow run lacks; returns the
    number of points still undelivered (0 on success). A folder without mlflow_run_id
    (its job never reached the server) gets its run created first (`_replay_run`)."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: not the run folder of a job "
                                "(outputs/runs/<run key>/ holds one)")
    quiet_http_retries()
    hide_run_urls(uri)
    local = read_jsonl(run_dir / METRICS_FILE)
    run_id = _saved_run_id(run_dir)
    sink = MLflowSink(run_id or _replay_run(run_dir, local, uri), uri, client=client(uri))
    if run_id is None:
        _replay_start(sink, run_dir, local)
    sent = replay_missing(local, sink)
    if local.status in ("FINISHED", "FAILED", "KILLED"):
        return sink.finish(local.status, timeout=timeout) or 0
    sink.flush(timeout)
    print(f"replayed {sent} points into MLflow run {run_id}", flush=True)
    return sink.pending_points


def _replay_run(run_dir: Path, local: JsonlRun, uri: str | None) -> str:
    """Create the MLflow run of a job that never reached its server, as the job would
    have (experiment from config.yaml, run key and name from metrics.jsonl's tags), with
    its params and config artifacts; returns its id (also written to mlflow_run_id)."""
    import yaml

    key, name = local.tags.get(names.RUN_KEY), local.tags.get(names.RUN_NAME_TAG)
    config_path = run_dir / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    experiment = config.get("experiment_name") if isinstance(config, dict) else None
    if not (key and name and experiment):
        raise ValueError(f"{run_dir} lacks what its MLflow run is made from: the tags {names.RUN_KEY} and "
                         f"{names.RUN_NAME_TAG} in {METRICS_FILE} (found {key!r}, {name!r}) and experiment_name "
                         f"in {CONFIG_FILE} (found {experiment!r}); is it a job's run folder?")
    exp_id = ensure_experiment(experiment, uri)
    run = find_run(exp_id, key, uri)
    if run is not None and run.info.status == "FINISHED":
        raise RuntimeError(f"run key {key} already has a FINISHED MLflow run ({run.info.run_id}) in experiment "
                           f"{experiment!r}; {run_dir} is another attempt: delete that run first to replace it")
    if run is not None:
        _supersede(run, run_dir, uri)
    run_id = _create(exp_id, key, name, run_dir, uri, sweep=local.params.get(names.SWEEP_ID, "none"),
                     with_process=False)
    print(f"created MLflow run {run_id} ({name}) in experiment {experiment!r} for {run_dir}", flush=True)
    return run_id


def _replay_start(sink: MLflowSink, run_dir: Path, local: JsonlRun) -> None:
    """Queue what JobRun.start (and complete: the model, under 1B parameters) would have
    logged into a run created by replay; a job that ended without a status (killed) has
    its run end FAILED, saying so."""
    sink.log_params(local.params)
    for artifact in (CONFIG_FILE, OVERRIDES_FILE):
        if (run_dir / artifact).is_file():
            sink.log_text((run_dir / artifact).read_text(), artifact)
    tags = dict(local.tags)
    if local.status == "FINISHED":
        tags.pop(ERROR_TAG, None)              # an earlier attempt's failure, resumed since
    if local.status is None:
        tags[ERROR_TAG] = f"replayed from {run_dir}, whose job ended without a status (killed?)"
        local.status = "FAILED"
    sink.set_tags(tags)
    model, n_params = run_dir / "model", local.params.get("n_params", "")
    if local.status == "FINISHED" and model.is_dir() and n_params.isdigit() and int(n_params) < 1e9:
        sink.log_artifacts(str(model), "model")     # as the job's complete() logs it


# ------------------------------------------------------------ analysis runs

def log_analysis_run(experiment_id: str, tracking_uri: str | None, files, *, params=None, metrics=None,
                     run_name: str = "analysis") -> str:
    """Log an analysis run (tag polar.kind = analysis) with `files` as artifacts."""
    import math

    c = client(tracking_uri)
    rid = c.create_run(experiment_id, run_name=run_name, tags={KIND_TAG: names.ANALYSIS}).info.run_id
    try:
        for k, v in (params or {}).items():
            c.log_param(rid, k, v)
        for k, v in (metrics or {}).items():
            if v is not None and math.isfinite(v):
                c.log_metric(rid, k, float(v))
        for f in files:
            c.log_artifact(rid, str(f))
    except Exception as err:
        end_run(c, rid, "FAILED", f"{type(err).__name__}: {err}")
        raise
    end_run(c, rid, "FINISHED")
    return rid


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sweeps.runs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="deliver a run's metrics.jsonl points that its MLflow run lacks")
    rp.add_argument("run_dir")
    rp.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    a = ap.parse_args()
    sys.exit(1 if replay(a.run_dir, a.uri) else 0)
