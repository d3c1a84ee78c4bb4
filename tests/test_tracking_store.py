"""The tracking store on first use and when it cannot be reached (issue 17, items 4, 7, 13, 14).

Ten processes opening a new sqlite store at once all succeed and leave no half-made
migration; experiments are tagged as model training (the MLflow UI opens on the runs
table) and keep their artifacts beside an sqlite database, whatever the working
directory; a job whose server never answered trains, ends with one line that counts the
points awaiting delivery and gives the command that sends them, and that command creates
the run on a real server and delivers every point. (scripts/mlflow_ui_screenshot.sh
checks in a real browser that the UI shows the runs table.)
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

OPEN_STORE = textwrap.dedent("""
    import sys
    from sweeps.runs import create_run, ensure_experiment, find_run
    uri, i = sys.argv[1], sys.argv[2]
    exp = ensure_experiment("first-use", uri)
    create_run(exp, f"job-{i}", {"run_key": f"k{i}", "polar.kind": "job"}, uri)
    assert find_run(exp, f"k{i}", uri) is not None
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_ten_processes_open_a_new_sqlite_store_at_once(tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, str(i)], cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(10)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, "\n".join(o[-2000:] for o in outs if o)
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type = 'table'")]
        (runs,) = con.execute("select count(*) from runs").fetchone()
    assert not [t for t in tables if t.startswith("_alembic_tmp_")]
    assert runs == 10


def test_experiments_are_tagged_as_training_and_keep_artifacts_beside_the_db(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from sweeps.runs import EXPERIMENT_KIND_TAG, JobRun, artifact_root, ui_link
    from sweeps.schema import JobConfig, TrackingConfig

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    job = JobConfig(tracking=TrackingConfig(uri=uri), experiment_name="beside the db")
    run = JobRun.open(job, "k-art", "art-job", tmp_path / "run")
    run.start({"model": "tiny"}, config_yaml="model: tiny\n", overrides=["model=tiny"])
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"0" * 64)
    run.complete(SimpleNamespace(val_loss=0.5, val_acc=0.7, steps=1), model, log_model=True)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("beside the db")
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert artifact_root(uri) == store / "mlartifacts"
    assert ui_link(uri, exp.experiment_id) == \
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    assert ui_link("http://u:TOKEN@host:5000/", "7") == "http://u:***@host:5000/#/experiments/7?workflowType=machine_learning"
    assert exp.artifact_location.endswith(str(store / "mlartifacts" / "beside_the_db"))
    found = {p.relative_to(store).as_posix() for p in (store / "mlartifacts").rglob("*") if p.is_file()}
    rid = run.remote.run_id
    assert {f"mlartifacts/beside_the_db/{rid}/artifacts/{f}" for f in
            ("config.yaml", "overrides.yaml", "model/weights.bin")} <= found
    assert not (elsewhere / "mlruns").exists() and not list(elsewhere.iterdir())


def test_a_missing_sqlite_folder_is_named(tmp_path):
    from sweeps.runs import client

    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        client(f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}")


JOB_WITHOUT_SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    from sweeps.runs import JobRun
    from sweeps.schema import JobConfig
    run_dir = Path(sys.argv[1])
    job = JobConfig(experiment_name="never-reached")          # tracking.uri: from the environment
    run = JobRun.open(job, "k-down", "down-job", run_dir)
    run.start({"model": "tiny", "sweep_id": "s1"}, config_yaml="experiment_name: never-reached\\n",
              overrides=["model=tiny"])
    for step in range(1, 61):
        run.sink.log_many([({"train/loss": 1.0 / step}, step)])
    run.complete(SimpleNamespace(val_loss=0.5, val_acc=0.7, steps=60), run_dir, log_model=False)
    print("trained", flush=True)
""")


def test_a_job_that_never_reached_its_server_trains_then_replay_creates_its_run(tmp_path):
    from mlflow import MlflowClient

    port = free_port()
    secret_uri, uri = f"http://polar:S3CRET@127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "runs" / "k-down"
    env = _env(MLFLOW_TRACKING_URI=secret_uri, POLAR_TRACKING_DRAIN_S="3", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    out = subprocess.run([sys.executable, "-c", JOB_WITHOUT_SERVER, str(run_dir)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "S3CRET" not in text and "MLflow run None" not in text and "Retrying" not in text, text
    assert text.count("cannot be reached") <= 2, text          # the job's notice, the sink's outage line
    last = out.stderr.strip().splitlines()[-1]
    command = f"python -m sweeps.runs replay {run_dir} --uri 'http://polar:***@127.0.0.1:{port}'"
    assert last.endswith(command) and re.search(r"!! 6[0-9] metric points await delivery", last), last
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) > 60        # trained all the same
    assert not (run_dir / "mlflow_run_id").exists()

    with MlflowServer(tmp_path / "server", port=port):
        argv = shlex.split(last.split("send them with: ", 1)[1])
        argv = [sys.executable, *argv[1:-1], uri]                  # the password back in place of ***
        replay = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("never-reached")
        (run,) = client.search_runs([exp.experiment_id], "tags.run_key = 'k-down'")
        assert run.info.status == "FINISHED" and run.info.run_name == "down-job"
        assert run.data.params == {"model": "tiny", "sweep_id": "s1"} and run.data.tags["sweep_id"] == "s1"
        assert run.data.metrics["val/loss_final"] == 0.5
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, 61))
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "overrides.yaml"}
        assert (run_dir / "mlflow_run_id").read_text() == run.info.run_id
        again = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr     # nothing left to send
        assert len(client.search_runs([exp.experiment_id], "tags.run_key = 'k-down'")) == 1
