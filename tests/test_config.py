"""Validation of the science's configs: bad values fail with messages that name them."""

import pytest

from polar.config import DataConfig, ModelConfig, PolicySpec, TrainConfig


def test_model_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="hidden_size=100 must be divisible by model.num_heads=3"):
        ModelConfig(hidden_size=100, num_heads=3, num_kv_heads=3)


def test_model_rejects_non_positive_size():
    with pytest.raises(ValueError, match=r"model.num_layers must be > 0, got 0"):
        ModelConfig(num_layers=0)


def test_pool_needs_two_policies():
    with pytest.raises(ValueError, match="at least two"):
        DataConfig(policies=[PolicySpec(order=1)])


def test_unknown_corpus_source_lists_valid_ones():
    with pytest.raises(ValueError, match=r"data.corpus='poems'.*\['stdlib', 'pydoc', 'kjv'\]"):
        DataConfig(corpus=["poems"])


def test_policy_kind_and_top_p_are_checked():
    with pytest.raises(ValueError, match="policy.kind='gpt'"):
        PolicySpec(kind="gpt")
    with pytest.raises(ValueError, match="top_p must be in"):
        PolicySpec(top_p=1.5)


def test_train_schedule_and_accumulation():
    with pytest.raises(ValueError, match="train.schedule='step'"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match=r"train.checkpoint_every_min must be >= 0 \(0: at evaluations only\), got -1"):
        TrainConfig(checkpoint_every_min=-1)
    with pytest.raises(ValueError, match="micro_batch_size=5 must be 0 or divide"):
        TrainConfig(batch_size=32, micro_batch_size=5)


def test_default_pool_names_are_unique_and_valid():
    cfg = DataConfig()
    assert len(cfg.policies) == 18
    assert len({p.name for p in cfg.policies}) == 18
