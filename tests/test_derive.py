"""sweeps/derive.py: pure planning of a run from preset + budget."""

import pytest

from polar.config import DataConfig, ModelConfig, TrainConfig
from polar.model import flops_per_token
from sweeps.derive import ResourcesConfig, local_refusal, plan_run, sequence_lengths

M = ModelConfig(name="1m")
D = DataConfig(prefix_min=4, prefix_max=12, response_len=16)


def test_tokens_and_flops_budgets_agree():
    by_tokens = plan_run(M, D, TrainConfig(batch_size=16), tokens=1e6, flops=None)
    by_flops = plan_run(M, D, TrainConfig(batch_size=16), tokens=None, flops=by_tokens.compute)
    assert by_flops.tokens == pytest.approx(1e6)
    assert by_tokens.steps == by_flops.steps == int(1e6 // (16 * sequence_lengths(D)[1]))
    assert by_tokens.flops_per_token == flops_per_token(M, sequence_lengths(D)[0])


def test_budget_errors():
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_run(M, D, TrainConfig(), tokens=None, flops=None)
    with pytest.raises(ValueError, match="budget too small for one optimizer step of model '1m'"):
        plan_run(M, D, TrainConfig(batch_size=32), tokens=100, flops=None)


def test_width_scaled_lr():
    plan = plan_run(M, D, TrainConfig(lr=3e-3, lr_width_ref=64), tokens=1e6, flops=None)
    assert plan.lr == pytest.approx(3e-3 * 64 / M.hidden_size)


def test_big_models_need_several_gpus_and_refuse_the_laptop():
    seven = ModelConfig(name="7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=92544)
    plan = plan_run(seven, D, TrainConfig(batch_size=512), tokens=1e9, flops=None)
    assert plan.gpus >= 4 and plan.gpus & (plan.gpus - 1) == 0 and plan.gpu_hours > 0
    reason = local_refusal(plan, ResourcesConfig())
    assert "hydra/launcher=slurm" in reason and "GB of memory" in reason
    assert local_refusal(plan_run(M, D, TrainConfig(), tokens=1e6, flops=None), ResourcesConfig()) is None


def test_several_gpus_shard_the_model_and_split_the_batch_evenly():
    seven = ModelConfig(name="7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=92544)
    plan = plan_run(seven, D, TrainConfig(batch_size=512), tokens=1e9, flops=None)
    assert plan.parallel == "fsdp" and plan.batch_size % plan.gpus == 0
    assert plan_run(M, D, TrainConfig(), tokens=1e6, flops=None).parallel == "ddp"
    assert plan_run(seven, D, TrainConfig(batch_size=512, parallel="ddp"), tokens=1e9, flops=None).parallel == "ddp"
    law = plan_run(seven, D, TrainConfig(backbone_tokens=2e12), tokens=1e9, flops=None, recipe="polar_law",
                   backbone_tokens=2e12)
    assert law.batch_size % law.gpus == 0                 # the batch law's value, rounded up to a multiple
    with pytest.raises(ValueError, match=f"train.batch_size=6 does not split over the {plan.gpus} GPUs"):
        plan_run(seven, D, TrainConfig(batch_size=6), tokens=1e9, flops=None)
    with pytest.raises(ValueError, match="train.parallel='zero' is not valid"):
        TrainConfig(parallel="zero")


def test_packing_plans_fewer_tokens_per_triplet():
    naive = plan_run(M, D, TrainConfig(batch_size=16), tokens=1e6, flops=None)
    packed = plan_run(M, D, TrainConfig(batch_size=16, packing=True), tokens=1e6, flops=None)
    p, r = D.mean_prefix_len, D.response_len
    assert packed.tokens_per_triplet == 2 + 2 * p + r + 2 * (r + 1)
    assert packed.steps > naive.steps and packed.compute == naive.compute
