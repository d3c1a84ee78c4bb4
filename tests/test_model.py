"""The reward model: parameter and FLOP accounting, value head, HF save/load."""

import re
from pathlib import Path

import pytest
import torch

from polar.config import ModelConfig
from polar.model import build_model, flops_per_token, load_model, n_params, n_params_nonembed
from tests.fixtures import model_preset

SHAPES = [ModelConfig(name="a", hidden_size=48, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128),
          ModelConfig(name="gqa", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=176, vocab_size=300)]


@pytest.mark.parametrize("cfg", SHAPES, ids=lambda c: c.name)
def test_param_count_matches_module(cfg):
    model = build_model(cfg, reward_token_id=4)
    assert n_params(cfg) == sum(p.numel() for p in model.parameters())
    assert n_params(cfg) - n_params_nonembed(cfg) == cfg.vocab_size * cfg.hidden_size


def test_internlm_shapes_have_their_published_sizes():
    seven = ModelConfig(name="7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=92544)
    assert 7.0e9 < n_params(seven) < 7.8e9
    # 6N dominates at short context; attention adds 12*L*d*S
    assert flops_per_token(seven, 4096) - flops_per_token(seven, 0) == 12 * 32 * 4096 * 4096
    assert abs(flops_per_token(seven, 0) / (6 * n_params_nonembed(seven)) - 1) < 1e-3


PRESETS = sorted((Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))
SCALE = {"k": 1e3, "m": 1e6, "b": 1e9}
SIZE_NAME = re.compile(r"\d+(\.\d+)?[kmb]")
# presets named for their use rather than their size, with the most parameters each may have
NAMED_FOR_USE = {"debug": 1e5}     # the tests' fixture: small, so that the tests stay fast


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_has_the_size_its_name_says(path):
    """conf/model/<size>.yaml: the name is the parameter count (embeddings included) within
    25%; a preset named for its use (NAMED_FOR_USE) stays under its bound; one whose shape
    is a checkpoint's (model=pretrained) has no size of its own and demands the checkpoint."""
    cfg = model_preset(path.stem)
    assert cfg.name == path.stem
    if cfg.shape_from_checkpoint:
        assert cfg.init_from == "???"            # Hydra's mandatory value: model.init_from=DIR
        return
    if cfg.name in NAMED_FOR_USE:
        assert n_params(cfg) <= NAMED_FOR_USE[cfg.name], (cfg.name, n_params(cfg))
        return
    assert SIZE_NAME.fullmatch(cfg.name), f"{cfg.name!r} is neither a size (10k, 1.8b) nor listed in NAMED_FOR_USE"
    named = float(cfg.name[:-1]) * SCALE[cfg.name[-1]]
    assert 0.8 < n_params(cfg) / named < 1.25, (cfg.name, n_params(cfg))


def test_value_head_reads_chosen_position():
    cfg = SHAPES[0]
    model = build_model(cfg, reward_token_id=4).eval()
    ids = torch.randint(5, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        last = model(ids)
        at = model(ids, score_index=torch.tensor([8, 3]))
        prefix = model(ids[:, :4])
    assert torch.allclose(last, model(ids, score_index=torch.tensor([8, 8])))
    assert torch.allclose(at[0], last[0])
    assert torch.allclose(at[1], prefix[1], atol=1e-5)   # causal: position 3 sees only the first 4 tokens
    assert last.dtype == torch.float32 and model.score.bias is None


def test_save_and_load_roundtrip(tmp_path):
    model = build_model(SHAPES[0], reward_token_id=4).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = load_model(tmp_path / "m").eval()
    ids = torch.randint(5, 100, (1, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids), loaded(ids))
    assert loaded.config.reward_token_id == 4


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no POLAR model"):
        load_model(tmp_path / "empty")


def test_a_saved_model_is_a_standard_sequence_classifier(tokenizer, tmp_path):
    """Plain transformers (AutoModelForSequenceClassification, no POLAR code) loads a saved
    model and scores it as RewardScorer does: num_labels 1, no bias, read at the last
    non-padding token (POLAR's END)."""
    from transformers import AutoModelForSequenceClassification

    from polar.score import RewardScorer
    from polar.tokenizer import special_ids
    from tests.fixtures import save_model, seeded_model

    save_model(seeded_model(special_ids(tokenizer)), tokenizer, tmp_path / "m")
    scorer = RewardScorer(tmp_path / "m", device="cpu")
    outputs = ["Short.", "A much longer answer, with several clauses, to pad the others."]
    ours = scorer.score("What is 2 + 2?", "It is 4.", outputs)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert type(plain).__module__.startswith("transformers.") and plain.config.num_labels == 1
    assert plain.score.bias is None
    seqs = [scorer.encode("What is 2 + 2?", "It is 4.", o) for o in outputs]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [scorer.special["pad"]] * (width - len(s)) for s in seqs])   # right-padded
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=(ids != scorer.special["pad"]).long()).logits[:, 0]
    torch.testing.assert_close(theirs, torch.tensor(ours), rtol=1e-4, atol=1e-4)
    assert ours[0] != ours[1]


def test_an_unsupported_backbone_is_refused_with_the_supported_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from polar.model import load_backbone

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a supported backbone; supported: \['gpt_neox', "
                                         r"'llama', 'qwen2'\]"):
        load_backbone(tmp_path / "gpt2", {"pad": 0, "bos": 1, "sep": 2, "reward": 3}, vocab_size=64)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_backbone(tmp_path / "HuggingFaceTB/SmolLM2-135M", {}, vocab_size=64)
