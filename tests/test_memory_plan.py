"""Memory planned before submitting (sweeps.memory): the estimate against the tensors a
real training step holds, activation checkpointing turned on where a plan needs it (and
changing speed only), a plan that fits no way refused with what would fit, the
data-parallel width and a wall-clock target driving the GPUs, and SLURM's time limits
checked against the plan (sweeps.sweep_plan.time_problems)."""

from dataclasses import replace

import pytest
import torch

from polar.config import DataConfig, TrainSettings
from polar.model import build_model, n_params
from sweeps.derive import plan_run
from sweeps.memory import estimate, longest_row
from sweeps.recipes import FixedRecipe
from sweeps.schema import ResourcesConfig
from tests.fixtures import DEBUG_MODEL, SPECIAL, token_ids

MODEL = replace(DEBUG_MODEL, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=352,
                vocab_size=64)
DATA = DataConfig(prefix_min=20, prefix_max=20, max_response_tokens=40)


def longest_batch(n: int):
    """n triplets whose every piece has the data config's longest length."""
    from polar.data import TokenTriplets

    def piece(k):
        return [4 + (i % 50) for i in range(k)]

    return TokenTriplets(*[[piece(k) for _ in range(n)] for k in (20, 40, 40, 40)])


def measured_step(checkpointing: bool, micro: int = 4):
    """(state bytes, bytes autograd saved in the forward) of one step of MODEL on the CPU."""
    from polar.model import build_model
    from polar.trainer import collate, scores, set_checkpointing

    torch.manual_seed(0)
    model = build_model(MODEL, **token_ids(SPECIAL))
    model.train()
    set_checkpointing(model, checkpointing)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pos, neg = scores(model, collate(longest_batch(micro), SPECIAL, packing=False), "cpu")
        loss = -torch.nn.functional.logsigmoid(pos - neg).mean()
    loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()] + \
        [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    return sum(t.numel() * t.element_size() for t in tensors), sum(saved.values()), loss.item(), \
        [p.grad.clone() for p in model.parameters()]


def test_the_estimate_is_within_30_percent_of_a_real_step():
    torch.set_num_threads(1)
    state, activations, *_ = measured_step(checkpointing=False)
    n = sum(p.numel() for p in build_model(MODEL, **token_ids(SPECIAL)).parameters())
    mem = estimate(MODEL, n, DATA, micro_batch=4, ranks=1, sharded=False, packing=False, checkpointing=False,
                   on_gpu=False)
    assert mem.row_tokens == longest_row(DATA, packing=False) == 3 + 2 * 20 + 2 * 40
    assert mem.state_gb * 1e9 == pytest.approx(state, rel=0.01)
    assert mem.activations_gb * 1e9 == pytest.approx(activations, rel=0.3), (mem, activations)


def test_checkpointing_keeps_less_and_changes_nothing_else():
    torch.set_num_threads(1)
    _, full, loss, grads = measured_step(checkpointing=False)
    _, kept, loss_ckpt, grads_ckpt = measured_step(checkpointing=True)
    assert kept < 0.6 * full
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))


# Peaks of torch.cuda.max_memory_allocated measured on an H200 (bench/README.md, 2026-11-30):
# the 1.8b preset, 32 triplets of 256/64/64 +-25% tokens, bf16 autocast, fused AdamW.
# (packing, micro-batch, checkpointing, compiled) -> GB
H200_PEAKS = {(True, 4, False, False): 40.5, (True, 16, False, False): 65.5, (True, 32, False, False): 95.9,
              (True, 16, True, False): 33.1, (False, 4, False, False): 50.9, (True, 16, False, True): 52.5,
              (True, 32, False, True): 69.2, (True, 32, True, True): 28.8}
PRESET_18B = replace(DEBUG_MODEL, name="1.8b", hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                     intermediate_size=8192, vocab_size=92544)
BENCH_DATA = DataConfig(prefix_min=192, prefix_max=321, max_response_tokens=81)


@pytest.mark.parametrize("setting", sorted(H200_PEAKS))
def test_the_gpu_estimate_bounds_a_measured_h200_step_from_above(setting):
    """The dry run's figure (without its fixed overhead) is never below what an H200 held,
    eager or compiled, and at most 1.35x above it (its rows are all of the longest length)."""
    packing, micro, checkpointing, compiled = setting
    n = n_params(PRESET_18B)
    mem = estimate(PRESET_18B, n, BENCH_DATA, micro_batch=micro, ranks=1, sharded=False, packing=packing,
                   checkpointing=checkpointing, on_gpu=True, compiled=compiled)
    planned = mem.total_gb - mem.overhead_gb
    assert H200_PEAKS[setting] <= planned <= 1.35 * H200_PEAKS[setting], (mem.describe(), H200_PEAKS[setting])


