"""Training: learning happens, resume is exact, non-finite losses stop the run."""

import math

import pytest
import torch

from polar.config import ModelConfig, TrainConfig
from polar.model import build_model, flops_per_token
from polar.sinks import NullSink
from polar.trainer import CHECKPOINT, CHECKSUMS, eval_steps, evaluate, fit, lr_at, throughput
from tests.fixtures import DEBUG_MODEL, ListSink, seeded_model


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(99, 100, cfg) == pytest.approx(0.1, abs=0.01)
    assert eval_steps(1000, 5, "log")[0] == 20 and eval_steps(1000, 5, "log")[-1] == 1000


def test_training_lowers_validation_loss(easy_data, tmp_path):
    train, val, special = easy_data
    model = seeded_model(special)
    before, _ = evaluate(model, val, special)
    sink = ListSink()
    cfg = TrainConfig(lr=3e-3, batch_size=16, n_evals=3, warmup_fraction=0.0)
    result = fit(model, train, val, special, cfg, 64, flops_per_token(DEBUG_MODEL, 40), tmp_path, sink, progress=False)
    assert result.val_loss < before - 0.1
    vals = [(m, s) for m, s in sink.points if "val/loss" in m]
    assert [s for _, s in vals] == eval_steps(64, 3, "log")
    assert all(m["flops_seen"] == pytest.approx(m["tokens_seen"] * flops_per_token(DEBUG_MODEL, 40)) for m, _ in vals)
    # every evaluation logs the training speed since the previous one; no MFU without a peak
    assert all(m["throughput/tokens_per_s"] > 0 and "mfu" not in m for m, _ in vals)


def test_throughput_and_mfu():
    """Throughput in data tokens; MFU from the tokens the path executed (fewer, packed)."""
    assert throughput(3000, 2000, 2.0, 100.0, None) == {"throughput/tokens_per_s": 1500.0}
    both = throughput(3000, 2000, 2.0, 100.0, peak_flops=1e6, world_size=3)
    assert both["mfu"] == pytest.approx(1000 * 100 / 3e6)
    assert throughput(0, 0, 2.0, 100.0, 1e6) == {} and throughput(10, 10, 0.0, 100.0, 1e6) == {}


class Stop(Exception):
    pass


def _die_in_save_checkpoint(monkeypatch, after_saving: bool):
    """The process dies in the first checkpoint save: before writing it, or right after."""
    import polar.trainer as trainer

    real = trainer.save_checkpoint

    def dying(*args, **kwargs):
        if after_saving:
            real(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(trainer, "save_checkpoint", dying)
    return lambda: monkeypatch.setattr(trainer, "save_checkpoint", real)


def test_resume_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=3e-3, batch_size=8, n_evals=4, eval_spacing="linear")
    fpt = flops_per_token(DEBUG_MODEL, 40)
    full = fit(seeded_model(special), train, val, special, cfg, 16, fpt, tmp_path / "full", NullSink(), progress=False)

    revive = _die_in_save_checkpoint(monkeypatch, after_saving=True)   # dies after the step-4 checkpoint
    with pytest.raises(Stop):
        fit(seeded_model(special), train, val, special, cfg, 16, fpt, tmp_path / "cut", ListSink(), progress=False)
    revive()
    sink = ListSink()
    resumed = fit(seeded_model(special, seed=123), train, val, special, cfg, 16, fpt, tmp_path / "cut", sink,
                  progress=False)
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)
    assert resumed.tokens_seen == full.tokens_seen
    assert min(s for _, s in sink.points) == 5     # no step logged twice


def test_stop_checkpoints_the_step_it_was_asked_at_and_resumes_from_there(tiny_data, tmp_path):
    """SLURM's requeue signal (sweeps.jobs.RequeueSignal) sets `stop`: fit checkpoints the
    step it has just finished, even between evaluations, and the next attempt goes on."""
    from polar.trainer import Preempted

    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=3e-3, batch_size=8, n_evals=4, eval_spacing="linear")
    full = fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "full", NullSink(), progress=False)
    first, steps_done = ListSink(), []
    with pytest.raises(Preempted, match="stopped at step 6 of 16"):
        fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "cut", first, progress=False,
            stop=lambda: steps_done.append(1) or len(steps_done) >= 6)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["step"] == 6   # evaluations: 4, 8, ...
    second = ListSink()
    resumed = fit(seeded_model(special, seed=1), train, val, special, cfg, 16, 1.0, tmp_path / "cut", second,
                  progress=False)
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)
    train_steps = [s for m, s in first.points + second.points if "train/loss" in m]
    assert train_steps == list(range(1, 17))


