"""Warmup-stable-decay (train.schedule=wsd) and its decay branches (train.decay_at): the
schedule's shape, the branches' placement and checks, and a branch's end being exactly
the converged point of a shorter WSD run, while the main run goes on as if no branch
had left it (also across a preemption, in the run or midway through a branch, whose own
checkpoint it goes on from)."""

import shutil

import pytest
import torch

from polar import names
from polar.config import TrainConfig
from polar.sinks import NullSink
from polar.trainer import Preempted, decay_branches, fit, lr_at
from tests.fixtures import ListSink, seeded_model


def wsd(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "batch_size": 8, "schedule": "wsd", "warmup_fraction": 0.0,
                          "min_lr_ratio": 0.0, "decay_fraction": 0.25, "n_evals": 2, "eval_spacing": "linear", **kw})


def test_the_schedule_is_stable_then_decays_linearly_over_its_last_fraction():
    cfg = wsd(warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 40, cfg) for s in range(40)]
    assert lrs[2] < lrs[3] == lrs[29] == cfg.lr                 # 4 warmup steps, stable to step 30
    assert lrs[30] < lrs[29] and lrs[-1] == pytest.approx(0.1 * cfg.lr)
    assert all(a > b for a, b in zip(lrs[30:], lrs[31:]))


def test_branches_leave_where_a_shorter_wsd_run_would_decay():
    assert decay_branches(100, wsd(decay_at=[0.25, 0.5])) == {19: 25, 38: 50}
    assert decay_branches(100, wsd()) == {}


@pytest.mark.parametrize("kw, message", [
    ({"schedule": "cosine", "decay_at": [0.5]}, "needs train.schedule=wsd"),
    ({"decay_at": [0.5, 1.0]}, r"increasing fractions of the run in \(0, 1\)"),
    ({"decay_at": [0.5, 0.25]}, "increasing fractions"),
    ({"warmup_fraction": 0.3, "decay_at": [0.2]}, r"in \(0.4, 1\).*got \[0.2\]"),
    ({"decay_fraction": 1.0}, r"train.decay_fraction must be in \(0, 1\), got 1.0"),
])
def test_bad_decay_settings_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        wsd(**kw)


def test_two_points_that_round_to_one_branch_are_refused():
    with pytest.raises(ValueError, match=r"decay_at=\[0.5, 0.51\] gives decay branches .* distinct"):
        decay_branches(10, wsd(decay_at=[0.5, 0.51]))


def decay_points(sink: ListSink) -> dict[int, dict]:
    return {step: m for m, step in sink.points if names.DECAY_VAL_LOSS in m}


def test_a_branch_ends_at_the_point_of_a_shorter_run_and_the_main_run_is_unchanged(tiny_data, tmp_path):
    _, _, train, val, special = tiny_data
    sink = ListSink()
    main = fit(seeded_model(special), train, val, special, wsd(decay_at=[0.5]), 16, 2.0, tmp_path / "main", sink,
               progress=False)
    plain = fit(seeded_model(special), train, val, special, wsd(), 16, 2.0, tmp_path / "plain", NullSink(),
                progress=False)
    short = fit(seeded_model(special), train, val, special, wsd(), 8, 2.0, tmp_path / "short", NullSink(),
                progress=False)
    (point,) = decay_points(sink).items()
    assert point[0] == 6                                        # logged where it left: 8 - 25% of 8
    assert point[1][names.DECAY_VAL_LOSS] == pytest.approx(short.val_loss, abs=1e-6)
    assert point[1][names.DECAY_TOKENS] == short.tokens_seen
    assert point[1][names.DECAY_FLOPS] == 2.0 * short.tokens_seen
    assert main.val_loss == pytest.approx(plain.val_loss, abs=1e-6) and main.tokens_seen == plain.tokens_seen


def test_a_preempted_run_does_not_repeat_a_finished_branch(tiny_data, tmp_path):
    _, _, train, val, special = tiny_data
    cfg = wsd(decay_at=[0.25, 0.5])
    whole = ListSink()
    full = fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "full", whole, progress=False)
    first, calls = ListSink(), []
    with pytest.raises(Preempted):
        fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "cut", first, progress=False,
            stop=lambda: calls.append(1) or len(calls) >= 5)        # branches leave at steps 3 and 6: stop at 5
    assert list(decay_points(first)) == [3]
    second = ListSink()
    resumed = fit(seeded_model(special, seed=5), train, val, special, cfg, 16, 1.0, tmp_path / "cut", second,
                  progress=False)
    assert list(decay_points(second)) == [6]
    both = {**decay_points(first), **decay_points(second)}
    assert {s: m[names.DECAY_VAL_LOSS] for s, m in both.items()} == pytest.approx(
        {s: m[names.DECAY_VAL_LOSS] for s, m in decay_points(whole).items()}, abs=1e-6)
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def test_the_plan_counts_the_branches_in_its_time_but_not_in_its_axes():
    from polar.config import DataConfig, TrainSettings
    from sweeps.derive import decay_branch_share, plan_run
    from tests.fixtures import DEBUG_MODEL

    branched = TrainSettings(schedule="wsd", decay_fraction=0.1, decay_at=[0.25, 0.5, 0.75], device="cpu")
    assert decay_branch_share(branched) == pytest.approx(0.15)
    data = DataConfig(n_train=10**6)
    plain = plan_run(DEBUG_MODEL, data, TrainSettings(schedule="wsd", device="cpu"), tokens=1e9, flops=None)
    wsd_plan = plan_run(DEBUG_MODEL, data, branched, tokens=1e9, flops=None)
    assert (wsd_plan.tokens, wsd_plan.compute, wsd_plan.steps) == (plain.tokens, plain.compute, plain.steps)
    assert wsd_plan.time_limit_min > plain.time_limit_min


