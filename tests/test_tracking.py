"""Tracking without a server: the JSONL file, resume filtering, the MLflow sink's queue,
retries and loud reporting (against a scripted client), liveness of a run's process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from analysis.records import jsonl_record
from polar.sinks import PERMANENT_ERRORS, JsonlSink, MLflowSink, SkipLogged, TeeSink, read_jsonl
from sweeps.runs import process_alive, process_tags
from tests.fixtures import ListSink


def test_jsonl_round_trip_into_the_analysis_shapes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log_params({"model": "1m", "n_params": 1000, "n_params_nonembed": 800, "tokens": 5e5,
                     "compute": 3e9, "run_key": "abc"})
    sink.log_many([({"train/loss": 0.7}, 1), ({"val/loss": 0.69, "tokens_seen": 100, "flops_seen": 6e5}, 1)])
    sink.log_many([({"decay/val_loss": 0.55, "decay/tokens_seen": 150, "decay/flops_seen": 9e5}, 2)])
    sink.log_many([({"val/loss": 0.5, "tokens_seen": 200, "flops_seen": 1.2e6}, 2)])
    sink.log_many([({"val/loss_final": 0.5}, 2)])
    sink.finish("FINISHED")
    run = read_jsonl(path)
    record, curve, decays = jsonl_record(run, run.params["run_key"])
    assert list(decays[["step", "tokens_seen", "flops_seen", "val_loss"]].itertuples(index=False, name=None)) == \
        [(2, 150, 9e5, 0.55)]
    assert run.status == "FINISHED"
    assert record["run_id"] == "abc" and record["loss"] == 0.5 and record["model"] == "1m"
    assert record["n_params"] == 1000.0 and record["compute"] == 3e9
    assert list(curve[["step", "tokens_seen", "val_loss"]].itertuples(index=False, name=None)) == \
        [(1, 100, 0.69), (2, 200, 0.5)]


def test_a_torn_last_line_is_cut_and_a_restart_clears_the_status(tmp_path):
    path = tmp_path / "metrics.jsonl"
    JsonlSink(path).log_many([({"train/loss": 1.0}, 1)])
    JsonlSink(path).finish("FAILED")
    with open(path, "a") as f:
        f.write('{"step": 2, "train/lo')          # killed mid-write
    assert read_jsonl(path).metrics == {"train/loss": {1: 1.0}}
    assert read_jsonl(path).status == "FAILED"
    sink = JsonlSink(path)                        # the resumed attempt
    sink.log_params({"a": 1})
    sink.log_many([({"train/loss": 0.9}, 2)])
    run = read_jsonl(path)
    assert run.metrics["train/loss"] == {1: 1.0, 2: 0.9} and run.status is None
    assert all(line.startswith("{") and line.endswith("}") for line in path.read_text().splitlines())


def test_skip_logged_drops_steps_already_logged_per_key():
    inner = ListSink()
    sink = SkipLogged(TeeSink(inner), {"train/loss": 4, "val/loss": 4})
    sink.log_many([({"train/loss": 1.0}, 3), ({"train/loss": 1.0}, 5), ({"val/loss": 2.0, "tokens_seen": 9}, 4)])
    assert inner.points == [({"train/loss": 1.0}, 5), ({"tokens_seen": 9}, 4)]


class FlakyClient:
    """Stands in for MlflowClient: fails `down` calls, then records what arrives."""

    def __init__(self, down: int = 0, permanent_for: str | None = None):
        self.down, self.permanent_for, self.calls = down, permanent_for, 0
        self.metrics, self.batches, self.status = {}, [], None

    def _maybe_fail(self, kind):
        self.calls += 1
        if self.permanent_for == kind:
            err = RuntimeError("bad value")
            err.error_code = "INVALID_PARAMETER_VALUE"
            raise err
        if self.down > 0:
            self.down -= 1
            raise ConnectionError("server away")

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._maybe_fail("params" if params else "metrics")
        self.batches.append(len(metrics))
        for m in metrics:
            self.metrics.setdefault(m.key, []).append(m.step)

    def set_terminated(self, run_id, status):
        self._maybe_fail("status")
        self.status = status


def _sink(client, **kw):
    return MLflowSink("run0", "http://127.0.0.1:9", backoff=(0.01, 0.05), client=client, **kw)


def test_the_sink_queues_while_the_server_is_away_and_replays_in_order():
    import mlflow.entities  # noqa: F401 - its import (seconds) is not logging time

    client = FlakyClient(down=5)
    sink = _sink(client)
    t0 = time.perf_counter()
    for step in range(1, 301):
        sink.log_many([({"train/loss": 1.0 / step}, step)])
    assert time.perf_counter() - t0 < 1.0          # logging never waits on the server
    assert sink.finish("FINISHED", timeout=10) == 0
    assert client.metrics["train/loss"] == list(range(1, 301)) and client.status == "FINISHED"
    assert sink.failures == 5
    assert max(client.batches) <= 1000 and len(client.batches) < 300   # merged into batches on replay


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    import logging

    from polar.sinks import quiet_urllib3_retries

    client = FlakyClient(down=40)
    sink = _sink(client)
    sink.backoff = (0.001, 0.002)
    with caplog.at_level(logging.WARNING, logger="polar.sinks"):
        sink.log_many([({"train/loss": 1.0}, s) for s in range(1, 11)])
        assert sink.finish("FINISHED", timeout=10) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "polar.sinks"]
    assert sink.failures == 40 and len(lines) == 2, lines
    assert "cannot be reached" in lines[0] and "answers again" in lines[1]
    quiet_urllib3_retries()
    retry = logging.getLogger("urllib3.connectionpool")
    assert not retry.filter(logging.makeLogRecord({"msg": "Retrying (Retry(total=1)) after connection broken"}))


def test_undelivered_points_are_counted_and_reported_loudly(capfd):
    client = FlakyClient(down=10**9)
    sink = _sink(client)
    sink.log_many([({"train/loss": 1.0, "lr": 0.1}, s) for s in range(1, 11)])
    assert sink.finish("FINISHED", timeout=0.3) == 20
    err = capfd.readouterr().err
    assert "20 metric points" in err and "NOT delivered" in err and "ConnectionError" in err
    with pytest.raises(RuntimeError, match="finished"):
        sink.log_many([({"x": 1.0}, 1)])


def test_a_permanent_refusal_is_dropped_not_retried_forever():
    assert "INVALID_PARAMETER_VALUE" in PERMANENT_ERRORS
    client = FlakyClient(permanent_for="params")
    sink = _sink(client)
    sink.log_params({"lr": 0.1})
    sink.log_many([({"train/loss": 1.0}, 1)])
    assert sink.finish(timeout=5) == 0
    assert client.metrics == {"train/loss": [1]} and client.status == "FINISHED"


def test_process_liveness_from_run_tags():
    assert process_alive(process_tags()) is True
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    tags = process_tags(proc.pid)
    proc.wait()
    assert process_alive(tags) is False
    assert process_alive({**process_tags(), "polar.host": "elsewhere"}) is None
    assert process_alive({**process_tags(os.getpid()), "polar.pid_start": "1"}) is False   # pid recycled


def test_slurm_job_id_names_array_tasks_as_sacct_does():
    from sweeps.runs import slurm_job_id

    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "41"}) == "41"
    assert slurm_job_id({"SLURM_JOB_ID": "45", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "3"}) == "41_3"


def test_a_run_on_another_host_without_slurm_is_not_judged():
    from sweeps.runs import process_alive

    assert process_alive({"polar.host": "another-node", "polar.pid": "1"}) is None
