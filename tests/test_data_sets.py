"""Planning a sweep's data: what synthesis units cost (sweeps.data_sets.estimate), a policy
too large for a node refused, and a budget that repeats the data more than
data.max_epochs refused with the numbers and what to change (sweeps.derive)."""

import pytest

from polar.config import DataConfig, PolicySpec, TrainSettings
from sweeps.data_sets import estimate, refusal
from sweeps.derive import passes_refusal, plan_run
from sweeps.schema import ResourcesConfig
from tests.fixtures import DEBUG_MODEL

POOL = [PolicySpec(kind="hf", name="small", path="/p/small"), PolicySpec(kind="hf", name="big", path="/p/big"),
        PolicySpec(order=1, source="pydoc")]


def test_units_cost_what_their_policies_generate():
    data = DataConfig(policies=POOL, n_train=3000, n_val=300, shard_size=1000, prefix_min=10, prefix_max=30,
                      max_response_tokens=100)
    res = ResourcesConfig(gpu_memory_gb=80, gpu_peak_flops=1e15, generation_mfu=0.1)
    small, big, ngram = estimate(data, [int(5e8), int(7e10), None], res)
    assert small.units == big.units == ngram.units == 4 + 0          # 3 train shards + 1 val shard
    assert small.requests == pytest.approx(3 * 3300 / 3)             # each row: A twice, B once, over 3 policies
    assert small.tokens == pytest.approx(small.requests * (20 + 100))
    assert small.gpus == 1 and big.gpus == 3                          # 70B in bf16 (+25%) over 72 GB per GPU
    assert small.gpu_hours == pytest.approx(2 * 5e8 * small.tokens / (1e15 * 0.1) / 3600)
    assert big.gpu_hours == pytest.approx(3 * 2 * 7e10 * big.tokens / (1e15 * 0.1) / 3600)
    assert ngram.gpus == 0 and ngram.gpu_hours == 0
    assert refusal([small, big, ngram], res) is None
    tight = ResourcesConfig(gpu_memory_gb=80, gpus_per_node=2)
    message = refusal(estimate(data, [int(5e8), int(7e10), None], tight), tight)
    assert "policy 'big' (7e+10 parameters) needs 3 GPUs" in message and "resources.gpus_per_node=2" in message


def test_a_budget_that_repeats_the_data_is_refused_with_what_to_change():
    data = DataConfig(n_train=1000, prefix_min=4, prefix_max=12, max_response_tokens=16)
    plan = plan_run(DEBUG_MODEL, data, TrainSettings(), tokens=1e6, flops=None)
    assert plan.n_triplets == 1000 and plan.passes == pytest.approx(plan.steps * plan.batch_size / 1000)
    assert plan.passes > 1
    message = passes_refusal(plan, 1.0)
    assert f"makes {plan.passes:.3g} passes over the data set's 1,000 training triplets" in message
    assert f"data.n_train to at least {plan.steps * plan.batch_size:,}" in message
    assert f"data.max_epochs={-(-plan.passes // 1):.0f}" in message
    assert passes_refusal(plan, plan.passes) is None
