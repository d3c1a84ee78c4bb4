"""One job started as two processes by torchrun (gloo on the CPU), as a multi-GPU SLURM
job starts one task per GPU: the ranks train one model together, rank 0 alone writes
the MLflow run, the metrics and the model, and the result is that of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ROOT, TINY_SWEEP
from tests.mlflow_server import free_port

STABLE = ["model=100k", "recipe.lr=1e-3", "budget.tokens=1e4", "train.n_evals=2"]   # 20 steps, far from chaotic


def _run(tmp: Path, runs: str, *args: str, ranks: int | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    launcher = launcher if ranks else []
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/{runs}.db", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "sweeps.run", *TINY_SWEEP, *STABLE, *args,
                           "experiment_name=ranks", f"paths.cache_dir={tmp}/cache", f"paths.runs_dir={tmp}/{runs}",
                           f"hydra.run.dir={tmp}/hydra-{runs}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    one = _run(tmp, "one")
    assert one.returncode == 0, one.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        done = _run(tmp, mode, f"train.parallel={mode}", ranks=2)
        assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def _final(tmp: Path, runs: str) -> tuple[str, float, list[dict]]:
    (run_dir,) = (tmp / runs).iterdir()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r["val/loss_final"] for r in lines if "val/loss_final" in r)
    return run_dir.name, final, lines


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_make_one_run_with_the_result_of_one_process(runs, mode):
    from mlflow import MlflowClient

    key_one, loss_one, _ = _final(runs, "one")
    key, loss, lines = _final(runs, mode)
    assert key == key_one                      # how ranks share the model is not part of the run key
    assert loss == pytest.approx(loss_one, rel=1e-4)
    steps = [r["step"] for r in lines if "train/loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == 20   # one writer: no step logged twice
    client = MlflowClient(f"sqlite:///{runs}/{mode}.db")
    exp = client.get_experiment_by_name("ranks")
    (run,) = client.search_runs([exp.experiment_id], "tags.`polar.kind` = 'job'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/loss_final"] == pytest.approx(loss)
    assert (runs / mode / key / "model" / "model.safetensors").exists()


def test_a_finished_run_is_skipped_by_every_rank(runs):
    again = _run(runs, "fsdp", "train.parallel=fsdp", ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 1          # rank 0 says it, all ranks skip
    assert "ranks=2 (fsdp)" in again.stdout
