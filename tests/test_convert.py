"""polar.convert: InternLM2 / POLAR checkpoints <-> our standard Llama layout.

The tests write tiny random InternLM2 checkpoints themselves. The fused wqkv is packed here
from InternLM2's published layout (modeling_internlm2.py: `rearrange(qkv, "b q (h gs d) ->
b q h gs d", gs=2 + groups)`: per key-value group, its query heads, then its key head, then
its value head), independently of the converter, and the reference forward below reads it
back the same way, in plain torch."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polar.convert import ConversionError, main, to_internlm2, to_standard

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 96, 32, 2, 4, 2, 48
HEAD_DIM, GROUPS = HIDDEN // HEADS, HEADS // KV_HEADS
PAD, END, SEP = 2, VOCAB - 1, VOCAB - 2      # InternLM2 pads with </s> (2)


def internlm2_config(kind="reward", vocab=VOCAB, bias=False, rope_scaling=None, dtype="float32", **extra) -> dict:
    arch = "InternLM2ForRewardModel" if kind == "reward" else "InternLM2ForCausalLM"
    cfg = {"architectures": [arch], "model_type": "internlm2", "attn_implementation": "eager",
           "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                        "AutoModel": f"modeling_internlm2.{arch}"},
           "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD, "hidden_act": "silu",
           "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
           "max_position_embeddings": 64, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
           "num_key_value_heads": KV_HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": rope_scaling,
           "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": dtype,
           "transformers_version": "4.41.0", "use_cache": True, "vocab_size": vocab}
    if kind == "reward":
        cfg["reward_token_id"] = END
    return cfg | extra


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """InternLM2's fused layout, row block by row block."""
    rows = []
    for h in range(KV_HEADS):
        for g in range(GROUPS):
            head = h * GROUPS + g
            rows.append(q[head * HEAD_DIM:(head + 1) * HEAD_DIM])
        rows.append(k[h * HEAD_DIM:(h + 1) * HEAD_DIM])
        rows.append(v[h * HEAD_DIM:(h + 1) * HEAD_DIM])
    return torch.cat(rows)