def test_compiled_layers_train_the_same():
    """train.compile (torch.compile of each decoder layer) changes speed only."""
    import shutil

    from polar.config import TrainConfig
    from polar.trainer import set_compiled, train_step

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on the CPU needs a C compiler")
    torch.set_num_threads(1)
    batch, results = longest_batch(4), []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(MODEL, **token_ids(SPECIAL))
        set_compiled(model, compiled)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = TrainConfig(lr=1e-3, batch_size=4, micro_batch_size=2, compile=compiled)
        results.append([train_step(model, optimizer, batch, SPECIAL, cfg, "cpu") for _ in range(2)])
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers) == compiled
    assert results[1] == pytest.approx(results[0], abs=1e-5)


BIG = replace(DEBUG_MODEL, name="big", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
              intermediate_size=14336, vocab_size=92544)
LONG = DataConfig(prefix_min=1, prefix_max=1024, max_response_tokens=4096, n_train=10**9)


def test_the_plan_checkpoints_where_it_must_and_refuses_what_fits_no_way():
    train = TrainSettings(micro_batch_size=4, packing=True, compile=True)      # as train=gpu
    plan = plan_run(BIG, LONG, train, tokens=1e12, flops=None, recipe=FixedRecipe(batch_size=1024))
    assert plan.gpus == 4 and plan.parallel == "fsdp" and plan.activation_checkpointing
    assert plan.gpu_memory.total_gb <= 0.9 * 80
    small = TrainSettings(micro_batch_size=4, packing=True)
    easy = plan_run(replace(BIG, num_layers=2), replace(LONG, prefix_max=16, max_response_tokens=64), small,
                    tokens=1e9, flops=None, recipe=FixedRecipe(batch_size=64))
    assert not easy.activation_checkpointing                           # fits without
    with pytest.raises(ValueError, match=r"on 4 GPUs \(fsdp\) needs .* GB per GPU .* it would fit with "
                                         r"train.micro_batch_size=\d+ \(per GPU\) with activation checkpointing"):
        plan_run(BIG, LONG, TrainSettings(micro_batch_size=16, packing=True, compile=True), tokens=1e12, flops=None,
                 recipe=FixedRecipe(batch_size=1024))
    with pytest.raises(ValueError, match="needs .* activations .* it would fit with .*resources.gpus=8"):
        plan_run(BIG, LONG, TrainSettings(micro_batch_size=4, packing=True, activation_checkpointing=False),
                 tokens=1e12, flops=None, recipe=FixedRecipe(batch_size=1024))


def test_gpus_for_speed_drive_the_batch_the_time_and_the_gpu_hours():
    train = TrainSettings(micro_batch_size=2, packing=True)
    base = plan_run(BIG, LONG, train, tokens=1e12, flops=None, recipe=FixedRecipe(batch_size=1024))
    wide = plan_run(BIG, LONG, train, tokens=1e12, flops=None, recipe=FixedRecipe(batch_size=1024),
                    resources=ResourcesConfig(gpus=16))
    assert (base.gpus, wide.gpus) == (4, 16) and wide.steps == base.steps
    with pytest.raises(ValueError, match="recipe.batch_size=1000 does not split over the 16 GPUs"):
        plan_run(BIG, LONG, train, tokens=1e12, flops=None, recipe=FixedRecipe(batch_size=1000),
                 resources=ResourcesConfig(gpus=16))
    assert wide.time_limit_min < base.time_limit_min and wide.gpu_hours == pytest.approx(base.gpu_hours, rel=0.05)
    fast = plan_run(BIG, LONG, train, tokens=1e12, flops=None, recipe=FixedRecipe(batch_size=1024),
                    resources=ResourcesConfig(target_hours=720))
    assert fast.gpus > 16 and fast.gpu_hours / fast.gpus <= 720 < fast.gpu_hours / (fast.gpus // 2)
    with pytest.raises(ValueError, match="resources.gpus=2 cannot hold the training state"):
        plan_run(BIG, LONG, train, tokens=1e12, flops=None, resources=ResourcesConfig(gpus=2))


def test_slurm_time_limits_must_cover_the_plan():
    from sweeps.schema import JobConfig
    from sweeps.sweep_plan import PlannedJob, Shape, time_problems

    plan = plan_run(BIG, LONG, TrainSettings(micro_batch_size=4, packing=True, compile=True), tokens=1e11, flops=None,
                    recipe=FixedRecipe(batch_size=1024))
    job = PlannedJob(3, ("model=big",), JobConfig(), plan)
    enough = Shape(1, 4, 4, None, 60 * 24, None)
    assert time_problems(job, enough, max_num_timeout=plan.time_limit_min // (60 * 24) + 1, signal_delay_s=300) == []
    (short,) = time_problems(job, enough, max_num_timeout=0, signal_delay_s=300)
    assert "#3 (big) needs about" in short and "raise hydra.launcher.max_num_timeout to" in short
    (late,) = time_problems(job, Shape(1, 4, 4, None, 10**7, None), max_num_timeout=0, signal_delay_s=200)
    assert "signal_delay_s=200 does not cover twice a checkpoint of its 118 GB training state" in late
    assert time_problems(job, Shape(1, 4, 4, None, 10**7, None), max_num_timeout=0, signal_delay_s=300) == []
