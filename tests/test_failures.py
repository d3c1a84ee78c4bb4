"""Bad input ends in one clear message, never a traceback (issue 17): single runs (no -m)
refused as a sweep's jobs are, non-finite budgets, local paths checked at planning time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ROOT


def single_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m sweeps.run ARGS` without -m, everything it writes under tmp_path."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    return subprocess.run([sys.executable, "-m", "sweeps.run", *args, "tracking=off",
                           f"paths.cache_dir={tmp_path}/cache", f"paths.runs_dir={tmp_path}/runs",
                           f"hydra.run.dir={tmp_path}/hydra"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ single runs (item 9)

@pytest.mark.parametrize("args, message", [
    (["budget.tokens=-1"], "budget.tokens must be a finite number > 0"),
    (["budget.tokens=nan"], "budget.tokens must be a finite number > 0 (e.g. budget.tokens=2e6), got nan"),
    (["budget.flops=inf"], "budget.flops must be a finite number > 0 (e.g. budget.flops=1e15), got inf"),
    (["budget.tokens=2e4", "stage=bogus"], "stage='bogus' is not valid; choose one of ['pretrain', 'finetune', 'synthesize']"),
    ([], "give exactly one budget"),
    (["budget.tokens=1e30", "data.max_epochs=1e30"], "will not run locally without a GPU"),
    (["model=1.8b", "budget.tokens=1e6", "paths.models_dir=/nonexistent"],
     "model.init_from=/nonexistent/internlm2_5-1_8b (model=1.8b's backbone) is not on disk"),
    (["model=nope"], "Could not find 'model/nope'"),
])
def test_single_run_bad_config_is_one_message_without_traceback(tmp_path, args, message):
    out = single_run(tmp_path, *args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert not (tmp_path / "runs").exists()        # nothing started


def test_plan_single_wraps_every_planning_error(tmp_path):
    """sweeps.sweep_plan.plan_single: conversion and planning errors become one JobError,
    which Hydra prints as its message alone (a CompactHydraException)."""
    from hydra.errors import CompactHydraException

    from sweeps.sweep_plan import JobError, plan_single
    from tests.fixtures import job_config

    def bad():
        raise OSError("cannot read /x/config.json")

    with pytest.raises(JobError, match="nothing was started: cannot read /x/config.json") as caught:
        plan_single(bad, gpu_here=True)
    assert isinstance(caught.value, CompactHydraException)
    job, plan = plan_single(lambda: job_config("model=100k", "budget.tokens=2e4"), gpu_here=False)
    assert plan.n_params > 0 and job.model.name == "100k"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_budget_refuses_non_finite_values_naming_the_key(value):
    from sweeps.schema import BudgetConfig

    with pytest.raises(ValueError, match=rf"budget.flops must be a finite number > 0 .*, got {float(value)}$"):
        BudgetConfig(flops=float(value))


# ------------------------------------------------------------------ local paths at planning time (item 10)

HF_POLICIES = "data.policies=[{order:1,source:pydoc},{kind:hf,path:%s,name:lm}]"


def test_a_missing_hf_policy_is_refused_at_planning_naming_key_and_path(tmp_path):
    from sweeps.stages import stage_of
    from tests.fixtures import job_config

    job = job_config("budget.tokens=2e4", HF_POLICIES % "no/such/model", "data.tokenizer=rel/tok")
    missing = stage_of(job).missing(job)
    assert len(missing) == 2, missing
    assert missing[0].startswith("data.tokenizer=rel/tok does not exist (") and "hub ids are not fetched" in missing[0]
    assert missing[1].startswith("data.policies[1].path=no/such/model does not exist (")
    assert f"({Path.cwd() / 'no/such/model'})" in missing[1]        # resolved against the working directory
    (tmp_path / "file").write_text("x")
    job = job_config("budget.tokens=2e4", HF_POLICIES % (tmp_path / "file"))
    assert stage_of(job).missing(job) == [f"data.policies[1].path={tmp_path / 'file'} is a file, not a directory "
                                          f"({tmp_path / 'file'}): give a local Hugging Face folder (hub ids are "
                                          "not fetched; a relative path is read from the working directory)"]
    (tmp_path / "lm").mkdir()
    job = job_config("budget.tokens=2e4", HF_POLICIES % (tmp_path / "lm"))
    assert stage_of(job).missing(job) == []


def test_a_backbone_brings_its_own_tokenizer_so_data_tokenizer_is_not_checked():
    from sweeps.stages import stage_of
    from tests.fixtures import job_config

    job = job_config("budget.tokens=2e4", "model=pretrained", "model.init_from=/nonexistent/bb",
                     "data.tokenizer=/nonexistent/tok")
    assert [m.split("=")[0] for m in stage_of(job).missing(job)] == ["model.init_from"]


def test_a_missing_policy_path_refuses_the_run_before_anything_is_submitted(tmp_path):
    out = single_run(tmp_path, "budget.tokens=2e4", HF_POLICIES % "models/not-here")
    assert out.returncode != 0
    assert "data.policies[1].path=models/not-here does not exist" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Repo id" not in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_relative_policy_path_is_never_read_as_a_hub_id(tmp_path, monkeypatch):
    from polar.config import PolicySpec
    from polar.policies import HFPolicy
    from polar.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(FileNotFoundError, match=r"policy 'lm': path=gpt2 does not exist \(.*/gpt2\)"):
        HFPolicy(PolicySpec(kind="hf", path="gpt2", name="lm"), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer=org/tok does not exist"):
        load_tokenizer("org/tok")


# ------------------------------------------------------------------ credentials in tracking URIs (item 12)

SECRET = "SECRETtoken42"


@pytest.mark.parametrize("uri, shown", [
    (f"http://user:{SECRET}@127.0.0.1:9", "http://user:***@127.0.0.1:9"),
    (f"https://{SECRET}@host/path", "https://***@host/path"),
    (f"postgresql://u:{SECRET}@db:5432/mlflow", "postgresql://u:***@db:5432/mlflow"),
    (f"MLflow at http://u:{SECRET}@h:1 failed: HTTPConnectionPool(url=http://u:{SECRET}@h:1/api)",
     "MLflow at http://u:***@h:1 failed: HTTPConnectionPool(url=http://u:***@h:1/api)"),
    (f"- tracking.uri=http\\://user\\:{SECRET}@h\\:1", "- tracking.uri=http\\://user\\:***@h\\:1"),   # Hydra's escaping
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("file:///tmp/a@b", "file:///tmp/a@b"),
    ("http://host/x?q=a:b@c", "http://host/x?q=a:b@c"),
])
def test_redact_hides_the_password_of_every_uri(uri, shown):
    from sweeps.runs import redact

    assert redact(uri) == shown
    assert redact(None) is None


def _files_holding(root: Path, needle: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(str(path.relative_to(root)))
    return hits


def test_a_sweep_and_a_report_never_show_or_store_the_token(tmp_path):
    """A real server, reached through http://user:TOKEN@...: the token is in no output of
    the sweep or of the report, and in no file they (or the server) wrote."""
    from tests.fixtures import TINY_SWEEP
    from tests.mlflow_server import MlflowServer

    with MlflowServer(tmp_path / "server") as server:
        uri = server.uri.replace("http://", f"http://user:{SECRET}@")
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        run = subprocess.run([sys.executable, "-m", "sweeps.run", "-m", "model=100k,200k", "experiment_name=cred",
                              *TINY_SWEEP, "train.n_evals=2", "budget.tokens=2e4", f"tracking.uri={uri}",
                              f"paths.cache_dir={tmp_path}/cache", f"paths.runs_dir={tmp_path}/runs",
                              f"hydra.sweep.dir={tmp_path}/multirun"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "user:***@127.0.0.1" in run.stdout               # the sweep says where it logs, redacted
        bad = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "nope", "--tracking-uri", uri,
                              "--out", str(tmp_path / "nope")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode != 0 and "user:***@" in bad.stderr, bad.stderr[-2000:]
        report = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "cred", "--tracking-uri",
                                 uri, "--out", str(tmp_path / "report")], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert report.returncode == 0, report.stderr[-3000:]
        assert "user:***@127.0.0.1" in (tmp_path / "report" / "report.md").read_text()
    for out in (run, bad, report):
        assert SECRET not in out.stdout + out.stderr
    assert _files_holding(tmp_path, SECRET) == []       # runs, Hydra's files, the report, the server's store
