"""HFPolicy on a tiny random LlamaForCausalLM saved with the BPE tokenizer (no downloads):
batched sampling gives one continuation of max_new_tokens tokens per prefix, is seeded, and
left-padding does not change what a prefix gets."""

import pytest
import torch

from polar.config import PolicySpec
from polar.policies import HFPolicy

PREFIXES = ["import os\nimport", "def f(x):\n    return", "x", "class A:\n    def __init__(self):\n        self"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-policy") / "lm"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def policy(lm_dir, batch_size=2, **sampling) -> HFPolicy:
    p = HFPolicy(PolicySpec(kind="hf", path=str(lm_dir), **sampling), batch_size=batch_size, device="cpu")
    generated = []
    original = p.model.generate

    def spy(**kwargs):   # records how many new tokens each batch got
        ids = original(**kwargs)
        generated.append(ids.shape[1] - kwargs["input_ids"].shape[1])
        return ids

    p.model.generate, p.new_tokens = spy, generated
    return p


def test_one_continuation_of_max_new_tokens_per_prefix(lm_dir):
    p = policy(lm_dir, batch_size=3)       # batches of 3 and 1
    out = p.generate(PREFIXES, max_new_tokens=6, seed=0)
    assert len(out) == len(PREFIXES) and all(isinstance(t, str) and t for t in out)
    assert p.new_tokens == [6, 6]
    assert p.name.startswith("hf-")


def test_generation_is_seeded(lm_dir):
    p = policy(lm_dir)
    a, b = p.generate(PREFIXES, 8, seed=1), p.generate(PREFIXES, 8, seed=1)
    c = p.generate(PREFIXES, 8, seed=2)
    assert a == b and a != c


def test_left_padding_does_not_change_a_prefix_continuation(lm_dir):
    """With top_k=1 sampling is greedy, so a prefix must get the same text alone or padded in a batch."""
    batched = policy(lm_dir, batch_size=4, top_k=1).generate(PREFIXES, 5, seed=0)
    alone = [policy(lm_dir, batch_size=1, top_k=1).generate([x], 5, seed=0)[0] for x in PREFIXES]
    assert batched == alone


def test_generation_leaves_the_global_rng_alone(lm_dir):
    policy = HFPolicy(PolicySpec(kind="hf", path=str(lm_dir), name="tiny"), device="cpu")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    policy.generate(["the cat"], max_new_tokens=4, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_a_relative_path_is_read_from_the_working_directory_offline(lm_dir, monkeypatch):
    """`path: lm` is the folder lm under the working directory, loaded with no hub access."""
    monkeypatch.chdir(lm_dir.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = HFPolicy(PolicySpec(kind="hf", path="lm", name="rel"), device="cpu")
    assert len(p.generate(["x"], max_new_tokens=3, seed=0)) == 1
