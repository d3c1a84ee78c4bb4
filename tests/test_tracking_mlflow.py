"""Tracking against real MLflow: a `mlflow server` started here (127.0.0.1, free port,
sqlite behind it) and the embedded default (sqlite:///mlflow.db in the working directory).

16 processes logging at once lose no point; a sweep job killed with SIGKILL is marked
FAILED by the next sweep and resumed into its own run with a continuous history; the
server stopped in the middle of a run and restarted loses no point, even for a job that
opened while it was down. The server starts once for the module (15 to 40 s here).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures import TINY_SWEEP
from tests.mlflow_server import MlflowServer, log_points_worker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as s:
        yield s


@pytest.fixture(scope="module", params=["server", "sqlite-default"])
def store(request, tmp_path_factory):
    """(tracking URI, working directory, extra env): the server, or MLflow's default
    sqlite file in the working directory with MLFLOW_TRACKING_URI unset."""
    if request.param == "server":
        s = request.getfixturevalue("server")
        return SimpleNamespace(uri=s.uri, cwd=s.root, env={"MLFLOW_TRACKING_URI": s.uri}, kind="server")
    cwd = tmp_path_factory.mktemp("embedded")
    return SimpleNamespace(uri=f"sqlite:///{cwd}/mlflow.db", cwd=cwd, env={}, kind="sqlite")


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


# ------------------------------------------------------------------ 16 processes

def test_sixteen_processes_logging_at_once_lose_no_point(store, monkeypatch):
    from sweeps.runs import create_run, ensure_experiment

    monkeypatch.chdir(store.cwd)           # nothing is written to the working directory
    n_jobs, steps, flush_every = 16, 300, 25
    exp = ensure_experiment(f"parallel-{store.kind}", store.uri)
    run_ids = [create_run(exp, f"job-{i}", {"polar.kind": "job"}, store.uri) for i in range(n_jobs)]
    ctx = mp.get_context("forkserver")      # 16 fresh processes; mlflow imported once, in the server
    ctx.set_forkserver_preload(["mlflow", "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store",
                                "mlflow.store.tracking.rest_store", "polar.sinks", "tests.mlflow_server"])
    barrier = ctx.Barrier(n_jobs)
    procs = [ctx.Process(target=log_points_worker, args=(rid, store.uri, steps, flush_every, barrier))
             for rid in run_ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
    assert [p.exitcode for p in procs] == [0] * n_jobs
    client = _client(store.uri)
    vals = list(range(flush_every, steps + 1, flush_every))
    for rid in run_ids:
        assert _steps(client, rid, "train/loss") == list(range(1, steps + 1))
        assert _steps(client, rid, "lr") == list(range(1, steps + 1))
        assert _steps(client, rid, "val/loss") == _steps(client, rid, "flops_seen") == vals
        assert client.get_run(rid).info.status == "FINISHED"


# ------------------------------------------------------------------ SIGKILL + resume

TINY = ["model=100k", *TINY_SWEEP, "train.n_evals=6", "train.eval_spacing=linear",
        "budget.tokens=2e5"]   # 403 steps, about 10 s of training here


def _sweep_cmd(store, name):
    return [sys.executable, "-m", "sweeps.run", "-m", *TINY, f"experiment_name={name}",
            f"paths.cache_dir={store.cwd}/cache", f"paths.runs_dir={store.cwd}/runs-{name}",
            f"hydra.sweep.dir={store.cwd}/multirun-{name}"]


def _env(store):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **store.env}


def _sweep_until_evals(store, name: str, evals: int):
    """Start a one-job sweep and return (process, runs folder) once it has logged `evals`
    validation points, still running."""
    from polar.sinks import read_jsonl

    proc = subprocess.Popen(_sweep_cmd(store, name), cwd=store.cwd, env=_env(store),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs_dir, deadline = Path(store.cwd) / f"runs-{name}", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        files = list(runs_dir.glob("*/metrics.jsonl"))
        if files and len(read_jsonl(files[0]).metrics.get("val/loss", {})) >= evals:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the job ended before it could be stopped:\n{proc.stdout.read()[-3000:]}"
    return proc, runs_dir


def test_a_killed_job_is_marked_failed_then_resumes_into_one_continuous_run(store):
    from polar.sinks import read_jsonl
    from polar.trainer import eval_steps

    name = f"killed-{store.kind}"
    proc, runs_dir = _sweep_until_evals(store, name, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = [f.parent for f in runs_dir.glob("*/metrics.jsonl")]
    assert read_jsonl(run_dir / "metrics.jsonl").status is None          # killed part-way
    run_id = (run_dir / "mlflow_run_id").read_text()
    client = _client(store.uri)
    assert client.get_run(run_id).info.status == "RUNNING"

    again = subprocess.run(_sweep_cmd(store, name), cwd=store.cwd, env=_env(store), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "marked FAILED (their process is gone): polar-100k-T2e05-s0" in again.stdout

    exp = client.get_experiment_by_name(name)
    jobs = client.search_runs([exp.experiment_id], "tags.`polar.kind` = 'job'")
    assert [r.info.run_id for r in jobs] == [run_id]                      # no duplicate run
    run = jobs[0]
    assert run.info.status == "FINISHED" and "polar.error" not in run.data.tags
    steps = int(run.data.params["steps"])
    assert _steps(client, run_id, "train/loss") == list(range(1, steps + 1))   # no gap, no repeat
    assert _steps(client, run_id, "val/loss") == _steps(client, run_id, "tokens_seen") == eval_steps(steps, 6,
                                                                                                     "linear")
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "overrides.yaml", "model"}
    overrides = Path(client.download_artifacts(run_id, "overrides.yaml", str(run_dir))).read_text()
    assert "- model=100k" in overrides and f"experiment_name={name}" in overrides
    parents = {r.info.status for r in client.search_runs([exp.experiment_id], "tags.`polar.kind` = 'sweep'")}
    assert parents == {"FAILED", "FINISHED"}        # the killed sweep's parent, marked; the second one
    if store.kind == "sqlite":
        assert (Path(store.cwd) / "mlflow.db").exists()   # the embedded default, in the working directory


# ------------------------------------------------------------------ failure, re-run

def test_a_failed_run_says_why_and_a_rerun_resumes_it_replaying_what_mlflow_lacks(store, tmp_path, monkeypatch):
    from polar.sinks import JsonlSink
    from sweeps.runs import JobRun
    from sweeps.schema import JobConfig, TrackingConfig

    monkeypatch.chdir(store.cwd)           # nothing is written to the working directory
    job = JobConfig(tracking=TrackingConfig(uri=store.uri), experiment_name=f"fail-{store.kind}")
    run_dir = tmp_path / "run"
    first = JobRun.open(job, "k-fail", "polar-tiny-fail", run_dir)
    first.start({"model": "tiny", "sweep_id": "one"}, config_yaml="model: tiny\n", overrides=["model=tiny"])
    first.sink.log_many([({"train/loss": 1.0}, s) for s in range(1, 11)])
    first.fail(FloatingPointError("non-finite training loss nan at step 11"))
    client = _client(store.uri)
    run = client.get_run(first.remote.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["polar.error"] == "FloatingPointError: non-finite training loss nan at step 11"
    # points that reached metrics.jsonl but not MLflow (a kill between the two)
    JsonlSink(run_dir / "metrics.jsonl").log_many([({"train/loss": 0.9}, s) for s in range(11, 16)])

    again = JobRun.open(job, "k-fail", "polar-tiny-fail", run_dir)
    assert again.resumed and again.run_id == first.remote.run_id
    again.start({"model": "tiny", "sweep_id": "two"})
    again.sink.log_many([({"train/loss": 0.8}, s) for s in range(12, 21)])   # 12..15 already logged
    again.complete(SimpleNamespace(val_loss=0.5, val_acc=0.7, steps=20), run_dir, log_model=False)
    run = client.get_run(again.run_id)
    assert run.info.status == "FINISHED" and "polar.error" not in run.data.tags
    assert run.data.params["sweep_id"] == "one" and run.data.tags["checkpoint_dir"] == str(run_dir.resolve())
    assert _steps(client, again.run_id, "train/loss") == list(range(1, 21))
    assert {a.path for a in client.list_artifacts(again.run_id)} == {"config.yaml", "overrides.yaml"}
    assert len(client.search_runs([run.info.experiment_id], "tags.run_key = 'k-fail'")) == 1


# ------------------------------------------------------------------ server outage

def test_server_stopped_mid_run_and_restarted_loses_no_point(server, tmp_path, monkeypatch):
    from polar.sinks import MLflowSink
    from sweeps.runs import JobRun, create_run, ensure_experiment
    from sweeps.schema import JobConfig, TrackingConfig

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # polar's own retries do the work
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    exp = ensure_experiment("outage", server.uri)
    run_id = create_run(exp, "outage", {"polar.kind": "job"}, server.uri)
    sink = MLflowSink(run_id, server.uri, backoff=(0.2, 2.0))
    sink.log_many([({"train/loss": 1.0, "lr": 0.1}, s) for s in range(1, 101)])
    assert sink.flush(60)

    server.stop()
    try:
        t0 = time.perf_counter()
        for start in range(101, 301, 20):
            sink.log_many([({"train/loss": 1.0, "lr": 0.1}, s) for s in range(start, start + 20)])
        assert time.perf_counter() - t0 < 1.0                        # training did not wait
        # a job that opens while the server is down trains, then finds its run later
        job = JobConfig(tracking=TrackingConfig(uri=server.uri), experiment_name="outage")
        late = JobRun.open(job, "k-late", "late-job", tmp_path / "late")
        late.start({"model": "tiny"}, config_yaml="model: tiny\n", overrides=["model=tiny"])
        late.sink.log_many([({"train/loss": 0.5}, s) for s in range(1, 51)])
        time.sleep(1.0)
        assert sink.failures > 0 and sink.pending_points > 0
    finally:
        server.start()
    assert sink.finish("FINISHED", timeout=120) == 0
    late.complete(SimpleNamespace(val_loss=0.4, val_acc=0.6, steps=50), tmp_path, log_model=False)
    assert late.undelivered == 0

    client = _client(server.uri)
    assert _steps(client, run_id, "train/loss") == list(range(1, 301))
    assert _steps(client, run_id, "lr") == list(range(1, 301))
    (late_run,) = client.search_runs([exp], "tags.run_key = 'k-late'")
    assert late_run.info.status == "FINISHED" and late_run.data.params["model"] == "tiny"
    assert _steps(client, late_run.info.run_id, "train/loss") == list(range(1, 51))
    assert (tmp_path / "late" / "mlflow_run_id").read_text() == late_run.info.run_id


def test_a_terminated_job_ends_its_run_failed_at_once(store):
    from polar.sinks import read_jsonl

    name = f"sigterm-{store.kind}"
    proc, runs_dir = _sweep_until_evals(store, name, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    (run_dir,) = [f.parent for f in runs_dir.glob("*/metrics.jsonl")]
    run = _client(store.uri).get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"
    assert "SIGTERM" in run.data.tags["polar.error"]
    assert read_jsonl(run_dir / "metrics.jsonl").status == "FAILED"
