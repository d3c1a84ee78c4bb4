"""Backbones pre-trained here (model.lm_pretrain_tokens, polar.lm_pretrain): next-token
training on the corpus lowers the loss, the backbone is cached and shared (trained once),
and a reward model starts from its weights as from any init_from checkpoint."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from polar import lm_pretrain
from polar.config import ModelConfig
from tests.fixtures import DEBUG_MODEL, tiny_data_config

TOKENS = 40 * lm_pretrain.BATCH * lm_pretrain.BLOCK          # 40 steps


def test_blocks_are_the_documents_ended_with_eos(tokenizer):
    blocks = lm_pretrain.lm_blocks(["a b c", "d e"], tokenizer, block=2)
    ids = [*tokenizer("a b c", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id,
           *tokenizer("d e", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert blocks.shape == (len(ids) // 2, 2) and blocks.ravel().tolist() == ids[:blocks.size]
    with pytest.raises(ValueError, match="fewer than one block of 128"):
        lm_pretrain.lm_blocks(["a"], tokenizer)


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="model.init_from=/m already names one"):
        ModelConfig(lm_pretrain_tokens=1e6, init_from="/m")
    with pytest.raises(ValueError, match="model.lm_pretrain_tokens must be > 0"):
        ModelConfig(lm_pretrain_tokens=-1.0)
    assert ModelConfig(lm_pretrain_tokens=1e6).backbone_tokens == 1e6      # Dp


def test_the_backbone_learns_is_cached_and_starts_the_reward_model(tokenizer, cache_dir, tmp_path, monkeypatch):
    from polar.inputs import pretrain_inputs, tokenizer_id

    torch.set_num_threads(1)
    model, data = replace(DEBUG_MODEL, lm_pretrain_tokens=TOKENS), tiny_data_config()
    folder = lm_pretrain.ensure_backbone(model, data, tokenizer, tokenizer_id(data, model), tmp_path, progress=False)
    report = __import__("json").loads((folder / "lm_pretrain.json").read_text())
    assert report["steps"] == 40 and report["final_loss"] < 0.85 * report["first_loss"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained twice")

    monkeypatch.setattr(lm_pretrain, "train_lm", no_training)
    assert lm_pretrain.ensure_backbone(replace(model, name="other name"), data, tokenizer,
                                       tokenizer_id(data, model), tmp_path) == folder     # shared: no training
    inputs = pretrain_inputs(model, data, tmp_path, seed=3)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    got = inputs.model.model.embed_tokens.weight.detach()
    assert torch.equal(got[:saved["model.embed_tokens.weight"].shape[0]], saved["model.embed_tokens.weight"])
    assert np.isfinite(inputs.model.score.weight.detach().numpy()).all()


def test_the_plan_counts_the_lm_pretraining_in_its_time_but_not_in_its_axes():
    from polar.config import DataConfig, TrainSettings
    from polar.model import preset_counts
    from sweeps.derive import cpu_minutes, lm_pretrain_flops, plan_run
    from sweeps.schema import ResourcesConfig

    data, train, res = DataConfig(n_train=10**6), TrainSettings(device="cpu"), ResourcesConfig()
    plain = plan_run(DEBUG_MODEL, data, train, tokens=1e9, flops=None, resources=res)
    lm = replace(DEBUG_MODEL, lm_pretrain_tokens=5e9)
    pre = plan_run(lm, data, train, tokens=1e9, flops=None, resources=res)
    assert (pre.tokens, pre.compute, pre.steps) == (plain.tokens, plain.compute, plain.steps)
    counts = preset_counts(lm)
    extra = lm_pretrain_flops(lm, counts)
    assert extra == pytest.approx(5e9 * (counts.flops_per_token(lm_pretrain.BLOCK)
                                         + 6 * lm.vocab_size * lm.hidden_size))
    assert pre.time_limit_min == cpu_minutes(plain.compute + extra, res) > plain.time_limit_min
    assert lm_pretrain_flops(DEBUG_MODEL, counts) == 0.0
