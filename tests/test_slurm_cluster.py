"""Real SLURM jobs through submitit on the local dev cluster (scripts/dev-cluster.sh).

Checks what the slurm launcher relies on, against a real slurmctld/slurmd/slurmdbd:
a submitted function runs and returns its result; a cancelled job is reported
as cancelled by sacct and by submitit; a Checkpointable job that reaches its
time limit gets submitit's signal (USR2), checkpoints, is requeued by
`scontrol requeue` and finishes in its second run under the same job id.
Skipped with a reason when no cluster answers; failed instead under
POLAR_REQUIRE_SLURM=1 (see slurm_util).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import cloudpickle
import pytest

try:
    from tests.slurm_util import sacct_runs, slurm_cluster, squeue_state, wait_for_sacct_state, wait_until  # noqa: F401 (fixture)
except ImportError:  # tests/ without __init__.py: tests/ itself is on sys.path
    from slurm_util import sacct_runs, slurm_cluster, squeue_state, wait_for_sacct_state, wait_until  # noqa: F401

submitit = pytest.importorskip("submitit")

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# The job unpickles these callables in a fresh interpreter (sys.executable),
# where tests/ is not importable: ship this module's code by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _square_in_job(x: int) -> dict:
    from sweeps.runs import process_tags

    return {"square": x * x, "job_id": os.environ.get("SLURM_JOB_ID"),
            "host": socket.gethostname(), "python": sys.executable, "tags": process_tags()}


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


class _SleepsUntilRequeued(submitit.helpers.Checkpointable):
    """Sleeps past its time limit in the first run; returns at once after a requeue."""

    def __init__(self) -> None:
        self.checkpoints = 0

    def __call__(self, sleep_s: float) -> dict:
        if self.checkpoints == 0:
            time.sleep(sleep_s)
            return {"checkpoints": 0}
        return {"checkpoints": self.checkpoints, "job_id": os.environ.get("SLURM_JOB_ID"),
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}

    def checkpoint(self, *args, **kwargs):
        self.checkpoints += 1  # pickled with self into the requeued submission
        return super().checkpoint(*args, **kwargs)


def _executor(folder, name: str, timeout_min: int = 5, max_num_timeout: int = 0, **params):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    # CPU-only cluster: no gpus_per_node (it would need GRES)
    ex.update_parameters(name=name, timeout_min=timeout_min, nodes=1, tasks_per_node=1,
                         cpus_per_task=1, **params)
    return ex


def _job_log(job) -> str:
    return f"\n--- stdout ---\n{job.stdout()}\n--- stderr ---\n{job.stderr()}"


@pytest.mark.timeout(120)
def test_submitit_job_returns_result(tmp_path):
    job = _executor(tmp_path, "polar-square").submit(_square_in_job, 7)
    out = job.result()
    assert out["square"] == 49
    assert out["job_id"] == job.job_id
    assert out["python"] == sys.executable
    assert out["tags"]["polar.slurm_job"] == job.job_id      # runs say which job ran them
    assert wait_for_sacct_state(job.job_id, ("COMPLETED",), timeout=30) == "COMPLETED"


@pytest.mark.timeout(120)
def test_cancelled_job_is_reported_cancelled(tmp_path):
    from mlflow import MlflowClient

    from sweeps.runs import mark_dead_runs, process_alive

    job = _executor(tmp_path, "polar-cancel").submit(_sleep, 600)
    wait_until(lambda: squeue_state(job.job_id) == "RUNNING", timeout=60,
               what=lambda: f"job {job.job_id} to run (squeue: {squeue_state(job.job_id)!r})")
    # an MLflow run left RUNNING by this job, as a job on another node would leave it
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("dead")
    tags = {"polar.host": "another-node", "polar.pid": "4242", "polar.slurm_job": job.job_id}
    run = client.create_run(exp, tags=tags, run_name="job-run")
    assert process_alive(tags) is True
    assert mark_dead_runs(exp, f"sqlite:///{tmp_path}/mlflow.db") == []
    job.cancel()
    assert wait_for_sacct_state(job.job_id, ("CANCELLED",), timeout=30).startswith("CANCELLED")
    assert mark_dead_runs(exp, f"sqlite:///{tmp_path}/mlflow.db") == ["job-run"]
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and job.job_id in ended.data.tags["polar.error"]
    assert job.done(force_check=True)
    assert job.state.upper().startswith("CANCELLED")
    job._results_timeout_s = 1  # submitit waits 15 s for a result file that will never come
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_hitting_time_limit_is_requeued_and_finishes(tmp_path):
    # submitit asks for `--signal=USR2@signal_delay_s`; slurmctld checks limits
    # every ~30 s and signals once now + delay + 30 s >= end, so with a 1 min
    # limit and a 10 s delay USR2 comes 20-50 s into the run, before the limit.
    # submitit then checkpoints, runs `scontrol requeue` and exits; the job
    # starts again cred_expire (10 s on the dev cluster) later, same job id.
    ex = _executor(tmp_path, "polar-timeout", timeout_min=1, max_num_timeout=1,
                   slurm_signal_delay_s=10)
    job = ex.submit(_SleepsUntilRequeued(), 600)
    out = job.result()
    assert out["checkpoints"] == 1, _job_log(job)
    assert out["job_id"] == job.job_id
    assert out["restart_count"] == 1
    runs = wait_until(lambda: (r := sacct_runs(job.job_id)) and r[-1]["State"] == "COMPLETED" and r,
                      timeout=30, what=lambda: f"sacct -D of job {job.job_id} to end COMPLETED "
                      f"(now {sacct_runs(job.job_id)})")
    assert [r["State"] for r in runs] == ["REQUEUED", "COMPLETED"], runs
    # the first run ran until the time-limit warning (20-50 s here; sbatch(1):
    # "may be sent up to 60 seconds earlier"), and was not killed at the limit
    assert 10 <= int(runs[0]["ElapsedRaw"]) <= 60, runs
    log = job.stdout() or ""
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log, _job_log(job)