def internlm2_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg["torch_dtype"])

    def rnd(*shape, scale=0.3, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype)

    v, d, kv = cfg["vocab_size"], HIDDEN, KV_HEADS * HEAD_DIM
    t = {"model.tok_embeddings.weight": rnd(v, d, scale=1.0), "model.norm.weight": rnd(d, scale=0.1, offset=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "attention.wqkv.weight"] = pack_wqkv(rnd(d, d), rnd(kv, d), rnd(kv, d))
        t[p + "attention.wo.weight"] = rnd(d, d)
        if cfg["bias"]:
            t[p + "attention.wqkv.bias"] = pack_wqkv(rnd(d), rnd(kv), rnd(kv))
            t[p + "attention.wo.bias"] = rnd(d)
        t[p + "feed_forward.w1.weight"] = rnd(FFN, d)
        t[p + "feed_forward.w3.weight"] = rnd(FFN, d)
        t[p + "feed_forward.w2.weight"] = rnd(d, FFN)
        t[p + "attention_norm.weight"] = rnd(d, scale=0.1, offset=1.0)
        t[p + "ffn_norm.weight"] = rnd(d, scale=0.1, offset=1.0)
    if "InternLM2ForRewardModel" in cfg["architectures"]:
        t["v_head.weight"] = rnd(1, d)
    else:
        t["output.weight"] = rnd(v, d)
    return t


def write_checkpoint(path: Path, cfg: dict, tensors: dict, fmt: str = "safetensors", shards: int = 1) -> Path:
    """An InternLM2 checkpoint directory as the releases have it: weights (one file or shards
    with an index), config.json, and the remote-code files POLAR's serving loads."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "configuration_internlm2.py").write_text("# InternLM2's remote code (stand-in)\n")
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    ext, index_name = (".safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
        (".bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"{stem}{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}{ext}"
        part = {n: tensors[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, str(path / file), metadata={"format": "pt"})
        else:
            torch.save(part, path / file)
        weight_map |= dict.fromkeys(group, file)
    if shards > 1:
        (path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


# ------------------------------------------------------------------ the reference forward (InternLM2, plain torch)

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


def reference_hidden(t: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """Final hidden states (seq, hidden) of the InternLM2 layout for one unpadded sequence."""
    eps, n = cfg["rms_norm_eps"], len(ids)
    x = t["model.tok_embeddings.weight"][torch.tensor(ids)]
    pos = torch.arange(n, dtype=torch.float32)
    scaling = cfg.get("rope_scaling")
    if scaling and scaling["type"] == "linear":
        pos = pos / scaling["factor"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.outer(pos, inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "attention_norm.weight"], eps)
        qkv = h @ t[p + "attention.wqkv.weight"].T
        if cfg["bias"]:
            qkv = qkv + t[p + "attention.wqkv.bias"]
        qkv = qkv.view(n, KV_HEADS, GROUPS + 2, HEAD_DIM)          # "b q (h gs d) -> b q h gs d"
        q = qkv[:, :, :GROUPS].reshape(n, HEADS, HEAD_DIM)         # "b q h gs d -> b q (h gs) d"
        k, v = qkv[:, :, -2], qkv[:, :, -1]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(GROUPS, dim=1), v.repeat_interleave(GROUPS, dim=1)
        scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(HEAD_DIM)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("hst,thd->shd", attn, v).reshape(n, HIDDEN) @ t[p + "attention.wo.weight"].T
        x = x + (out + t[p + "attention.wo.bias"] if cfg["bias"] else out)
        h = _rms(x, t[p + "ffn_norm.weight"], eps)
        gate, up = h @ t[p + "feed_forward.w1.weight"].T, h @ t[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ t[p + "feed_forward.w2.weight"].T
    return _rms(x, t["model.norm.weight"], eps)


def reference_reward(t: dict, cfg: dict, ids: list[int]) -> float:
    """POLAR's score: the value head at the last token (its END token)."""
    return (reference_hidden(t, cfg, ids)[-1] @ t["v_head.weight"][0]).item()


def polar_rows(n: int, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """Sequences of different lengths ending with END, free of the pad id."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab - 2) for _ in range(rng.randrange(3, 20))] + [END] for _ in range(n)]


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return ids, (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()


# ------------------------------------------------------------------ (a) the converted model computes InternLM2's function

@pytest.mark.parametrize("bias,rope_scaling", [(False, {"type": "dynamic", "factor": 2.0}),
                                               (True, {"type": "linear", "factor": 2.0})],
                         ids=["dynamic", "bias-linear"])
def test_reward_model_scores_equal_the_internlm2_reference(tmp_path, bias, rope_scaling):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    cfg = internlm2_config(bias=bias, rope_scaling=rope_scaling)
    tensors = internlm2_tensors(cfg)
    src = write_checkpoint(tmp_path / "polar", cfg, tensors, shards=2)
    done = to_standard(src, tmp_path / "ours")
    assert done.architecture == "LlamaForSequenceClassification"

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")   # no trust_remote_code
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.num_labels == 1 and model.score.bias is None
    assert model.config.reward_token_id == END and model.config.pad_token_id == PAD
    rows = polar_rows(5)
    ids, mask = right_padded(rows)
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    expected = torch.tensor([reference_reward(tensors, cfg, r) for r in rows])
    assert expected.std() > 0.1            # the rows differ: a score read at the wrong position would show
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_base_lm_becomes_a_causal_lm_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = internlm2_config(kind="lm", rope_scaling={"type": "dynamic", "factor": 2.0})
    tensors = internlm2_tensors(cfg, seed=1)
    src = write_checkpoint(tmp_path / "internlm2.5", cfg, tensors, fmt="bin")
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 92542]}))
    assert to_standard(src, tmp_path / "backbone").architecture == "LlamaForCausalLM"

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "backbone")
    assert isinstance(model, LlamaForCausalLM)
    ids = polar_rows(1, seed=3)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = reference_hidden(tensors, cfg, ids) @ tensors["output.weight"].T
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_our_model_converted_to_internlm2_scores_the_same(tmp_path):
    """The way back, checked against the reference forward of the InternLM2 layout; q, k and v
    of a layer sit in different shards of the source."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=5e5,
                         max_position_embeddings=64, num_labels=1, pad_token_id=PAD, reward_token_id=END,
                         sep_token_id=SEP, architectures=["LlamaForSequenceClassification"])
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.9, 1.1)
    model.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 3

    done = to_internlm2(tmp_path / "ours", tmp_path / "internlm2")
    assert done.architecture == "InternLM2ForRewardModel"
    assert any("auto_map" in n for n in done.notes)            # nothing to restore them from: said so
    cfg = json.loads((tmp_path / "internlm2" / "config.json").read_text())
    assert cfg["model_type"] == "internlm2" and cfg["reward_token_id"] == END and cfg["bias"] is False
    assert cfg["rope_theta"] == 5e5 and cfg["rope_scaling"] is None
    tensors = read_tensors(tmp_path / "internlm2")
    rows = polar_rows(4, seed=5)
    ids, mask = right_padded(rows)
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    expected = torch.tensor([reference_reward(tensors, cfg, r) for r in rows])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ (b) round trip

