"""sweeps/derive.py: pure planning of a run from preset + budget + recipe."""


from dataclasses import replace

import pytest

from polar.config import DataConfig, ModelConfig, TrainSettings
from polar.model import flops_per_token, n_params
from sweeps.derive import cpu_memory_gb, cpu_minutes, local_refusal, plan_run, sequence_lengths
from sweeps.recipes import FixedRecipe, PolarLawRecipe
from sweeps.schema import ResourcesConfig
from tests.fixtures import model_preset

M = ModelConfig(name="1m")
D = DataConfig(prefix_min=4, prefix_max=12, max_response_tokens=16)
T = TrainSettings()


preset = model_preset


def test_tokens_and_flops_budgets_agree():
    by_tokens = plan_run(M, D, T, tokens=1e6, flops=None, recipe=FixedRecipe(batch_size=16))
    by_flops = plan_run(M, D, T, tokens=None, flops=by_tokens.compute, recipe=FixedRecipe(batch_size=16))
    assert by_flops.tokens == pytest.approx(1e6)
    assert by_tokens.steps == by_flops.steps == int(1e6 // (16 * sequence_lengths(D)[1]))
    assert by_tokens.flops_per_token == flops_per_token(M, sequence_lengths(D)[0])


def test_budget_errors():
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_run(M, D, T, tokens=None, flops=None)
    with pytest.raises(ValueError, match="budget too small for one optimizer step of model '1m'"):
        plan_run(M, D, T, tokens=100, flops=None, recipe=FixedRecipe(batch_size=32))


def test_the_recipe_sets_lr_and_batch():
    plan = plan_run(M, D, T, tokens=1e6, flops=None, recipe=FixedRecipe(lr=3e-3, batch_size=8, lr_width_ref=64))
    assert plan.lr == pytest.approx(3e-3 * 64 / M.hidden_size) and plan.batch_size == 8
    assert plan_run(M, D, T, tokens=1e6, flops=None).lr == FixedRecipe().lr    # no recipe: FixedRecipe()


@pytest.mark.parametrize("model, backbone_tokens, rm_tokens, paper_lr, ours", [
    ("1.8b", 2.5e12, 0.94e12, 1.4e-5, 1.396e-5),
    ("7b", 4.0e12, 3.6e12, 1.67e-5, 1.637e-5),
])
def test_polar_law_gives_the_papers_learning_rates(model, backbone_tokens, rm_tokens, paper_lr, ours):
    """POLAR's Table: InternLM2.5 1.8B (Dp 2.5T) and 7B (Dp 4T) backbones, with the presets'
    own parameter counts."""
    shape = preset(model)
    plan = plan_run(shape, D, TrainSettings(micro_batch_size=8), tokens=rm_tokens, flops=None,
                    recipe=PolarLawRecipe(backbone_tokens=backbone_tokens))
    assert plan.lr == pytest.approx(ours, rel=1e-3)
    assert plan.lr == pytest.approx(paper_lr, rel=0.03)
    batch, _ = PolarLawRecipe(backbone_tokens=backbone_tokens).batch_and_lr(n_params(shape), shape.hidden_size,
                                                                           rm_tokens)
    assert batch <= plan.batch_size < batch + plan.gpus * 8     # the law's, rounded up to split


def test_polar_law_needs_a_pretrained_backbone():
    for dp in (None, 0.0, -1.0):
        with pytest.raises(ValueError, match=rf"recipe=polar_law needs recipe.backbone_tokens > 0, got {dp}.*"
                                             "pre-trained on Dp tokens.*randomly initialised model"):
            PolarLawRecipe(backbone_tokens=dp)


def test_big_models_need_several_gpus_and_refuse_the_laptop():
    seven = ModelConfig(name="7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=92544)
    plan = plan_run(seven, D, T, tokens=1e9, flops=None, recipe=FixedRecipe(batch_size=512))
    assert plan.gpus >= 4 and plan.gpus & (plan.gpus - 1) == 0 and plan.gpu_hours > 0
    reason = local_refusal(plan, ResourcesConfig())
    assert "hydra/launcher=slurm" in reason and "GB of memory" in reason
    assert local_refusal(plan_run(M, D, T, tokens=1e6, flops=None), ResourcesConfig()) is None


def test_a_run_on_the_cpu_plans_no_gpu():
    res = ResourcesConfig()
    plan = plan_run(M, D, TrainSettings(device="cpu"), tokens=1e6, flops=None, resources=res)
    assert (plan.gpus, plan.nodes, plan.gpu_hours, plan.parallel) == (0, 1, 0.0, "ddp") and plan.on_cpu
    assert plan.time_limit_min == cpu_minutes(plan.compute, res) and plan.memory_gb == round(cpu_memory_gb(plan), 1)
    assert not plan_run(M, D, T, tokens=1e6, flops=None).on_cpu          # device=auto plans for GPUs


def test_several_gpus_shard_the_model_and_split_the_batch_evenly():
    seven = ModelConfig(name="7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=92544)
    big = FixedRecipe(batch_size=512)
    plan = plan_run(seven, D, T, tokens=1e9, flops=None, recipe=big)
    assert plan.parallel == "fsdp" and plan.batch_size % plan.gpus == 0
    assert plan_run(M, D, T, tokens=1e6, flops=None).parallel == "ddp"
    roomy = ResourcesConfig(gpu_memory_gb=240)           # DDP keeps the whole training state on each GPU
    assert plan_run(seven, D, TrainSettings(parallel="ddp"), tokens=1e9, flops=None, recipe=big,
                    resources=roomy).parallel == "ddp"
    with pytest.raises(ValueError, match="on 4 GPUs \\(ddp\\) needs .* it would fit with .*train.parallel=fsdp"):
        plan_run(seven, D, TrainSettings(parallel="ddp"), tokens=1e9, flops=None, recipe=big)
    law = plan_run(seven, D, TrainSettings(micro_batch_size=3), tokens=1e9, flops=None,
                   recipe=PolarLawRecipe(backbone_tokens=2e12))
    assert law.batch_size % (law.gpus * 3) == 0          # the batch law's value, rounded up to split
    with pytest.raises(ValueError, match=f"recipe.batch_size=6 does not split over the {plan.gpus} GPUs"):
        plan_run(seven, D, T, tokens=1e9, flops=None, recipe=FixedRecipe(batch_size=6))
    with pytest.raises(ValueError, match="train.micro_batch_size=5 does not divide recipe.batch_size=512"):
        plan_run(seven, D, TrainSettings(micro_batch_size=5), tokens=1e9, flops=None, recipe=big)
    with pytest.raises(ValueError, match="train.parallel='zero' is not valid"):
        TrainSettings(parallel="zero")


def test_packing_plans_the_same_run_in_data_terms():
    """Tokens count the triplets' two full sequences (POLAR's layout), packed or not:
    packing changes speed, never steps, batch, LR, tokens or compute."""
    naive = plan_run(M, D, T, tokens=1e6, flops=None, recipe=FixedRecipe(batch_size=16))
    packed = plan_run(M, D, TrainSettings(packing=True), tokens=1e6, flops=None, recipe=FixedRecipe(batch_size=16))
    p, r = D.mean_prefix_len, D.max_response_tokens
    # the same run; only the memory of a micro-batch differs (a packed row holds the prefix once)
    assert replace(packed, gpu_memory=None) == replace(naive, gpu_memory=None)
    assert packed.tokens_per_triplet == 2 * (3 + 2 * p + 2 * r)
