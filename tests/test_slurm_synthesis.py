"""Synthesis as SLURM job arrays on the dev cluster: a training sweep whose data set does
not exist yet submits the data set's units of work (2 policies x 2 shards) as a job
array first and its training job with a dependency on it (afterok), in one
`python -m sweeps.run -m` command; running the command again synthesizes nothing."""

from __future__ import annotations

import json
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

TWO_BY_TWO = ["data.policies=[{order:1,source:pydoc},{order:2,source:stdlib}]", "data.n_train=64",
              "data.n_val=16", "data.shard_size=64"]   # one train and one val shard


def sweep(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    tiny = [*TINY_SWEEP, *TWO_BY_TWO, "tracking=off", "train.n_evals=2", f"paths.cache_dir={tmp_path}/cache",
            f"paths.runs_dir={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/multirun", "hydra.launcher.poll_s=0.5"]
    return subprocess.run([sys.executable, "-m", "sweeps.run", "-m", "model=10k", "budget.tokens=2000",
                           "hydra/launcher=slurm", *tiny, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)


@pytest.mark.timeout(320)
def test_units_run_as_an_array_and_training_waits_for_them(tmp_path):
    out = sweep(tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "to synthesize first, 4 units of work" in log, log[-3000:]
    (array,) = re.findall(r"synthesis array (\d+): 1 node x no GPU, 1 task/node x 1 CPU, 4 GB/node, 1h00m: 4 units",
                          log)
    (train_job,) = re.findall(r"#0 \S+ -> (\S+)", log)
    units = ended_runs(array, ("JobID", "State"))
    assert len(units) == 4 and {u["State"] for u in units} == {"COMPLETED"}, units
    (train,) = ended_runs(train_job, ("State",))
    assert train["State"] == "COMPLETED"
    scripts = [p.read_text() for p in (tmp_path / "multirun").rglob("*_submission.sh")]
    held = [text for text in scripts if f"--dependency=afterok:{array}" in text]
    assert len(held) == 1 and "--kill-on-invalid-dep=yes" in held[0], [t[:600] for t in scripts]
    (data_dir,) = (tmp_path / "cache" / "data").iterdir()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert [s["n"] for s in manifest["shards"]] == [64, 16]
    assert not (data_dir / "parts").exists()                              # assembled by the training job
    assert len(list((tmp_path / "runs").glob("*/model/config.json"))) == 1

    again = sweep(tmp_path)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "synthesis array" not in log and "units of work" not in log, log[-3000:]
    assert json.loads((data_dir / "manifest.json").read_text()) == manifest