@pytest.fixture(scope="module")
def wsd_sweep(tmp_path_factory):
    """Three sizes, one WSD run each with three decay branches, into a real sqlite MLflow store."""
    import os
    import subprocess
    import sys

    from tests.fixtures import ROOT, TINY_SWEEP

    tmp = tmp_path_factory.mktemp("wsd")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    out = subprocess.run([sys.executable, "-m", "sweeps.run", "-m", "model=10k,50k,200k", *TINY_SWEEP,
                          "budget.tokens=4e4", "train.n_evals=3", "train.schedule=wsd", "train.decay_at=[0.25,0.5,0.75]",
                          "experiment_name=wsd_e2e", f"paths.cache_dir={tmp}/cache", f"paths.runs_dir={tmp}/runs",
                          f"hydra.sweep.dir={tmp}/multirun"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp


def test_decay_points_reach_mlflow_and_the_records(wsd_sweep):
    from analysis.records import load_jsonl_records, load_records

    rec = load_records("wsd_e2e", f"sqlite:///{wsd_sweep}/mlflow.db")
    points = rec.points()
    assert len(rec.records) == 3 and len(rec.decays) == 9
    assert sorted(points["point"].value_counts().items()) == [("decay", 9), ("final", 3)]
    for _, run in rec.records.iterrows():
        mine = points[points["run_id"].str.startswith(run["run_id"])].sort_values("tokens")
        assert mine["tokens"].iloc[:3].tolist() == pytest.approx([f * mine["tokens"].iloc[3] for f in (.25, .5, .75)],
                                                                rel=0.1)
        assert (mine["n_params"] == run["n_params"]).all()
    from_files = load_jsonl_records(wsd_sweep / "runs", "wsd_e2e").points()
    assert sorted(from_files["loss"]) == pytest.approx(sorted(points["loss"]))


def test_the_report_fits_l_of_n_and_d_and_the_frontier_on_converged_points(wsd_sweep, tmp_path):
    import json
    import subprocess
    import sys

    from tests.fixtures import ROOT

    out = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "wsd_e2e", "--tracking-uri",
                          f"sqlite:///{wsd_sweep}/mlflow.db", "--out", str(tmp_path / "report"), "--bootstrap", "50",
                          "--no-mlflow-log"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    fits = json.loads((tmp_path / "report" / "fits.json").read_text())["fits"]
    chin = fits["chinchilla"]
    assert chin["n"] == 12 and chin["decay_points"] == 9, chin
    assert set(chin["ci"]) >= {"alpha", "beta"} and chin["ci"]["alpha"][0] <= chin["params"]["alpha"] <= chin["ci"]["alpha"][1]
    assert fits["loss_vs_compute"]["frontier_of"].startswith("converged points")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "12 converged points: each run's end and 9 WSD decay points" in report
    assert (tmp_path / "report" / "loss_vs_tokens.png").stat().st_size > 10_000


def wsd_records(truth: dict, noise: float = 0.002):
    """Records of one WSD run per size (its end at 8e9 tokens) with decay points at 1/8 ...
    7/8 of it, losses from a known L(N, D); curves in the stable phase sit above the law."""
    import numpy as np
    import pandas as pd

    from analysis.laws import chinchilla
    from analysis.records import CURVE_COLUMNS, Records

    rng = np.random.default_rng(1)
    rows, curves, decays = [], [], []
    for i, n in enumerate(np.geomspace(1e7, 1e9, 5)):
        rid, d_end = f"run{i}", 8e9

        def loss(d):
            return chinchilla(n, d, **truth) * np.exp(rng.normal(0, noise, np.shape(d)))

        rows.append({"run_id": rid, "model": f"m{i}", "n_params": n, "n_params_nonembed": n, "tokens": d_end,
                     "compute": 6 * n * d_end, "loss": float(loss(d_end))})
        d = np.arange(1, 8) / 8 * d_end
        decays.append(pd.DataFrame({"run_id": rid, "step": np.arange(1, 8) * 100, "tokens_seen": d,
                                    "flops_seen": 6 * n * d, "val_loss": loss(d)}))
        curves.append(pd.DataFrame({"run_id": rid, "step": np.arange(1, 9) * 100, "tokens_seen": d_end * np.arange(1, 9) / 8,
                                    "flops_seen": 6 * n * d_end * np.arange(1, 9) / 8,
                                    "val_loss": 1.1 * chinchilla(n, d_end * np.arange(1, 9) / 8, **truth)}))
    return Records(pd.DataFrame(rows), pd.concat(curves, ignore_index=True)[CURVE_COLUMNS], experiment="wsd",
                   decays=pd.concat(decays, ignore_index=True)[CURVE_COLUMNS])


def test_analysis_recovers_l_of_n_and_d_from_decay_points(tmp_path):
    from analysis.report import analyse, write_report

    truth = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    rec = wsd_records(truth)
    an = analyse(rec, bootstrap_k=50)
    fit = an["chinchilla"]["fit"]
    assert an["chinchilla"]["decay_points"] == 35 and fit.n == 40
    for name in ("alpha", "beta"):
        assert fit.ci[name][0] <= truth[name] <= fit.ci[name][1], (name, fit.ci[name])
    frontier = an["frontier"]          # on converged points, not on the stable phase's curves (10% above)
    assert (frontier["run_id"].str.contains("@") | frontier["run_id"].isin(rec.records["run_id"])).all()
    files = {f.name for f in write_report(rec, an, tmp_path)}
    assert "loss_vs_tokens.png" in files
    assert "40 converged points: each run's end and 35 WSD decay points" in (tmp_path / "report.md").read_text()


def counting_steps(monkeypatch) -> list:
    """Every optimizer step the trainer takes (main run and branches) appends to the list."""
    import polar.trainer as trainer

    taken, real = [], trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: taken.append(1) or real(*a, **kw))
    return taken


def preempt_in_branch(tiny_data, run_dir, cfg):
    """Run 16 steps with the branch 4->8 and stop after its second step (the 6th stop() call)."""
    _, _, train, val, special = tiny_data
    sink, calls = ListSink(), []
    with pytest.raises(Preempted, match=r"step 6 of the decay branch 4->8"):
        fit(seeded_model(special), train, val, special, cfg, 16, 1.0, run_dir, sink, progress=False,
            stop=lambda: calls.append(1) or len(calls) >= 6)
    assert decay_points(sink) == {}


@pytest.mark.parametrize("damaged", [False, True])
def test_a_branch_preempted_midway_goes_on_from_its_own_checkpoint(tiny_data, tmp_path, monkeypatch, damaged):
    _, _, train, val, special = tiny_data
    cfg = wsd(decay_at=[0.5], decay_fraction=0.5)              # one branch: leaves at step 4, decays to step 8
    whole = ListSink()
    full = fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "full", whole, progress=False)
    run_dir = tmp_path / "cut"
    preempt_in_branch(tiny_data, run_dir, cfg)
    branch_checkpoint = run_dir / "decay" / "checkpoint.pt"
    assert torch.load(branch_checkpoint, weights_only=True)["branch"] == [4, 8]
    if damaged:                                 # detected, never trained on: the branch starts over
        branch_checkpoint.write_bytes(b"")
    taken, second = counting_steps(monkeypatch), ListSink()
    resumed = fit(seeded_model(special, seed=5), train, val, special, cfg, 16, 1.0, run_dir, second, progress=False)
    assert len(taken) == (4 if damaged else 2) + 12         # the branch's remaining steps, then steps 5..16
    assert decay_points(second)[4] == pytest.approx(decay_points(whole)[4], abs=1e-6)   # loss, tokens and FLOPs
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)
    assert not (run_dir / "decay").exists()                 # removed once the run's checkpoint records it done


def test_the_folder_of_a_finished_branch_left_by_a_kill_is_removed_on_resume(tiny_data, tmp_path):
    _, _, train, val, special = tiny_data
    cfg, run_dir = wsd(decay_at=[0.5], decay_fraction=0.5), tmp_path / "run"
    preempt_in_branch(tiny_data, run_dir, cfg)
    shutil.copytree(run_dir / "decay", tmp_path / "kept")
    fit(seeded_model(special), train, val, special, cfg, 16, 1.0, run_dir, NullSink(), progress=False)
    shutil.copytree(tmp_path / "kept", run_dir / "decay")   # as if killed after the run recorded the branch done
    again = fit(seeded_model(special), train, val, special, cfg, 16, 1.0, run_dir, NullSink(), progress=False)
    assert again.steps == 16 and not (run_dir / "decay").exists()
