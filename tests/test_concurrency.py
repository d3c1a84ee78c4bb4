"""Concurrency on one machine (issue 17, items 5 and 6): a run folder is written by one job
at a time (the same run started twice trains once; a killed holder never blocks the next
start), and killing the launcher of a parallel local sweep (SIGKILL or SIGTERM) leaves no
worker behind, the SIGTERM'd runs ending FAILED with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import ROOT, TINY_SWEEP

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def sweep_cmd(tmp_path: Path, *args: str, tracking: str = "off") -> list[str]:
    """`python -m sweeps.run` on the tiny data set, tracking off (or an sqlite store in
    tmp_path), everything under tmp_path."""
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"] if tracking != "off" else []
    return [sys.executable, "-m", "sweeps.run", *args, *TINY_SWEEP, f"tracking={tracking}", *store,
            f"paths.cache_dir={tmp_path}/cache", f"paths.runs_dir={tmp_path}/runs"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """cmd in its own session (its pid is the session id of all it starts), output to log."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what, timeout_s: float, message: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := what():
            return value
        time.sleep(0.2)
    raise AssertionError(f"after {timeout_s} s: {message}")


def session_pids(sid: int) -> set[int]:
    """Live (not zombie) processes of session sid."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.add(int(entry.name))
    return pids


def train_steps(metrics: Path) -> list[int]:
    """The steps of every train/loss line of a metrics.jsonl (a torn line skipped)."""
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "train/loss" in rec:
            steps.append(rec["step"])
    return steps


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").glob("*") if p.is_dir()) if (tmp_path / "runs").exists() else []


# ------------------------------------------------------------------ item 5: one job per run folder

def test_the_same_run_started_twice_trains_once_and_a_killed_holder_never_blocks(tmp_path):
    cmd = sweep_cmd(tmp_path, "model=10k", "budget.tokens=1e6", "train.n_evals=20")
    procs = [start([*cmd, f"hydra.run.dir={tmp_path}/h{i}"], tmp_path / f"out{i}") for i in range(2)]
    try:
        first = wait_for(lambda: next((i + 1 for i, p in enumerate(procs) if p.poll() is not None), None), 120,
                         "neither start ended") - 1
        refused, holder = procs[first], procs[1 - first]
        said = (tmp_path / f"out{first}").read_text()
        assert refused.returncode != 0 and holder.poll() is None, said[-2000:]
        (run,) = run_dirs(tmp_path)
        assert "is being written by another job" in said and str(run) in said and run.name in said
        assert f"process {holder.pid} on host" in said and "Traceback" not in said
        wait_for(lambda: (run / "checkpoint.pt").exists() and len(train_steps(run / "metrics.jsonl")) > 20, 120,
                 "the holder wrote no checkpoint")
        holder.kill()
        holder.wait(30)
        killed_at = len(train_steps(run / "metrics.jsonl"))
        again = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}/h2"], cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert again.returncode == 0, again.stderr[-3000:]
    steps = train_steps(run / "metrics.jsonl")
    params = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["params"]
    assert steps == list(range(1, int(params["steps"]) + 1))      # each step once, across the kill
    assert 20 < killed_at < len(steps)


@pytest.mark.parametrize("tracking", ["mlflow", "off"])
def test_a_finished_run_is_skipped_with_tracking_on_or_off(tmp_path, tracking):
    from sweeps.jobs import LOCK_FILE

    cmd = sweep_cmd(tmp_path, "model=10k", "budget.tokens=2e4", "train.n_evals=2", tracking=tracking)
    for i in range(2):
        out = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}/h{i}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        if i == 0:
            (run,) = run_dirs(tmp_path)
            first = (run / "metrics.jsonl").read_bytes()
    assert "finished earlier" in out.stdout
    assert (run / "metrics.jsonl").read_bytes() == first         # not trained again
    assert json.loads((run / LOCK_FILE).read_text())["pid"] > 0


def test_the_lock_refuses_a_second_holder_in_one_process(tmp_path):
    from sweeps.jobs import RunLocked, run_folder_lock

    run = tmp_path / "runs" / "abc"
    with run_folder_lock(run, "abc", "polar-x"):
        with pytest.raises(RunLocked, match=rf"run polar-x \(run key abc\).*process {os.getpid()} on host"):
            with run_folder_lock(run, "abc", "polar-x"):
                pass
    with run_folder_lock(run, "abc", "polar-x"):   # released on leaving
        pass


# ------------------------------------------------------------------ item 6: no orphan of a parallel sweep

def start_parallel_sweep(tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    """A two-job sweep, two workers, each training long enough; returns it once both jobs
    train, with the pids of its session then."""
    cmd = sweep_cmd(tmp_path, "-m", "model=10k,20k", "hydra.launcher.n_jobs=2", "budget.tokens=1e7",
                    "train.n_evals=50", f"hydra.sweep.dir={tmp_path}/multirun")
    sweep = start(cmd, tmp_path / "sweep.log")

    def both_train():
        if sweep.poll() is not None:
            raise AssertionError((tmp_path / "sweep.log").read_text()[-3000:])
        runs = run_dirs(tmp_path)
        return len(runs) == 2 and all((r / "metrics.jsonl").exists() and train_steps(r / "metrics.jsonl") for r in runs)
    wait_for(lambda: both_train() and len(session_pids(sweep.pid)) >= 3, 120, "the two jobs did not start")
    return sweep, session_pids(sweep.pid) - {sweep.pid}


def assert_no_process_left(sweep: subprocess.Popen, workers: set[int]) -> None:
    sweep.wait(30)
    try:
        wait_for(lambda: not session_pids(sweep.pid), 10, "processes of the sweep are left")
    finally:
        for pid in session_pids(sweep.pid):
            os.kill(pid, signal.SIGKILL)
    assert workers                     # there were some to check


def test_sigkill_to_a_parallel_sweep_leaves_no_worker(tmp_path):
    sweep, workers = start_parallel_sweep(tmp_path)
    sweep.kill()
    assert_no_process_left(sweep, workers)
    for run in run_dirs(tmp_path):     # each orphaned worker ended its job through the SIGTERM path
        assert _failed_reason(run), (run / "metrics.jsonl").read_text()[-1000:]


def test_sigterm_to_a_parallel_sweep_stops_its_workers_and_fails_their_runs(tmp_path):
    sweep, workers = start_parallel_sweep(tmp_path)
    sweep.terminate()
    assert_no_process_left(sweep, workers)
    assert sweep.returncode == 128 + signal.SIGTERM, (tmp_path / "sweep.log").read_text()[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 2 and all("SIGTERM" in _failed_reason(run) for run in runs)


def _failed_reason(run: Path) -> str:
    """The reason a run's metrics.jsonl gives for ending FAILED ('' unless it did)."""
    from polar.sinks import read_jsonl

    record = read_jsonl(run / "metrics.jsonl", warn=False)
    if record.status != "FAILED":
        return ""
    return " ".join(str(v) for v in record.tags.values() if "SIGTERM" in str(v)) or "FAILED (no reason)"


def test_a_holder_that_has_not_written_its_name_yet_is_still_named(tmp_path):
    """The holder writes its pid just after taking the lock: a job refused in between waits for it."""
    import fcntl
    import threading

    from sweeps.jobs import LOCK_FILE, RunLocked, run_folder_lock

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    late = json.dumps({"pid": 4242, "host": "node7", "since": "2026-11-30 09:00:00"}).encode()
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, late, 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                        # locked, nothing written yet
        writer.start()
        with pytest.raises(RunLocked, match=r"process 4242 on host node7 .*kill 4242 on node7"):
            with run_folder_lock(run, "key"):
                pass
    finally:
        writer.join()
        os.close(fd)