@pytest.mark.parametrize("kind,fmt,bias", [("reward", "bin", False), ("lm", "safetensors", True)])
def test_round_trip_is_bit_identical(tmp_path, kind, fmt, bias):
    cfg = internlm2_config(kind=kind, bias=bias, dtype="bfloat16", rope_scaling={"type": "dynamic", "factor": 2.0})
    tensors = internlm2_tensors(cfg, seed=2)
    src = write_checkpoint(tmp_path / "src", cfg, tensors, fmt=fmt, shards=3)
    to_standard(src, tmp_path / "ours")
    assert len(list((tmp_path / "ours").glob("model-*-of-00003.safetensors"))) == 3
    to_internlm2(tmp_path / "ours", tmp_path / "back")

    back = read_tensors(tmp_path / "back")
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype == torch.bfloat16, name
        assert torch.equal(back[name], t), name
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_cfg.keys() == cfg.keys()
    assert back_cfg == cfg
    assert (tmp_path / "back" / "configuration_internlm2.py").is_file()   # POLAR's serving loads it


def test_way_back_without_the_kept_files_writes_internlm2_keys(tmp_path):
    import shutil

    cfg = internlm2_config(rope_scaling={"type": "dynamic", "factor": 2.0})
    src = write_checkpoint(tmp_path / "src", cfg, internlm2_tensors(cfg))
    to_standard(src, tmp_path / "ours")
    shutil.rmtree(tmp_path / "ours" / "internlm2")
    to_internlm2(tmp_path / "ours", tmp_path / "bare")
    bare = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert {k: bare[k] for k in cfg if k not in ("auto_map", "attn_implementation", "transformers_version")} == \
        {k: cfg[k] for k in cfg if k not in ("auto_map", "attn_implementation", "transformers_version")}
    # a template directory brings back what was lost
    to_internlm2(tmp_path / "ours", tmp_path / "templated", template=src)
    assert json.loads((tmp_path / "templated" / "config.json").read_text()) == cfg


# ------------------------------------------------------------------ (c) bad input

def _expect_refusal(tmp_path, src, *needles, dst_name="out", fn=to_standard):
    dst = tmp_path / dst_name
    with pytest.raises(ConversionError) as err:
        fn(src, dst)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert not dst.exists()
    assert not list(tmp_path.glob(f".{dst_name}.tmp*"))        # nothing half-written either
    return message


def test_missing_directory_and_config_are_refused(tmp_path):
    _expect_refusal(tmp_path, tmp_path / "nowhere", "nowhere", "is not a directory")
    (tmp_path / "empty").mkdir()
    _expect_refusal(tmp_path, tmp_path / "empty", "empty", "has no config.json", "internlm2")


