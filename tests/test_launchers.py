"""The launchers without a cluster: the dry-run table, checks before anything starts
(every bad job listed, empty sweep, SLURM unreachable, local refusal), the launchers'
schemas, and the grouping of a sweep into one SLURM job array per resource shape (pure
functions). Hydra's own launcher test suite runs in tests/test_launcher_suite.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.derive import Plan, cpu_minutes
from sweeps.jobs import plan_of
from sweeps.schema import JobConfig, ResourcesConfig
from sweeps.sweep_plan import (
    PlannedJob,
    Shape,
    SweepError,
    group_by_shape,
    job_shape,
    job_table,
    largest_first,
    local_workers,
    plan_sweep,
    shape_of,
    varying_overrides,
)
from tests.fixtures import job_config

ROOT = Path(__file__).resolve().parents[1]


def sweep(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sweeps.run", "-m", *args, "train.threads=1",
                           f"paths.cache_dir={tmp_path}/cache", f"paths.runs_dir={tmp_path}/runs",
                           f"hydra.sweep.dir={tmp_path}/multirun"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def plan_for(*overrides: str) -> Plan:
    """The plan of one job as the sweep composes it."""
    return plan_of(job_config(*overrides))


# ------------------------------------------------------------------ dryrun

def test_dryrun_prints_the_job_table_and_starts_nothing(tmp_path):
    out = sweep(tmp_path, "model=1.8b,7b", "budget.tokens=1e9", "train=gpu", "hydra/launcher=dryrun")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    for column in ("model", "N", "tokens", "FLOPs", "steps", "lr", "batch", "triplets", "passes", "GPUs",
                   "parallel", "nodes", "time limit", "GPU-hours"):
        assert column in header
    rows = {line.split()[1]: line.split() for line in lines if line[:1].isdigit()}
    assert set(rows) == {"1.8b", "7b"}
    plans = {m: plan_for(f"model={m}", "budget.tokens=1e9", "train=gpu") for m in ("1.8b", "7b")}
    for model, plan in plans.items():
        cells = rows[model]
        assert cells[3] == "1B" and cells[5] == str(plan.steps)
        assert cells[8] == "200M" and float(cells[9]) == pytest.approx(plan.passes, rel=0.01)   # polar_pool
        assert cells[10] == str(plan.gpus) and cells[12] == str(plan.nodes)
        assert cells[11] == ("fsdp" if model == "7b" else "-")
        assert f"model={model}" in cells[-1]
    assert plans["7b"].gpus > plans["1.8b"].gpus == 1
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1:3] == ["2", "jobs"]
    assert float(total[-1]) == pytest.approx(sum(p.gpu_hours for p in plans.values()), rel=0.01)
    assert "would submit 2 job arrays" in out.stdout
    assert "nothing started" in out.stdout
    # no MLflow, no training, no run folders
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_cpu_jobs_plan_no_gpu_in_the_table_and_the_slurm_arrays(tmp_path):
    """train=cpu (the default): the table and the arrays slurm would submit agree, no GPU."""
    out = sweep(tmp_path, "model=10k,20k", "budget.tokens=20000", "hydra/launcher=dryrun")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line[:1].isdigit()]
    plans = [plan_for(f"model={m}", "budget.tokens=20000", "train.threads=1") for m in ("10k", "20k")]
    assert [r[1] for r in rows] == ["10k", "20k"] and [r[10] for r in rows] == ["0", "0"]
    assert all(p.on_cpu for p in plans) and {r[14] for r in rows} == {"0"}    # no GPU-hours
    assert "would submit 1 job array" in out.stdout
    array = next(line for line in out.stdout.splitlines() if "jobs #0 #1" in line)
    assert "no GPU" in array and "1 CPU" in array and rows[0][13] in array    # train.threads=1; the time limit


def test_the_demo_ladder_spans_30x_in_one_pass_over_its_data(tmp_path):
    """The acceptance bar of `make demo`: >= 5 sizes spanning >= 30x in parameters, and
    each run sees every training triplet at most once (no repeats inflate the fits)."""
    out = sweep(tmp_path, "+experiment=cpu_ladder", "hydra/launcher=dryrun")
    assert out.returncode == 0, out.stderr[-3000:]
    models = sorted({line.split()[1] for line in out.stdout.splitlines() if line[:1].isdigit()})
    jobs = [job_config("+experiment=cpu_ladder", f"model={m}") for m in models]
    plans = [plan_of(job) for job in jobs]
    sizes = [plan.n_params for plan in plans]
    assert len(models) >= 5 and max(sizes) / min(sizes) >= 30, dict(zip(models, sizes))
    for job, plan in zip(jobs, plans):
        assert plan.steps * plan.batch_size <= job.data.n_train, (plan.model, plan.steps, job.data.n_train)


def test_every_bad_job_is_listed_and_nothing_starts(tmp_path):
    # 8 jobs: only #2 (heads=1, tokens=1e6, flops=null) is valid
    out = sweep(tmp_path, "model=100k", "model.num_heads=1,0", "model.num_kv_heads=1", "budget.tokens=10,1e6",
                "budget.flops=null,1e12",
                "hydra/launcher=dryrun")
    assert out.returncode != 0
    assert "7 of 8 jobs of the sweep are invalid; nothing was started" in out.stderr
    first = next(line for line in out.stderr.splitlines() if line.strip().startswith("#0 "))
    assert "#0 (model=100k model.num_heads=1 model.num_kv_heads=1 budget.tokens=10 budget.flops=null" in first
    assert "budget too small for one optimizer step of model '100k'" in first
    assert out.stderr.count("give exactly one of budget.tokens or budget.flops") == 2    # #1, #3
    # the model is validated before the budget: #4-#7 report the bad head count
    assert out.stderr.count("model.num_heads must be > 0, got 0") == 4
    assert "#2 (" not in out.stderr
    assert "Traceback" not in out.stderr and "Dry run" not in out.stdout


def test_a_sweep_of_no_jobs_is_an_error(tmp_path):
    out = sweep(tmp_path, "seed=range(0)", "budget.tokens=1e6", "hydra/launcher=dryrun")
    assert out.returncode != 0
    assert "the sweep expands to no jobs" in out.stderr


def test_plan_sweep_collects_every_error_and_needs_a_job():
    def compose(overrides: list[str]) -> JobConfig:
        if "bad" in overrides:
            raise ValueError("model.hidden_size must be > 0, got -1")
        return JobConfig()

    with pytest.raises(SweepError, match="no jobs"):
        plan_sweep([], compose)
    with pytest.raises(SweepError) as err:
        plan_sweep([["ok", "budget.tokens=1e6"], ["bad"], ["bad", "x=1"]], compose, initial_idx=10)
    message = str(err.value)
    assert "3 of 3 jobs" in message   # JobConfig() has no budget: planning fails too
    assert "#11 (bad): model.hidden_size must be > 0" in message and "#12 (bad x=1)" in message
    assert "exactly one budget" in message


# ------------------------------------------------------------------ local launcher validation

def test_local_launcher_refuses_the_whole_sweep_before_training(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs big presets locally")
    out = sweep(tmp_path, "model=100k,7b", "budget.tokens=1e6", "hydra/launcher=local",
                "hydra.launcher._target_=hydra_plugins.polar_launchers.local.LocalLauncher")
    assert out.returncode != 0
    assert "1 of 2 jobs of the sweep are invalid; nothing was started" in out.stderr
    assert "#1 (model=7b" in out.stderr and "hydra/launcher=slurm" in out.stderr
    assert not (tmp_path / "runs").exists()   # the valid 100k job did not start either


# ------------------------------------------------------------------ slurm launcher, no cluster

def test_slurm_unreachable_is_a_quick_clear_error(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=nohost(127.0.0.1)\nSlurmctldPort=9\n")
    start = time.monotonic()
    out = sweep(tmp_path, "model=100k,200k", "budget.tokens=1e5", "hydra/launcher=slurm",
                "hydra.launcher.gpus_per_node=0", env={"SLURM_CONF": str(conf)}, timeout=120)
    assert out.returncode != 0
    assert "SLURM is not reachable, so nothing was submitted" in out.stderr
    assert "127.0.0.1:9" in out.stderr or "not on PATH" in out.stderr
    assert time.monotonic() - start < 90
    assert not list((tmp_path / "multirun").glob(".submitit/*"))
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(parents) == 1 and "SLURM is not reachable" in parents[0].data.tags["polar.error"]
    assert parents[0].info.status == "FAILED"      # the sweep's exit hook does not end it FINISHED again


def test_slurm_launcher_config_defaults():
    from hydra import compose, initialize_config_dir

    from sweeps.schema import register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "experiment_name=xyz"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.polar_launchers.slurm.PolarSlurmLauncher"
    assert launcher.max_num_timeout > 0
    assert launcher.name == "polar-xyz"
    for key in ("partition", "account", "qos", "constraint", "setup", "nodes", "gpus_per_node", "mem_gb",
                "timeout_min", "cpus_per_task"):
        assert key in launcher and launcher[key] is None
    assert "partition" not in cfg and "max_num_timeout" not in cfg   # SLURM keys stay in the launcher


def launcher_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from sweeps.schema import register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", list(overrides), return_hydra_config=True).hydra.launcher


def test_every_launcher_yaml_extends_its_registered_schema():
    from omegaconf import OmegaConf

    from hydra_plugins.polar_launchers.config import PolarDryRunConf, PolarLocalConf, PolarSlurmConf

    for name, schema in (("local", PolarLocalConf), ("dryrun", PolarDryRunConf), ("slurm", PolarSlurmConf)):
        launcher = launcher_config(f"hydra/launcher={name}")
        assert OmegaConf.get_type(launcher) is schema, name
        assert launcher._target_ == schema._target_
    assert launcher_config().n_jobs == "auto" and launcher_config("hydra.launcher.n_jobs=3").n_jobs == 3
    assert launcher_config("hydra/launcher=dryrun", "hydra.launcher.gpus_per_node=0").gpus_per_node == 0
    with pytest.raises(Exception, match="n_jobs"):                   # typed: Union[int, str]
        launcher_config("hydra.launcher.n_jobs=1.5")
    with pytest.raises(Exception, match="show_slurm_arrays"):        # typed: bool
        launcher_config("hydra/launcher=dryrun", "hydra.launcher.show_slurm_arrays=maybe")
    with pytest.raises(Exception, match="Could not override 'hydra.launcher.n_job'"):
        launcher_config("hydra.launcher.n_job=2")


# ------------------------------------------------------------------ shapes and grouping (pure)

def fake_plan(model: str, gpus: int, nodes: int = 1, memory_gb: float = 40.0, minutes: int = 600,
              n: int = 1_000_000_000, compute: float = 1e20) -> Plan:
    return Plan(model, n, n, 6 * n, 100.0, 200.0, 1e9, compute, 32, 1e-5, 1000, gpus, nodes, memory_gb,
                minutes, gpus * minutes / 60)


def planned(idx: int, plan: Plan, *overrides: str) -> PlannedJob:
    return PlannedJob(idx, overrides or (f"model={plan.model}",), JobConfig(), plan)


def test_shapes_come_from_the_plan_with_one_task_per_gpu():
    res = ResourcesConfig()
    small = shape_of(fake_plan("1.8b", gpus=1, memory_gb=52.0, minutes=667), res)
    assert small == Shape(nodes=1, gpus_per_node=1, tasks_per_node=1, mem_gb=52, timeout_min=667)
    big = shape_of(fake_plan("70b", gpus=16, nodes=2, memory_gb=70.0, minutes=900), res)
    assert (big.nodes, big.gpus_per_node, big.tasks_per_node, big.mem_gb) == (2, 8, 8, 560)


def test_overrides_and_cpu_only_shapes():
    res = ResourcesConfig()
    plan = fake_plan("7b", gpus=4, minutes=768)
    forced = shape_of(plan, res, nodes=1, mem_gb=0, timeout_min=120)
    assert (forced.gpus_per_node, forced.tasks_per_node, forced.mem_gb, forced.timeout_min) == (4, 4, 0, 120)
    assert shape_of(plan, res, max_timeout_min=240).timeout_min == 240
    cpu = shape_of(fake_plan("100k", gpus=1, n=100_000, compute=1e12), res, gpus_per_node=0)
    assert cpu.gpus_per_node == 0 and cpu.tasks_per_node == 1 and cpu.nodes == 1 and cpu.cpus_per_task is None
    assert cpu.timeout_min == cpu_minutes(1e12, res) and cpu.mem_gb == 1
    assert "no GPU" in cpu.describe()


def test_a_job_that_trains_on_the_cpu_asks_for_no_gpu_and_its_threads():
    res = ResourcesConfig()
    on_cpu = fake_plan("100k", gpus=0, n=100_000, compute=1e12)
    shape = shape_of(on_cpu, res, threads=4)
    assert (shape.gpus_per_node, shape.tasks_per_node, shape.cpus_per_task, shape.mem_gb) == (0, 1, 4, 1)
    assert shape.timeout_min == cpu_minutes(1e12, res) and "4 CPUs" in shape.describe()
    assert shape_of(on_cpu, res, gpus_per_node=8).gpus_per_node == 0          # never GPUs for a CPU job
    assert shape_of(on_cpu, res, threads=4, cpus_per_task=2).cpus_per_task == 2   # the launcher's value wins
    assert shape_of(on_cpu, res).cpus_per_task is None                     # threads=0: SLURM's default
    assert shape_of(fake_plan("1.8b", gpus=1), res, threads=4).cpus_per_task is None   # GPU jobs: as configured
    from dataclasses import replace

    job = JobConfig()
    job = replace(job, train=replace(job.train, threads=3))
    assert job_shape(PlannedJob(0, (), job, on_cpu)).cpus_per_task == 3


def test_a_sweep_mixing_sizes_becomes_one_array_per_shape():
    res = ResourcesConfig()
    jobs = [planned(0, fake_plan("1.8b", gpus=1)), planned(1, fake_plan("7b", gpus=4)),
            planned(2, fake_plan("1.8b", gpus=1), "model=1.8b", "seed=1"),
            planned(3, fake_plan("7b", gpus=4, minutes=1200))]
    groups = group_by_shape(jobs, lambda j: shape_of(j.plan, res))
    assert [[j.idx for j in g] for g in groups.values()] == [[0, 2], [1], [3]]
    assert [s.gpus_per_node for s in groups] == [1, 4, 4]
    assert [s.timeout_min for s in groups] == [600, 600, 1200]
    one = group_by_shape(jobs, lambda j: shape_of(j.plan, res, gpus_per_node=0, timeout_min=60, mem_gb=4))
    assert len(one) == 1 and len(next(iter(one.values()))) == 4


def test_varying_overrides_and_table_totals():
    jobs = [planned(0, fake_plan("1.8b", gpus=1), "model=1.8b", "budget.tokens=1e9"),
            planned(1, fake_plan("7b", gpus=4), "model=7b", "budget.tokens=1e9")]
    assert varying_overrides(jobs) == ["model=1.8b", "model=7b"]
    table = job_table(jobs)
    total = table.splitlines()[-1].split()
    assert total[:3] == ["total", "2", "jobs"] and "5" in total   # 1 + 4 GPUs


def test_an_app_without_a_plan_gets_the_launchers_own_resources():
    from hydra_plugins.polar_launchers.slurm import plain_shape

    assert plain_shape({}) == Shape(nodes=1, gpus_per_node=0, tasks_per_node=1, mem_gb=None, timeout_min=60)
    assert plain_shape({"timeout_min": 120}).timeout_min == 120
    assert plain_shape({"timeout_min": 120, "max_timeout_min": 30}).timeout_min == 30
    given = plain_shape({"nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4, "mem_gb": 64, "cpus_per_task": 8})
    assert given == Shape(2, 4, 4, 64, 60, cpus_per_task=8)


def test_test_only_args_ask_for_what_submitit_asks():
    from hydra_plugins.polar_launchers.slurm import test_only_args

    gpu = test_only_args(Shape(2, 8, 8, 560, 900), {"partition": "gpu", "account": "proj", "qos": None,
                                                    "additional_parameters": {"mail_type": "END"}})
    assert {"--test-only", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--mem=560G", "--time=900",
            "--partition=gpu", "--account=proj", "--mail-type=END"} <= set(gpu)
    assert not any(a.startswith("--qos") for a in gpu)
    cpu = test_only_args(Shape(1, 0, 1, None, 11), {})
    assert not any("gpu" in a or a.startswith("--mem") or a.startswith("--cpus") for a in cpu)
    assert "--cpus-per-task=2" in test_only_args(Shape(1, 0, 1, 1, 11, cpus_per_task=2), {})


# ------------------------------------------------------------------ local: jobs at once (pure)

def threaded(idx: int, threads: int, n: int = 100_000) -> PlannedJob:
    from dataclasses import replace

    job = JobConfig()
    job = replace(job, train=replace(job.train, threads=threads))
    return PlannedJob(idx, (f"job={idx}",), job, fake_plan(f"m{idx}", 0, n=n))


def test_auto_fits_one_thread_jobs_to_the_cores_and_memory():
    jobs = [threaded(i, 1) for i in range(5)]
    assert local_workers("auto", jobs, cpus=2, memory_gb=24) == 2
    assert local_workers("auto", jobs, cpus=16, memory_gb=64) == 5          # never more than the jobs
    assert local_workers("auto", [threaded(i, 4) for i in range(5)], cpus=16, memory_gb=64) == 4
    assert local_workers("auto", [threaded(0, 1), threaded(1, 0)], cpus=16, memory_gb=64) == 1   # 0 = all cores
    assert local_workers("auto", jobs, cpus=16, memory_gb=64, gpu=True) == 1
    big = [threaded(i, 1, n=500_000_000) for i in range(4)]                  # ~12.5 GB each
    assert local_workers("auto", big, cpus=16, memory_gb=32) == 2


def test_n_jobs_is_a_cap_and_bad_values_are_named():
    jobs = [threaded(i, 0) for i in range(3)]
    assert local_workers(2, jobs, cpus=1, memory_gb=1) == 2
    assert local_workers(8, jobs, cpus=1, memory_gb=1) == 3
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(SweepError, match=f"n_jobs={bad!r}"):
            local_workers(bad, jobs, cpus=2, memory_gb=8)


def test_the_largest_jobs_start_first_and_ties_keep_their_order():
    jobs = [planned(i, fake_plan(f"m{i}", 0, compute=c)) for i, c in enumerate([1e12, 5e12, 3e12, 5e12, 1e12])]
    assert largest_first(jobs) == [1, 3, 2, 0, 4]
    assert largest_first([]) == []


def test_bad_n_jobs_fails_the_sweep_before_training(tmp_path):
    out = sweep(tmp_path, "model=100k", "budget.tokens=1e4", "hydra.launcher.n_jobs=0", "tracking=off")
    assert out.returncode != 0
    assert "hydra.launcher.n_jobs=0 is not valid" in out.stderr
    assert not (tmp_path / "runs").exists()
