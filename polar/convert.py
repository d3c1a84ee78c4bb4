"""InternLM2 / official POLAR checkpoints <-> our standard Hugging Face Llama layout.

`python -m polar.convert SRC DST` turns an InternLM2-format directory (POLAR-1.8B(-Base),
POLAR-7B(-Base): `InternLM2ForRewardModel`; InternLM2.5 base LMs: `InternLM2ForCausalLM`)
into a directory that plain transformers loads without trust_remote_code:

    InternLM2ForRewardModel -> LlamaForSequenceClassification (num_labels 1, `score` without
                               bias, read at the last non-padding token: POLAR's END token)
    InternLM2ForCausalLM    -> LlamaForCausalLM (a backbone for the 1.8b / 7b presets)

and `--to internlm2` turns such a directory (or one of ours: LlamaForSequenceClassification,
LlamaForCausalLM, PolarRewardModel) back into the InternLM2 layout that POLAR's own serving
expects (lmdeploy, sglang, vLLM). A round trip gives bit-identical tensors and the same
config keys. InternLM2 is Llama with other names and one fused projection:

    model.tok_embeddings                  <-> model.embed_tokens
    layers.i.attention.wqkv               <-> layers.i.self_attn.q_proj / k_proj / v_proj
    layers.i.attention.wo                 <-> layers.i.self_attn.o_proj
    layers.i.feed_forward.w1 / w3 / w2    <-> layers.i.mlp.gate_proj / up_proj / down_proj
    layers.i.attention_norm / ffn_norm    <-> layers.i.input_layernorm / post_attention_layernorm
    model.norm                            <-> model.norm
    output                                <-> lm_head
    v_head (Linear(hidden, 1, bias=False)) <-> score

wqkv (InternLM2's modeling code: rearrange "b q (h gs d) -> b q h gs d", gs = groups + 2)
holds, for each of the num_key_value_heads groups in turn, the group's `groups =
num_attention_heads / num_key_value_heads` query heads, then its key head, then its value
head, each head_dim rows. Query head j = kv_head * groups + g, which is Llama's own grouping
(query head j attends with kv head j // groups), so the split is a reshape and a slice, and
rope needs no permutation (both use rotate_half). The rope settings carry over: rope_theta,
and rope_scaling {"type": "linear" | "dynamic", "factor"} (the same formulas in transformers;
dynamic NTK only acts past max_position_embeddings).

The sentencepiece tokenizer.model becomes a tokenizer.json built exactly as InternLM2's own
fast tokenizer builds it (its InternLM2Converter: BPE with byte fallback, the pieces renamed by
tokenizer_config.json's added_tokens_decoder, a "▁" prepended by the normalizer), saved as a
plain PreTrainedTokenizerFast; POLAR's `<|reward|>` and `[UNUSED_TOKEN_130]` keep their ids
(92397 and 92527 in POLAR's vocabulary). Reading tokenizer.model needs protobuf (extra
`convert`). The source's own non-weight files (config, tokenizer config, remote code) are
kept under DST/internlm2/, so that the way back restores them for POLAR's serving.

Inputs: safetensors or `.bin` (read with weights_only=True), single or sharded with an index.
Tensors keep their dtype; each source shard becomes one output shard (memory stays at about
one shard). A bad input (not InternLM2, no config, missing or truncated shards, tensors of the
wrong shape) raises ConversionError naming the path and what was expected; DST is written to
a temporary sibling and renamed at the end (polar.atomic), so a failure writes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from polar.atomic import atomic_path

SEP_TOKEN, REWARD_TOKEN = "<|reward|>", "[UNUSED_TOKEN_130]"   # as in polar.tokenizer
ORIGIN_DIR = "internlm2"        # DST/internlm2/: the InternLM2 source's own non-weight files
INTERNLM2_ARCHS = {"InternLM2ForCausalLM": "lm", "InternLM2ForRewardModel": "reward"}
STANDARD_ARCHS = {"LlamaForCausalLM": "lm", "LlamaForSequenceClassification": "reward",
                  "PolarRewardModel": "reward"}
TARGETS = ("standard", "internlm2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")   # a buffer old .bin checkpoints carry: recomputed
ORIGIN_MAX_BYTES = 16 << 20
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# per layer: InternLM2 name <-> Llama name (wqkv is split / fused apart)
LAYER_NAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
               "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
               "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
QKV = ("q_proj", "k_proj", "v_proj")
SHARED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range",
               "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "use_cache", "pretraining_tp")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the path and what was expected."""