@pytest.mark.parametrize("every_min, saved_at", [(0.0, 4), (1e-9, 7)])
def test_a_hard_failure_loses_at_most_the_wall_clock_interval(tiny_data, tmp_path, every_min, saved_at):
    """train.checkpoint_every_min checkpoints between evaluations too: a process that dies
    (no chance to checkpoint) resumes from the last interval's step, not from the last
    evaluation's, and ends as an uninterrupted run does."""
    from dataclasses import replace

    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=3e-3, batch_size=8, n_evals=4, eval_spacing="linear", checkpoint_every_min=every_min)
    full = fit(seeded_model(special), train, val, special, replace(cfg, checkpoint_every_min=0.0), 16, 1.0,
               tmp_path / "full", NullSink(), progress=False)
    steps_done = []

    def node_lost():
        steps_done.append(1)
        if len(steps_done) == 7:
            raise SystemError("node lost")     # nothing after this step runs: no flush, no checkpoint
        return False

    with pytest.raises(SystemError, match="node lost"):
        fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "cut", ListSink(), progress=False,
            stop=node_lost)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["step"] == saved_at   # evaluations: 4, 8, ...
    resumed = fit(seeded_model(special, seed=1), train, val, special, cfg, 16, 1.0, tmp_path / "cut", NullSink(),
                  progress=False)
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def test_a_checkpoint_of_the_older_format_still_resumes(tiny_data, tmp_path):
    """Checkpoints written before the name-keyed format (optimizer state by index)."""
    from polar.trainer import _shape

    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=3e-3, batch_size=8, n_evals=4, eval_spacing="linear")
    full = fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path / "full", NullSink(), progress=False)
    from polar.trainer import Preempted

    half = seeded_model(special)
    with pytest.raises(Preempted):                             # a checkpoint at step 1 ...
        fit(half, train, val, special, cfg, 16, 1.0, tmp_path / "cut", NullSink(), progress=False,
            stop=lambda: True)
    new = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    optimizer = torch.optim.AdamW(half.parameters())
    optimizer.load_state_dict(_index_keyed(new["optimizer"], half))
    torch.save({**new, "model": half.state_dict(), "optimizer": optimizer.state_dict(), "shape": _shape(half)},
               tmp_path / "cut" / CHECKPOINT)                   # ... rewritten as the old format did
    (tmp_path / "cut" / CHECKSUMS).unlink()                     # which wrote no checksums
    resumed = fit(seeded_model(special, seed=5), train, val, special, cfg, 16, 1.0, tmp_path / "cut", NullSink(),
                  progress=False)
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def _index_keyed(optim_state: dict, model) -> dict:
    names = [n for n, _ in model.named_parameters()]
    return {"state": {names.index(k): v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [names.index(k) for k in g["params"]]} for g in optim_state["param_groups"]]}


def test_a_kill_before_the_checkpoint_loses_no_metric_point(tiny_data, tmp_path, monkeypatch):
    """Metrics are flushed before the checkpoint is written: a kill between the two re-runs
    the steps, and SkipLogged keeps the history free of repeats and gaps."""
    from polar.sinks import SkipLogged

    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=3e-3, batch_size=8, n_evals=4, eval_spacing="linear")
    first = ListSink()
    revive = _die_in_save_checkpoint(monkeypatch, after_saving=False)
    with pytest.raises(Stop):
        fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path, first, progress=False)
    revive()
    assert not (tmp_path / CHECKPOINT).exists()
    assert ({"val/loss"} <= set(first.points[-1][0])) and first.points[-1][1] == 4   # delivered before dying
    second = ListSink()
    fit(seeded_model(special), train, val, special, cfg, 16, 1.0, tmp_path, SkipLogged(second, {"train/loss": 4, "lr": 4,
        "val/loss": 4, "val/acc": 4, "tokens_seen": 4, "flops_seen": 4}), progress=False)
    train_steps = [s for m, s in first.points + second.points if "train/loss" in m]
    assert train_steps == list(range(1, 17))


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_data, tmp_path, monkeypatch):
    import polar.trainer

    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=1e-3, batch_size=8, n_evals=2, eval_spacing="linear")
    real_step, calls = polar.trainer.train_step, []

    def step_that_diverges(*args):
        calls.append(1)
        return math.nan if len(calls) == 3 else real_step(*args)

    monkeypatch.setattr(polar.trainer, "train_step", step_that_diverges)
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 3"):
        fit(seeded_model(special), train, val, special, cfg, 4, 1.0, tmp_path, NullSink(), progress=False)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_checkpoint_from_another_shape_is_refused(tiny_data, tmp_path):
    _, _, train, val, special = tiny_data
    cfg = TrainConfig(lr=1e-3, batch_size=8, n_evals=1)
    fit(seeded_model(special), train, val, special, cfg, 1, 1.0, tmp_path, NullSink(), progress=False)
    other = build_model(ModelConfig(name="o", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                                    intermediate_size=64, vocab_size=512))
    with pytest.raises(ValueError, match="checkpoint .* is for model shape"):
        fit(other, train, val, special, cfg, 2, 1.0, tmp_path, NullSink(), progress=False)
