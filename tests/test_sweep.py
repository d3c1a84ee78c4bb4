"""The main command end to end: a two-size sweep into a real sqlite MLflow store."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures import ROOT, TINY_SWEEP

TINY = [*TINY_SWEEP, "train.n_evals=2", "budget.tokens=2e4"]


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    return subprocess.run([sys.executable, "-m", "sweeps.run", "-m", *args, *TINY,
                           f"paths.cache_dir={tmp_path}/cache", f"paths.runs_dir={tmp_path}/runs",
                           f"hydra.sweep.dir={tmp_path}/multirun"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    first = sweep(tmp, "model=100k,200k", "experiment_name=e2e")
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp, first


def test_both_runs_land_in_mlflow_with_the_contract_names(finished_sweep):
    from mlflow import MlflowClient

    tmp, _ = finished_sweep
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    jobs = client.search_runs([exp.experiment_id], "tags.`polar.kind` = 'job'")
    assert sorted(r.data.params["model"] for r in jobs) == ["100k", "200k"]
    parent = client.search_runs([exp.experiment_id], "tags.`polar.kind` = 'sweep'")[0]
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"model", "n_params", "n_params_nonembed", "flops_per_token", "tokens", "compute", "lr",
                "batch_size", "seq_len", "seed", "data_id", "run_key", "sweep_id", "git_sha"} <= set(run.data.params)
        assert {"train/loss", "val/loss", "val/acc", "tokens_seen", "flops_seen", "throughput/tokens_per_s",
                "val/loss_final"} <= set(run.data.metrics)
        assert "mfu" not in run.data.metrics                 # no peak FLOP/s known for a CPU
        val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        flop_steps = [m.step for m in client.get_metric_history(run.info.run_id, "flops_seen")]
        speed_steps = [m.step for m in client.get_metric_history(run.info.run_id, "throughput/tokens_per_s")]
        assert val_steps == flop_steps == speed_steps and len(val_steps) == 2
        assert Path(run.data.tags["checkpoint_dir"], "model", "model.safetensors").exists()


def test_one_thread_jobs_ran_side_by_side(finished_sweep):
    _, first = finished_sweep
    if len(os.sched_getaffinity(0)) >= 2:
        assert "[local launcher] 2 jobs, 2 at a time" in first.stdout


def test_second_sweep_skips_finished_runs(finished_sweep):
    tmp, _ = finished_sweep
    again = sweep(tmp, "model=100k,200k", "experiment_name=e2e", "hydra.launcher.n_jobs=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2
    assert "at a time" not in again.stdout   # one at a time: Hydra's basic launcher
    side_by_side = sweep(tmp, "model=100k,200k", "experiment_name=e2e")
    assert side_by_side.returncode == 0, side_by_side.stderr[-3000:]
    assert side_by_side.stdout.count("finished earlier") == 2
    assert "[local launcher]" not in side_by_side.stdout   # finished jobs get no worker process


def test_two_budgets_fail_before_training(tmp_path):
    out = sweep(tmp_path, "model=100k", "budget.flops=1e12")
    assert out.returncode != 0
    assert "give exactly one of budget.tokens or budget.flops" in out.stderr


def test_unknown_preset_lists_the_valid_ones(tmp_path):
    out = sweep(tmp_path, "model=42m")
    assert out.returncode != 0
    assert "Could not find 'model/42m'" in out.stderr and "100k" in out.stderr and "7b" in out.stderr


def test_jsonl_files_give_the_same_records_as_mlflow(finished_sweep):
    """The analysis reads the runs' metrics.jsonl (no tracking server) and gets what MLflow holds."""
    from analysis.records import load_jsonl_records, load_records

    tmp, _ = finished_sweep
    from_mlflow = load_records("e2e", f"sqlite:///{tmp}/mlflow.db")
    from_files = load_jsonl_records(tmp / "runs", "e2e")
    cols = ["model", "n_params", "n_params_nonembed", "tokens", "compute", "loss"]
    assert len(from_files.records) == 2
    pd.testing.assert_frame_equal(from_files.records[cols], from_mlflow.records[cols], check_dtype=False)
    key = ["model", "step"]
    curves = [c.merge(r.records[["run_id", "model"]]).sort_values(key).drop(columns="run_id").reset_index(drop=True)
              for c, r in ((from_files.curves, from_files), (from_mlflow.curves, from_mlflow))]
    pd.testing.assert_frame_equal(curves[0], curves[1], check_dtype=False)
    assert load_jsonl_records(tmp / "runs", "another-experiment").records.empty


def _preference_file(tmp: Path) -> Path:
    """Preferences in the reference's JSONL, from the synthesized validation triplets."""
    import json

    from polar.synthesis import read_split

    (data_dir,) = [p.parent for p in (tmp / "cache" / "data").glob("*/manifest.json")]
    rows = read_split(data_dir, "val")
    path = tmp / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "reference": r["reference"], "chosen": r["positive"],
                                        "rejected": r["negative"]}) + "\n" for r in rows))
    return path


def test_finetune_is_a_stage_of_the_same_entry_point(finished_sweep):
    from mlflow import MlflowClient

    tmp, _ = finished_sweep
    prefs = _preference_file(tmp)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (pre,) = [r for r in client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                                           "tags.`polar.kind` = 'job'") if r.data.params["model"] == "100k"]
    init = Path(pre.data.tags["checkpoint_dir"]) / "model"
    base = ["stage=finetune", "model=100k", f"finetune.init_from={init}", f"finetune.train_path={prefs}",
            "recipe.batch_size=4", "train.n_evals=2", "train.threads=1", "experiment_name=e2e-ft",
            f"paths.cache_dir={tmp}/cache", f"paths.runs_dir={tmp}/runs", f"hydra.sweep.dir={tmp}/multirun-ft"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    run = subprocess.run([sys.executable, "-m", "sweeps.run", "-m", *base], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (ft,) = client.search_runs([client.get_experiment_by_name("e2e-ft").experiment_id], "tags.`polar.kind` = 'job'")
    assert ft.info.status == "FINISHED"
    assert ft.data.params["stage"] == "finetune" and ft.data.params["init_from"] == str(init.resolve())
    assert int(ft.data.params["steps"]) == 7               # one epoch: 29 of 32 rows (10% held out) / 4
    assert "val/loss" in ft.data.metrics and ft.info.run_name.startswith("polar-100k-ft-")
    assert Path(ft.data.tags["checkpoint_dir"], "model", "model.safetensors").exists()

    wrong = subprocess.run([sys.executable, "-m", "sweeps.run", "-m", *base[:1], "model=200k", *base[2:]],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0
    assert "does not have the shape of model='200k'" in wrong.stderr
