"""`hydra/launcher=slurm` for jobs that train on the CPU (train=cpu, the default) on the dev
cluster, which has no GPUs: the command of issue 12, with no hydra.launcher.gpus_per_node
override, asks SLURM for no GPU and train.threads CPUs per task, and runs (before, sbatch
refused it: "Invalid generic resource (gres) specification")."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.fixtures import ROOT, TINY_SWEEP

try:
    from tests.slurm_util import ended_runs, slurm_cluster  # noqa: F401 (fixture)
except ImportError:  # tests/ without __init__.py
    from slurm_util import ended_runs, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

COMMAND = ["model=10k,20k", "budget.tokens=20000", "hydra/launcher=slurm"]


@pytest.mark.timeout(240)
def test_a_cpu_sweep_asks_for_no_gpu_and_runs(tmp_path):
    from sweeps.data_sets import needed, synthesize_missing
    from tests.fixtures import job_config

    tiny = [*TINY_SWEEP, "tracking=off", "train.n_evals=2", f"paths.cache_dir={tmp_path}/cache",
            f"paths.runs_dir={tmp_path}/runs"]
    synthesize_missing(needed([job_config(*tiny, "budget.tokens=20000")]))   # not by both jobs at once
    out = subprocess.run([sys.executable, "-m", "sweeps.run", "-m", *COMMAND, *tiny, "hydra.launcher.poll_s=0.5",
                          f"hydra.sweep.dir={tmp_path}/multirun"], cwd=ROOT, capture_output=True, text=True,
                         timeout=220)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"\d+\s", line)]
    assert [(r[1], r[10]) for r in rows] == [("10k", "0"), ("20k", "0")], log[-3000:]   # the job table: no GPU
    assert "Submitting 2 jobs as 1 SLURM job array" in log
    assert re.search(r"job array \d+: 1 node x no GPU, 1 task/node x 1 CPU, 1 GB/node", log), log[-3000:]
    ids = re.findall(r"#\d \S+ -> (\S+)", log)
    assert len(ids) == 2 and re.search(r"#0 \(\S+\) finished", log) and re.search(r"#1 \(\S+\) finished", log)
    for job_id in ids:
        (run,) = ended_runs(job_id, ("ReqTRES", "State"))
        assert "gpu" not in run["ReqTRES"] and "cpu=1," in run["ReqTRES"] and run["State"] == "COMPLETED", (job_id, run)
    assert len(list((tmp_path / "runs").glob("*/model/config.json"))) == 2
