"""`hydra/launcher=slurm` end to end on the local dev cluster (scripts/dev-cluster.sh).

A two-size sweep lands in MLflow (one job array per resource shape); a cancelled job
fails the sweep, which names it and its log files; a job that reaches its time limit
checkpoints on the signal, is requeued, resumes from that checkpoint into the same MLflow
run and finishes; a job of two tasks trains one model on two ranks. The
time-limit sweep is started in the background when the module starts, so that its
requeue waits overlap the other tests (one CPU for it, one for the others). CPU-only cluster: hydra.launcher.gpus_per_node=0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ROOT, TINY_SWEEP

try:
    from tests.slurm_util import ended_runs, slurm_cluster, wait_until  # noqa: F401 (fixture)
except ImportError:  # tests/ without __init__.py
    from slurm_util import ended_runs, slurm_cluster, wait_until  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

CPU_CLUSTER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.poll_s=1"]
# the time-limit job must outlast its 1-minute limit however fast the machine: ~100 s of
# training on a quiet 2-core machine (8.5e5 tokens once finished in 39 s, before the signal)
TIME_LIMITED = ["model=100k", "budget.tokens=3e6", "train.n_evals=20", "train.eval_spacing=linear",
                "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10",
                "hydra.launcher.max_num_timeout=5"]


def start_sweep(tmp: Path, experiment: str, *args: str, cache: str = "cache") -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    log = open(tmp / f"{experiment}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "sweeps.run", "-m", *args, *TINY_SWEEP, *CPU_CLUSTER,
                             f"experiment_name={experiment}", f"paths.cache_dir={tmp}/{cache}",
                             f"paths.runs_dir={tmp}/runs", f"hydra.sweep.dir={tmp}/multirun-{experiment}"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, tmp: Path, experiment: str, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"sweep {experiment} did not end within {timeout:.0f} s:\n"
                    f"{(tmp / f'{experiment}.log').read_text()[-3000:]}")
    return (tmp / f"{experiment}.log").read_text()


def job_ids(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=15)
    return [line.split()[0] for line in out.stdout.splitlines() if line.endswith("RUNNING")]


def mlflow_runs(tmp: Path, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], "tags.`polar.kind` = 'job'")


@pytest.fixture(scope="module")
def cluster_tmp(tmp_path_factory, slurm_cluster):
    """(folder, time-limited sweep process, its experiment name).

    The time-limited sweep starts first, with a data cache of its own, and holds one of
    the cluster's CPUs before the other tests submit, so that its requeues overlap them.
    Meanwhile the tiny data set the other tests share is built here once (concurrent jobs
    must not synthesize the same data into the same cache folder at once)."""
    from hydra import compose, initialize_config_dir

    from sweeps.data_sets import needed, synthesize_missing
    from sweeps.schema import register, to_job_config

    tmp = tmp_path_factory.mktemp("slurm-sweep")
    experiment = f"slurm-timeout-{os.getpid()}"
    proc = start_sweep(tmp, experiment, *TIME_LIMITED, cache="cache-timeout")
    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [*TINY_SWEEP, "budget.tokens=1e5", f"paths.cache_dir={tmp}/cache"])
    synthesize_missing(needed([to_job_config(cfg)]))
    wait_until(lambda: job_ids(f"polar-{experiment}") or proc.poll() is not None, timeout=120,
               what="the time-limited job to run")
    yield tmp, proc, experiment
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def tmp(cluster_tmp) -> Path:
    return cluster_tmp[0]


@pytest.mark.timeout(240)
def test_two_sizes_land_in_mlflow_with_one_array_per_shape(tmp):
    experiment = f"slurm-two-{os.getpid()}"
    # a slow "CPU" makes the two sizes' time limits differ: two resource shapes
    log = finish(start_sweep(tmp, experiment, "model=100k,200k", "budget.tokens=2e4", "train.n_evals=2",
                             "resources.cpu_flops=1e7"), tmp, experiment, timeout=220)
    assert "Submitting 2 jobs as 2 SLURM job arrays" in log, log[-3000:]
    assert re.search(r"#0 \(\S+\) finished", log) and re.search(r"#1 \(\S+\) finished", log), log[-3000:]
    _, runs = mlflow_runs(tmp, experiment)
    assert sorted(r.data.params["model"] for r in runs) == ["100k", "200k"]
    assert all(r.info.status == "FINISHED" and "val/loss_final" in r.data.metrics for r in runs)
    ids = re.findall(r"#\d \S+ -> (\S+)", log)
    limits = [subprocess.run(["sacct", "-n", "-X", "-j", i, "-o", "TimelimitRaw"], capture_output=True,
                             text=True, timeout=15).stdout.split()[0] for i in ids]
    assert len(set(limits)) == 2, limits    # each array has its own time limit from its plan


@pytest.mark.timeout(180)
def test_cancelled_job_fails_the_sweep_naming_it_and_its_logs(tmp):
    experiment = f"slurm-cancel-{os.getpid()}"
    proc = start_sweep(tmp, experiment, "model=100k", "budget.tokens=1e7", "train.n_evals=2")
    running = wait_until(lambda: job_ids(f"polar-{experiment}") or proc.poll() is not None, timeout=120,
                         what="the job to run")
    assert proc.poll() is None, (tmp / f"{experiment}.log").read_text()[-3000:]
    job_id = running[0]
    subprocess.run(["scancel", job_id], check=True, timeout=15)
    log = finish(proc, tmp, experiment, timeout=60)
    assert proc.returncode != 0
    assert "1 of 1 jobs of the sweep failed or were cancelled" in log, log[-3000:]
    failure = log[log.index("1 of 1 jobs"):]
    assert f"SLURM job {job_id} ended CANCELLED" in failure
    assert re.search(rf"logs: \S+/{job_id}_0_log\.out", failure), failure


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_job_hitting_its_time_limit_is_requeued_and_resumes(cluster_tmp):
    from polar.trainer import eval_steps

    tmp, proc, experiment = cluster_tmp
    log = finish(proc, tmp, experiment, timeout=640)
    assert proc.returncode == 0, log[-3000:]
    job_id = re.search(r"#0 \S+ -> (\S+)", log).group(1)
    runs = ended_runs(job_id)
    states = [r["State"] for r in runs]
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, runs
    client, found = mlflow_runs(tmp, experiment)
    assert len(found) == 1, [(r.info.run_id, r.info.status, r.data.tags.get("polar.error")) for r in found]
    run = found[0]
    assert run.info.status == "FINISHED" and "val/loss_final" in run.data.metrics, (run.info, run.data.tags)
    steps = int(run.data.params["steps"])
    history = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    # every evaluation once, in the one run, whichever attempt logged it
    assert sorted(history) == eval_steps(steps, 20, "linear"), (sorted(history), runs)
    job_log = Path(re.search(r"#0 \S+ -> \S+\s+log (\S+)", log).group(1))
    text = job_log.read_text() + job_log.with_suffix(".err").read_text()
    assert "Caught signal SIGUSR2" in text and "Requeued job" in text, text[-3000:]
    # a later attempt started from the checkpoint written on the signal, at the step where
    # the signal stopped training (tqdm's first line of an attempt: "  k/steps [00:00<?"),
    # not from the last evaluation's (they coincide only when the signal came during one)
    starts = [int(k) for k in re.findall(rf"\|\s*(\d+)/{steps} \[00:00<\?", text)]
    stopped = [int(k) for k in re.findall(r"stopped at step (\d+) of", text)]
    assert stopped and all(k in starts for k in stopped) and starts[0] == 0, (starts, stopped, runs)


@pytest.mark.timeout(240)
def test_a_two_task_job_trains_one_model_on_two_ranks(tmp):
    """Two tasks of one SLURM job (as one task per GPU on a GPU cluster; gloo on these CPUs)
    read their ranks from SLURM's environment and make one run together."""
    experiment = f"slurm-ranks-{os.getpid()}"
    log = finish(start_sweep(tmp, experiment, "model=100k", "budget.tokens=1e4", "recipe.lr=1e-3",
                             "train.n_evals=2", "hydra.launcher.tasks_per_node=2"), tmp, experiment, timeout=220)
    assert "2 tasks/node" in log and re.search(r"#0 \(\S+\) finished", log), log[-3000:]
    job_log = Path(re.search(r"#0 \S+ -> \S+\s+log (\S+)", log).group(1))
    assert "ranks=2 (ddp)" in job_log.read_text(), job_log.read_text()[-3000:]
    client, found = mlflow_runs(tmp, experiment)
    assert len(found) == 1 and found[0].info.status == "FINISHED", [(r.info.status, r.data.tags) for r in found]
    run = found[0]
    steps = int(run.data.params["steps"])
    history = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == list(range(1, steps + 1))       # one writer: every step once
    assert run.data.params["run_key"] in {p.name for p in (tmp / "runs").iterdir()}