# ------------------------------------------------------------------ the shape and the names

@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    bias: bool          # attention projections with biases (InternLM2 `bias`, Llama `attention_bias`)
    tied: bool          # tie_word_embeddings: no separate output / lm_head tensor
    kind: str           # "reward" or "lm"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def _shape(cfg: dict, kind: str, bias_key: str, where: Path) -> Shape:
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise ConversionError(f"{str(where)!r}: config.json lacks integer {missing}")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["hidden_size"] % heads or heads % kv:
        raise ConversionError(f"{str(where)!r}: hidden_size {cfg['hidden_size']}, num_attention_heads {heads} and "
                              f"num_key_value_heads {kv} must divide evenly (InternLM2's head_dim = hidden/heads)")
    return Shape(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], heads, kv,
                 cfg["intermediate_size"], bool(cfg.get(bias_key, False)), bool(cfg.get("tie_word_embeddings", False)),
                 kind)


def internlm2_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor of an InternLM2 checkpoint of this shape."""
    d, hd = s.hidden, s.head_dim
    out = {"model.tok_embeddings.weight": (s.vocab, d), "model.norm.weight": (d,)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out |= {p + "attention.wqkv.weight": ((s.heads + 2 * s.kv_heads) * hd, d),
                p + "attention.wo.weight": (d, s.heads * hd),
                p + "feed_forward.w1.weight": (s.intermediate, d), p + "feed_forward.w3.weight": (s.intermediate, d),
                p + "feed_forward.w2.weight": (d, s.intermediate),
                p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)}
        if s.bias:
            out |= {p + "attention.wqkv.bias": ((s.heads + 2 * s.kv_heads) * hd,), p + "attention.wo.bias": (d,)}
    if s.kind == "reward":
        out["v_head.weight"] = (1, d)
    elif not s.tied:
        out["output.weight"] = (s.vocab, d)
    return out


def standard_shapes(s: Shape, head: str = "score") -> dict[str, tuple[int, ...]]:
    """Every tensor of our standard (Llama) layout of this shape; `head` names the value head."""
    d, hd = s.hidden, s.head_dim
    out = {"model.embed_tokens.weight": (s.vocab, d), "model.norm.weight": (d,)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (s.heads * hd, d), p + "self_attn.k_proj.weight": (s.kv_heads * hd, d),
                p + "self_attn.v_proj.weight": (s.kv_heads * hd, d), p + "self_attn.o_proj.weight": (d, s.heads * hd),
                p + "mlp.gate_proj.weight": (s.intermediate, d), p + "mlp.up_proj.weight": (s.intermediate, d),
                p + "mlp.down_proj.weight": (d, s.intermediate),
                p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if s.bias:
            out |= {p + "self_attn.q_proj.bias": (s.heads * hd,), p + "self_attn.k_proj.bias": (s.kv_heads * hd,),
                    p + "self_attn.v_proj.bias": (s.kv_heads * hd,), p + "self_attn.o_proj.bias": (d,)}
    if s.kind == "reward":
        out[f"{head}.weight"] = (1, d)
    elif not s.tied:
        out["lm_head.weight"] = (s.vocab, d)
    return out


def split_wqkv(wqkv: torch.Tensor, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused wqkv (weight or bias) -> Llama's q, k, v: per kv group, the group's
    query heads, then its key head, then its value head."""
    rest = wqkv.shape[1:]
    grouped = wqkv.reshape(s.kv_heads, s.groups + 2, s.head_dim, *rest)
    q = grouped[:, :s.groups].reshape(s.heads * s.head_dim, *rest)
    k = grouped[:, s.groups].reshape(s.kv_heads * s.head_dim, *rest)
    v = grouped[:, s.groups + 1].reshape(s.kv_heads * s.head_dim, *rest)
    return q.clone(), k.clone(), v.clone()


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    """The inverse of split_wqkv."""
    rest = q.shape[1:]
    q = q.reshape(s.kv_heads, s.groups, s.head_dim, *rest)
    k = k.reshape(s.kv_heads, 1, s.head_dim, *rest)
    v = v.reshape(s.kv_heads, 1, s.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape((s.heads + 2 * s.kv_heads) * s.head_dim, *rest).contiguous()


def _layer_name(name: str) -> tuple[str, str, str, str]:
    """A layer tensor's name as (layer index, "model.layers.N." prefix, module path, weight or bias)."""
    layer, rest = LAYER.fullmatch(name).groups()
    base, kind = rest.rsplit(".", 1)
    return layer, f"model.layers.{layer}.", base, kind


def _to_standard_step(s: Shape) -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    top = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight", "v_head.weight": "score.weight"}

    def step(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name in top:
            return [(top[name], t)]
        layer, p, base, kind = _layer_name(name)
        if base == "attention.wqkv":
            return [(f"{p}self_attn.{n}.{kind}", x) for n, x in zip(QKV, split_wqkv(t, s))]
        return [(f"{p}{LAYER_NAMES[base]}.{kind}", t)]

    return step


def _to_internlm2_step(s: Shape, head: str):
    """The reverse step; q, k and v of a layer may sit in different shards: they wait in
    `pending` until all three have come."""
    top = {"model.embed_tokens.weight": "model.tok_embeddings.weight", "model.norm.weight": "model.norm.weight",
           "lm_head.weight": "output.weight", f"{head}.weight": "v_head.weight"}
    back = {v: k for k, v in LAYER_NAMES.items()}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def step(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name in top:
            return [(top[name], t)]
        layer, p, base, kind = _layer_name(name)
        if base.startswith("self_attn.") and base[len("self_attn."):] in QKV:
            parts = pending.setdefault((layer, kind), {})
            parts[base[len("self_attn."):]] = t
            if len(parts) < 3:
                return []
            del pending[(layer, kind)]
            return [(f"{p}attention.wqkv.{kind}", fuse_wqkv(*(parts[n] for n in QKV), s))]
        return [(f"{p}{back[base]}.{kind}", t)]

    step.pending = pending
    return step


# ------------------------------------------------------------------ reading checkpoints

def _read_config(src: Path) -> dict:
    if not src.is_dir():
        raise ConversionError(f"{str(src)!r} is not a directory: expected a Hugging Face checkpoint directory "
                              "(config.json, weights, tokenizer)")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{str(src)!r} has no config.json: expected an InternLM2 checkpoint (config.json with "
                              f"model_type 'internlm2' and architectures {sorted(INTERNLM2_ARCHS)}) or one of ours "
                              f"({sorted(STANDARD_ARCHS)})")
    return _read_json(src / "config.json")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{str(path)!r} is not valid JSON: {exc}") from exc


def weight_files(src: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight shards of a checkpoint directory and, when sharded, its index's weight map.
    Safetensors are preferred over .bin when both are present (as transformers does)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = _read_json(index)["weight_map"]
            except (KeyError, TypeError) as exc:
                raise ConversionError(f"{str(index)!r} is not a shard index (a JSON object with a weight_map): "
                                      f"{exc!r}") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise ConversionError(f"{str(src)!r}: shard(s) {missing} named by {index_name} are missing "
                                      f"({len(names) - len(missing)} of {len(names)} present)")
            return [src / n for n in names], weight_map
        if (src / single).is_file():
            return [src / single], None
    found = sorted(p.name for p in src.iterdir())
    raise ConversionError(f"{str(src)!r} holds no weights: expected model.safetensors, pytorch_model.bin or a "
                          f"sharded index (model.safetensors.index.json / pytorch_model.bin.index.json); found {found}")


def _shard_keys(shard: Path) -> list[str] | None:
    """The tensor names of a safetensors shard from its header (None for .bin: known only once loaded)."""
    if shard.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(shard), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:   # safetensors raises its own error types for a torn header
        raise ConversionError(f"shard {str(shard)!r} is unreadable (truncated or corrupt?): {exc}") from exc


def load_shard(shard: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard; a .bin is read with weights_only=True (never unpickles code)."""
    try:
        if shard.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(shard))
        try:
            return torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(str(shard), map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except Exception as exc:
        raise ConversionError(f"shard {str(shard)!r} is unreadable (truncated or corrupt?): {exc}") from exc


def _check_keys(src: Path, found: Iterable[str], expected: dict[str, tuple], what: str) -> None:
    found = {k for k in found if not IGNORED_KEYS.fullmatch(k)}
    missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:4]})")
        raise ConversionError(f"{str(src)!r}: the tensors do not match {what}: {'; '.join(parts)} "
                              "(a missing or truncated shard, or another architecture)")


def _check_shape(src: Path, name: str, t: torch.Tensor, expected: dict[str, tuple]) -> None:
    if name not in expected:
        raise ConversionError(f"{str(src)!r}: unexpected tensor {name} (not part of this config's layout)")
    if tuple(t.shape) != expected[name]:
        raise ConversionError(f"{str(src)!r}: tensor {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                              "from config.json")


# ------------------------------------------------------------------ writing

def _own(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared or strided ones)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _convert_tensors(src: Path, dst: Path, shards: list[Path], weight_map: dict[str, str] | None,
                     step, source_shapes: dict[str, tuple], target_shapes: dict[str, tuple], what: str) -> int:
    """Stream the shards through `step`, one output shard per input shard; returns the parameter count."""
    from safetensors.torch import save_file

    if weight_map is not None:
        _check_keys(src, weight_map, source_shapes, what)
    elif (keys := _shard_keys(shards[0])) is not None:
        _check_keys(src, keys, source_shapes, what)
    written, parts, n_params = {}, [], 0
    for shard in shards:
        tensors = load_shard(shard)
        promised = {k for k, v in (weight_map or {}).items() if v == shard.name}
        if weight_map is not None and not promised <= set(tensors):
            raise ConversionError(f"shard {str(shard)!r} lacks {sorted(promised - set(tensors))[:4]} that the index "
                                  "promises (truncated or from another checkpoint?)")
        if weight_map is None:
            _check_keys(src, tensors, source_shapes, what)
        out = {}
        for name, t in tensors.items():
            if IGNORED_KEYS.fullmatch(name):
                continue
            _check_shape(src, name, t, source_shapes)
            for new_name, new_t in step(name, t):
                out[new_name] = new_t
        del tensors
        if out:
            part = dst / f".part{len(parts)}.safetensors"
            save_file(_own(out), str(part), metadata={"format": "pt"})
            parts.append((part, sorted(out)))
            written |= {k: tuple(v.shape) for k, v in out.items()}
            n_params += sum(v.numel() for v in out.values())
    if getattr(step, "pending", None):
        raise ConversionError(f"{str(src)!r}: layer(s) {sorted({k[0] for k in step.pending})} lack some of "
                              "q_proj / k_proj / v_proj")
    if written != target_shapes:   # a bug here, not bad input: refuse rather than write a wrong model
        raise AssertionError(f"converted tensors differ from the target layout: {sorted(set(written) ^ set(target_shapes))[:4]}")
    _name_shards(dst, parts)
    return n_params


def _name_shards(dst: Path, parts: list[tuple[Path, list[str]]]) -> None:
    if len(parts) == 1:
        parts[0][0].rename(dst / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (part, names) in enumerate(parts, 1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.rename(dst / final)
        weight_map |= dict.fromkeys(names, final)
        total += (dst / final).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _prepare_dst(src: Path, dst: Path, overwrite: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise ConversionError(f"destination {str(dst)!r} is the source or inside it: choose another directory")
    if dst.exists() and not overwrite:
        raise ConversionError(f"destination {str(dst)!r} already exists: choose a new directory or pass --overwrite")


# ------------------------------------------------------------------ tokenizer

def _sp_proto(path: Path):
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    except ImportError as exc:
        raise ConversionError(f"reading {str(path)!r} needs protobuf: pip install 'polar-scaling[convert]'") from exc
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise ConversionError(f"{str(path)!r} is not a sentencepiece model: {exc}") from exc
    if not proto.pieces:
        raise ConversionError(f"{str(path)!r} is not a sentencepiece model: it has no pieces")
    return proto


def _bpe_merges(vocab: dict[str, int], scores: list[float], mergeable: set[int]) -> list[tuple[str, str]]:
    """The merges of a sentencepiece BPE: every split of a piece into two pieces, the piece's
    score first (higher earlier), then the pieces' ids, as transformers' extractor orders them."""
    merges = []
    for piece, i in vocab.items():
        if i not in mergeable:
            continue
        local = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
        merges += [(scores[i], vocab[a], vocab[b], a, b) for a, b in local]
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for _, _, _, a, b in merges]


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def build_tokenizer(src: Path):
    """src/tokenizer.model (+ tokenizer_config.json, added_tokens.json) as a PreTrainedTokenizerFast
    that tokenizes as InternLM2TokenizerFast does, without its remote code."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    path = src / "tokenizer.model"
    proto = _sp_proto(path)
    if proto.trainer_spec.model_type != 2:
        raise ConversionError(f"{str(path)!r} is a sentencepiece model of type {proto.trainer_spec.model_type}, "
                              "expected BPE (2), as InternLM2's tokenizer is")
    tcfg = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    names, added = _pieces(src, proto, tcfg)
    vocab = {}
    for i, name in enumerate(names):
        vocab.setdefault(name, i)
    normal = {i for i, p in enumerate(proto.pieces) if p.type == 1 and i not in added}
    model = BPE(vocab, _bpe_merges(vocab, [p.score for p in proto.pieces], normal), unk_token="<unk>",
                fuse_unk=True, byte_fallback=bool(proto.trainer_spec.byte_fallback))
    tok = Tokenizer(model)
    norm = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    for token in (SEP_TOKEN, REWARD_TOKEN):                  # POLAR's two tokens are special where they exist
        if token in vocab:
            added[vocab[token]] = AddedToken(token, normalized=False, special=True)
    for i in sorted(added):
        tok.add_tokens([added[i]])
        if tok.token_to_id(added[i].content) != i:
            raise ConversionError(f"{str(src)!r}: added token {added[i].content!r} should have id {i} but the "
                                  f"vocabulary gives it {tok.token_to_id(added[i].content)}")
    tok.post_processor = _bos_eos(tcfg)
    extra = {k: tcfg[k] for k in ("chat_template", "model_max_length") if k in tcfg}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token=_token_content(tcfg.get("pad_token")) or "</s>",
        additional_special_tokens=[t for t in (SEP_TOKEN, REWARD_TOKEN) if t in vocab],
        padding_side=tcfg.get("padding_side", "left"), clean_up_tokenization_spaces=False, **extra)


def _pieces(src: Path, proto, tcfg: dict):
    """(piece names by id, added tokens by id): control and user-defined pieces match
    whole; tokens declared in tokenizer_config.json / added_tokens.json rename their piece
    (keeping its id) or follow the pieces without a gap."""
    from tokenizers import AddedToken

    names = [p.piece for p in proto.pieces]
    names[:3] = ["<unk>", "<s>", "</s>"][:len(names)]        # InternLM2Converter.vocab
    added: dict[int, AddedToken] = {}
    for i, p in enumerate(proto.pieces):                     # control and user-defined pieces match whole
        if p.type in (3, 4) and i >= 3:
            added[i] = AddedToken(names[i], normalized=False, special=p.type == 3)
    declared = {int(i): v for i, v in tcfg.get("added_tokens_decoder", {}).items()}
    if (src / "added_tokens.json").is_file():
        declared |= {i: {"content": t} for t, i in _read_json(src / "added_tokens.json").items()
                     if i not in declared}
    for i, v in sorted(declared.items()):
        v = v if isinstance(v, dict) else {"content": v}
        flags = {k: v[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special") if k in v}
        added[i] = AddedToken(v["content"], **{"normalized": False, "special": True, **flags})
        if i < len(names):
            names[i] = v["content"]                          # a renamed piece keeps its id
    beyond = sorted(i for i in added if i >= len(names))
    if beyond and beyond != list(range(len(names), len(names) + len(beyond))):
        raise ConversionError(f"{str(src)!r}: added tokens at ids {beyond} leave gaps after the "
                              f"{len(names)} sentencepiece pieces")
    return names, added


def _bos_eos(tcfg: dict):
    """The post-processor: BOS (and EOS where the tokenizer config adds it) around a text."""
    from tokenizers import processors

    add_bos, add_eos = tcfg.get("add_bos_token", True), tcfg.get("add_eos_token", False)
    single = " ".join((["<s>:0"] if add_bos else []) + ["$A:0"] + (["</s>:0"] if add_eos else []))
    pair = single + " " + " ".join((["<s>:1"] if add_bos else []) + ["$B:1"] + (["</s>:1"] if add_eos else []))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[("<s>", 1), ("</s>", 2)])


def token_ids(tok) -> dict[str, int]:
    vocab = tok.get_vocab()
    return {t: vocab[t] for t in (SEP_TOKEN, REWARD_TOKEN) if t in vocab}


# ------------------------------------------------------------------ configs

def _kind(cfg: dict, archs: dict[str, str], src: Path, expected: str) -> str:
    found = [a for a in cfg.get("architectures") or [] if a in archs]
    if not found:
        raise ConversionError(f"{str(src)!r} is not {expected}: config.json has model_type "
                              f"{cfg.get('model_type')!r} and architectures {cfg.get('architectures')}; expected "
                              f"one of {sorted(archs)}")
    return archs[found[0]]


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """rope_theta and the scaling of a config, in transformers 4 (rope_theta, rope_scaling)
    or 5 (rope_parameters) spelling."""
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    return theta, {"type": kind, "factor": scaling["factor"]}


def standard_config(cfg: dict, s: Shape, ids: dict[str, int], pad_id: int | None = None):
    """InternLM2 config.json -> the LlamaConfig of our standard layout."""
    from transformers import LlamaConfig

    theta, scaling = _rope(cfg)
    if scaling and scaling["type"] not in ("linear", "dynamic"):
        raise ConversionError(f"rope_scaling type {scaling['type']!r} is not InternLM2's (linear or dynamic)")
    kwargs = {k: cfg[k] for k in SHARED_KEYS if k in cfg}
    if kwargs.get("pad_token_id") is None and pad_id is not None:
        kwargs["pad_token_id"] = pad_id    # LlamaForSequenceClassification finds the last token by it
    kwargs |= dict(num_key_value_heads=s.kv_heads, head_dim=s.head_dim, attention_bias=s.bias, mlp_bias=False,
                   rope_theta=theta, rope_scaling=scaling)
    if cfg.get("torch_dtype"):
        kwargs["torch_dtype"] = cfg["torch_dtype"]
    if s.kind == "reward":
        kwargs |= dict(architectures=["LlamaForSequenceClassification"], num_labels=1,
                       reward_token_id=cfg.get("reward_token_id", ids.get(REWARD_TOKEN)),
                       sep_token_id=ids.get(SEP_TOKEN, cfg.get("sep_token_id")))
        if kwargs["reward_token_id"] is not None and ids.get(REWARD_TOKEN) not in (None, kwargs["reward_token_id"]):
            raise ConversionError(f"config.json's reward_token_id {kwargs['reward_token_id']} is not the tokenizer's "
                                  f"{REWARD_TOKEN} ({ids[REWARD_TOKEN]}): the score would be read at another token")
    else:
        kwargs["architectures"] = ["LlamaForCausalLM"]
    return LlamaConfig(**kwargs)


def internlm2_config(cfg: dict, s: Shape, base: dict | None) -> dict:
    """Our config.json -> InternLM2's, over `base` (the source's own InternLM2 config when we
    kept it, so that keys such as auto_map come back)."""
    theta, scaling = _rope(cfg)
    if scaling and scaling["type"] not in ("linear", "dynamic"):
        raise ConversionError(f"rope_scaling type {scaling['type']!r} has no InternLM2 equivalent (linear, dynamic)")
    out = dict(base or {})
    out |= {k: cfg[k] for k in SHARED_KEYS if k in cfg}
    out |= {"architectures": ["InternLM2ForRewardModel" if s.kind == "reward" else "InternLM2ForCausalLM"],
            "model_type": "internlm2", "bias": s.bias, "num_key_value_heads": s.kv_heads,
            "rope_theta": theta, "rope_scaling": scaling}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if dtype:
        out["torch_dtype"] = dtype
    if s.kind == "reward" and cfg.get("reward_token_id") is not None:
        out["reward_token_id"] = cfg["reward_token_id"]
    if s.kind == "reward" and base is None and cfg.get("sep_token_id") is not None:
        out["sep_token_id"] = cfg["sep_token_id"]     # ours, kept for the way back; InternLM2 ignores it
    return out


# ------------------------------------------------------------------ the two directions

@dataclass
class Converted:
    dst: Path
    architecture: str
    n_params: int
    n_shards: int
    tokens: dict[str, int]
    notes: list[str]

    def summary(self) -> str:
        toks = ", ".join(f"{t} = {i}" for t, i in self.tokens.items()) or "none of POLAR's tokens"
        lines = [f"wrote {self.architecture} ({self.n_params / 1e6:.2f}M parameters, {self.n_shards} shard(s)) "
                 f"to {self.dst}", f"tokenizer: {toks}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _count_shards(dst: Path) -> int:
    return len(list(dst.glob("model*.safetensors")))


def to_standard(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Converted:
    """An InternLM2 / POLAR checkpoint directory -> our standard Llama layout at dst."""
    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)
    if cfg.get("model_type") != "internlm2":
        raise ConversionError(f"{str(src)!r} is not an InternLM2 checkpoint: config.json has model_type "
                              f"{cfg.get('model_type')!r}, expected 'internlm2' (architectures {sorted(INTERNLM2_ARCHS)})")
    kind = _kind(cfg, INTERNLM2_ARCHS, src, "an InternLM2 checkpoint")
    s = _shape(cfg, kind, "bias", src)
    shards, weight_map = weight_files(src)
    _prepare_dst(src, dst, overwrite)
    notes = []
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        n = _convert_tensors(src, tmp, shards, weight_map, _to_standard_step(s), internlm2_shapes(s),
                             standard_shapes(s), f"an {cfg['architectures'][0]} of this config.json")
        ids, pad_id = {}, None
        if (src / "tokenizer.model").is_file():
            tok = build_tokenizer(src)
            ids, pad_id = token_ids(tok), tok.pad_token_id
            tok.save_pretrained(str(tmp))
            shutil.copy2(src / "tokenizer.model", tmp / "tokenizer.model")
        elif (src / "tokenizer.json").is_file():
            notes.append(_copy_plain_tokenizer(src, tmp))
        else:
            notes.append(f"{src} has no tokenizer (tokenizer.model or tokenizer.json): weights and config only")
        if kind == "reward" and REWARD_TOKEN not in ids and cfg.get("reward_token_id") is None:
            notes.append(f"no {REWARD_TOKEN} in the vocabulary and no reward_token_id: score with care")
        config = standard_config(cfg, s, ids, pad_id)
        config.save_pretrained(str(tmp))
        if kind == "lm" and (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        _keep_origin(src, tmp / ORIGIN_DIR)
    if not ids:   # no sentencepiece model read: the ids the config carries
        ids = {t: getattr(config, k, None) for t, k in ((REWARD_TOKEN, "reward_token_id"), (SEP_TOKEN, "sep_token_id"))}
        ids = {t: i for t, i in ids.items() if i is not None}
    return Converted(dst, config.architectures[0], n, _count_shards(dst), ids, notes)


def _copy_plain_tokenizer(src: Path, dst: Path) -> str:
    """A tokenizer.json source (no sentencepiece model): copied as it is, unless its
    tokenizer_config.json asks for remote code."""
    shutil.copy2(src / "tokenizer.json", dst / "tokenizer.json")
    tcfg = src / "tokenizer_config.json"
    if tcfg.is_file() and "auto_map" in _read_json(tcfg):
        return f"{tcfg} names remote code (auto_map): only tokenizer.json was copied"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return "copied the source's tokenizer.json as it is"


def _keep_origin(src: Path, out: Path) -> None:
    """The source's non-weight files (config, tokenizer config, remote code), for the way back."""
    out.mkdir()
    for p in sorted(src.iterdir()):
        if (p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
                and p.name != "tokenizer.model" and p.stat().st_size <= ORIGIN_MAX_BYTES):
            shutil.copy2(p, out / p.name)


def to_internlm2(src: str | Path, dst: str | Path, *, template: str | Path | None = None,
                 overwrite: bool = False) -> Converted:
    """Our standard layout (or a PolarRewardModel directory) -> InternLM2's layout at dst.
    The InternLM2 files that are not weights (config keys such as auto_map, the remote code
    that POLAR's serving loads with trust_remote_code, the tokenizer config) come from
    `template` (an InternLM2 checkpoint directory), else from SRC/internlm2/ kept by
    to_standard, else are left out (a note says so)."""
    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)
    kind = _kind(cfg, STANDARD_ARCHS, src, "a standard Llama checkpoint of ours")
    if cfg.get("mlp_bias"):
        raise ConversionError(f"{str(src)!r} has MLP biases (mlp_bias true): InternLM2's feed-forward has none")
    s = _shape(cfg, kind, "attention_bias", src)
    if cfg.get("head_dim") not in (None, s.head_dim):
        raise ConversionError(f"{str(src)!r}: head_dim {cfg['head_dim']} differs from hidden_size / "
                              f"num_attention_heads = {s.head_dim}, which InternLM2 assumes")
    head = "v_head" if "PolarRewardModel" in cfg.get("architectures", []) else "score"
    origin = Path(template) if template is not None else src / ORIGIN_DIR
    if template is not None and not (origin / "config.json").is_file():
        raise ConversionError(f"template {str(origin)!r} has no config.json: expected an InternLM2 checkpoint directory")
    base = _read_json(origin / "config.json") if (origin / "config.json").is_file() else None
    shards, weight_map = weight_files(src)
    _prepare_dst(src, dst, overwrite)
    notes = []
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        n = _convert_tensors(src, tmp, shards, weight_map, _to_internlm2_step(s, head), standard_shapes(s, head),
                             internlm2_shapes(s), f"a {cfg['architectures'][0]} of this config.json")
        if base is not None:
            for p in sorted(origin.iterdir()):
                if p.is_file() and p.name != "config.json" and not p.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(p, tmp / p.name)
        else:
            notes.append("no InternLM2 files to restore (no --template, no internlm2/ beside the weights): "
                         "config.json has no auto_map, and the tokenizer is the standard one; POLAR's serving "
                         "needs InternLM2's configuration_internlm2.py / modeling_internlm2.py copied in")
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        if (src / "tokenizer.model").is_file():
            shutil.copy2(src / "tokenizer.model", tmp / "tokenizer.model")
        elif (origin / "tokenizer.model").is_file():
            shutil.copy2(origin / "tokenizer.model", tmp / "tokenizer.model")
        out = internlm2_config(cfg, s, base)
        (tmp / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    ids = {t: cfg[k] for t, k in ((REWARD_TOKEN, "reward_token_id"), (SEP_TOKEN, "sep_token_id"))
           if cfg.get(k) is not None}
    return Converted(dst, out["architectures"][0], n, _count_shards(dst), ids, notes)


def convert(src: str | Path, dst: str | Path, to: str = "auto", **kwargs) -> Converted:
    """to: "standard" (InternLM2 -> ours), "internlm2" (ours -> InternLM2) or "auto" (from SRC's model_type)."""
    if to == "auto":
        to = "standard" if _read_config(Path(src)).get("model_type") == "internlm2" else "internlm2"
    if to not in TARGETS:
        raise ConversionError(f"--to {to!r}: expected one of {list(TARGETS)} or 'auto'")
    if to == "standard":
        kwargs.pop("template", None)
        return to_standard(src, dst, **kwargs)
    return to_internlm2(src, dst, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polar.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory to convert")
    parser.add_argument("dst", help="new directory to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--to", default="auto", choices=["auto", *TARGETS],
                        help="standard: InternLM2 -> Llama (ours); internlm2: ours -> InternLM2; auto: from SRC")
    parser.add_argument("--template", default=None,
                        help="--to internlm2: an InternLM2 checkpoint directory to take auto_map, remote code and "
                             "tokenizer config from (default: SRC/internlm2/ when present)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        done = convert(args.src, args.dst, args.to, template=args.template, overwrite=args.overwrite)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(done.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