def test_another_architecture_is_refused(tmp_path):
    cfg = internlm2_config()
    src = write_checkpoint(tmp_path / "src", cfg | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
                           internlm2_tensors(cfg))
    _expect_refusal(tmp_path, src, "src", "not an InternLM2 checkpoint", "'qwen2'", "'internlm2'")
    (src / "config.json").write_text(json.dumps(cfg | {"architectures": ["InternLM2ForSequenceClassification"]}))
    _expect_refusal(tmp_path, src, "InternLM2ForSequenceClassification", "InternLM2ForRewardModel")
    # the way back wants one of ours
    _expect_refusal(tmp_path, src, "not a standard Llama checkpoint", "LlamaForSequenceClassification",
                    fn=to_internlm2)


def test_missing_and_truncated_shards_are_refused(tmp_path):
    cfg = internlm2_config()
    tensors = internlm2_tensors(cfg)
    src = write_checkpoint(tmp_path / "sharded", cfg, tensors, shards=3)
    shard = src / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    _expect_refusal(tmp_path, src, "model-00002-of-00003.safetensors", "missing", "2 of 3 present")
    shard.write_bytes(data[: len(data) // 2])
    _expect_refusal(tmp_path, src, str(shard), "truncated")

    bins = write_checkpoint(tmp_path / "bins", cfg, tensors, fmt="bin", shards=2)
    shard = bins / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:3000])
    _expect_refusal(tmp_path, bins, str(shard), "truncated")

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    _expect_refusal(tmp_path, tmp_path / "noweights", "holds no weights", "model.safetensors")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    cfg = internlm2_config()
    tensors = internlm2_tensors(cfg)
    src = write_checkpoint(tmp_path / "deeper", cfg | {"num_hidden_layers": LAYERS + 1}, tensors)
    _expect_refusal(tmp_path, src, "missing", "model.layers.2.")
    src = write_checkpoint(tmp_path / "mha", cfg | {"num_key_value_heads": HEADS}, tensors)
    _expect_refusal(tmp_path, src, "attention.wqkv.weight", "shape", f"({(3 * HEADS) * HEAD_DIM}, {HIDDEN})")
    src = write_checkpoint(tmp_path / "lm-config", cfg | {"architectures": ["InternLM2ForCausalLM"]}, tensors)
    _expect_refusal(tmp_path, src, "v_head.weight", "output.weight")


def test_an_existing_destination_is_kept(tmp_path):
    cfg = internlm2_config()
    src = write_checkpoint(tmp_path / "src", cfg, internlm2_tensors(cfg))
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists"):
        to_standard(src, dst)
    assert (dst / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConversionError, match="inside it"):
        to_standard(src, src / "converted")


def test_cli_converts_and_refuses(tmp_path, capsys):
    cfg = internlm2_config()
    src = write_checkpoint(tmp_path / "src", cfg, internlm2_tensors(cfg))
    assert main([str(src), str(tmp_path / "ours")]) == 0
    assert "LlamaForSequenceClassification" in capsys.readouterr().out
    assert main([str(tmp_path / "ours"), str(tmp_path / "back")]) == 0          # --to auto: ours -> InternLM2
    assert "InternLM2ForRewardModel" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------ tokenizer (needs the `convert` extra)

CORPUS_WORDS = ("the policy reward model reference answer prompt compares two candidates scaling law "
                "token tokenizer training loss value head hello world internlm polar checkpoint layer").split()


def _train_sentencepiece(tmp_path: Path) -> tuple[Path, object]:
    spm = pytest.importorskip("sentencepiece", reason="the `convert` extra (sentencepiece) trains the test's model")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randrange(3, 12))) + f" {rng.randrange(1000)}."
             for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(   # as InternLM2's tokenizer: BPE, byte fallback, identity normalization
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=420, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["[UNUSED_TOKEN_0]", "[UNUSED_TOKEN_130]", "[UNUSED_TOKEN_146]"], minloglevel=2)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))


def _official_polar(tmp_path: Path):
    """A tiny official-format POLAR reward model with an InternLM2-style sentencepiece
    tokenizer: (folder, sentencepiece model path, processor, (<|reward|>, END, im_start) ids)."""
    sp_path, sp = _train_sentencepiece(tmp_path)
    vocab = sp.get_piece_size()
    reward_sep, unused_130, im_start = (sp.piece_to_id(p) for p in
                                        ("[UNUSED_TOKEN_0]", "[UNUSED_TOKEN_130]", "[UNUSED_TOKEN_146]"))
    cfg = internlm2_config(vocab=vocab) | {"reward_token_id": unused_130}
    src = write_checkpoint(tmp_path / "polar", cfg, internlm2_tensors(cfg))
    (src / "tokenizer.model").write_bytes(sp_path.read_bytes())
    renamed = {reward_sep: "<|reward|>", im_start: "<|im_start|>"}     # as InternLM2 / POLAR rename unused pieces
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "pad_token": "</s>", "padding_side": "left",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, c in renamed.items()}}))
    return src, sp_path, sp, (reward_sep, unused_130, im_start)


def test_tokenizer_loads_without_remote_code_and_keeps_polar_tokens(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src, sp_path, sp, (reward_sep, unused_130, im_start) = _official_polar(tmp_path)
    done = to_standard(src, tmp_path / "ours")
    assert done.tokens == {"<|reward|>": reward_sep, "[UNUSED_TOKEN_130]": unused_130}

    tok = AutoTokenizer.from_pretrained(tmp_path / "ours")      # no trust_remote_code
    for text in ["the reward model compares two candidates", "hello world 2025.", "two  spaces\nand a line",
                 "ünïcödé 中文 bytes"]:
        assert tok(text)["input_ids"] == [1] + sp.encode(text), text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    polar_text = "prompt\nreference<|reward|>prompt\nanswer[UNUSED_TOKEN_130]"
    ids = tok(polar_text)["input_ids"]
    assert ids[0] == 1 and ids[-1] == unused_130 and ids.count(reward_sep) == 1
    assert tok.convert_tokens_to_ids("<|im_start|>") == im_start and tok.pad_token_id == PAD
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")
    assert (model.config.reward_token_id, model.config.sep_token_id) == (unused_130, reward_sep)

    # the way back restores InternLM2's own tokenizer files beside the sentencepiece model
    to_internlm2(tmp_path / "ours", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == sp_path.read_bytes()
    back_tcfg = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert back_tcfg["tokenizer_class"] == "InternLM2Tokenizer"


def test_a_converted_official_checkpoint_scores_and_fine_tunes_through_the_job(tmp_path):
    """stage=finetune from a converted POLAR checkpoint, with the `model` preset of its shape:
    RewardScorer loads it, and the job path fine-tunes it and saves a standard model."""
    from polar.score import RewardScorer
    from sweeps.jobs import run_job
    from tests.fixtures import job_config, write_jsonl

    src, _, sp, _ = _official_polar(tmp_path)
    to_standard(src, tmp_path / "ours")
    scorer = RewardScorer(tmp_path / "ours", device="cpu")
    good, bad = scorer.score("the model compares", "two candidates", ["two candidates", "hello world"])
    assert good != bad
    records = [{"prompt": f"question {i}", "reference": f"answer {i}", "chosen": f"answer {i}",
                "rejected": "hello world"} for i in range(24)]
    shape = [f"model.hidden_size={HIDDEN}", f"model.num_layers={LAYERS}", f"model.num_heads={HEADS}",
             f"model.num_kv_heads={KV_HEADS}", f"model.intermediate_size={FFN}",
             f"model.vocab_size={sp.get_piece_size()}", "model.name=polar-tiny"]
    job = job_config("stage=finetune", "tracking=off", "train.threads=1", "train.n_evals=1",
                     "recipe.batch_size=8", f"finetune.init_from={tmp_path / 'ours'}",
                     f"finetune.train_path={write_jsonl(tmp_path / 'prefs.jsonl', records)}",
                     f"paths.runs_dir={tmp_path / 'runs'}", *shape)
    result = run_job(job)
    assert not result["skipped"] and result["val_loss"] > 0
    tuned = tmp_path / "runs" / result["run_key"] / "model"
    assert json.loads((tuned / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert len(RewardScorer(tuned, device="cpu").score("question 1", "answer 1", ["answer 1"])) == 1
