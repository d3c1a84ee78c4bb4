"""The reward model: a transformers backbone plus a bias-free linear value head, saved as
a standard Hugging Face sequence-classification model.

A POLAR reward model of architecture A *is* transformers' `AForSequenceClassification`
(num_labels 1, `score` a linear head without bias, read by transformers at the last
non-padding token, which is POLAR's END token): `reward_model_class(model_type)` is that
class with one change, a forward that also reads scores at chosen positions (several per
row in a packed batch). Its class name, weights and config are the standard ones, so a
saved directory loads with plain `AutoModelForSequenceClassification.from_pretrained`
(and TRL, vLLM's reward serving, ...), and `load_model` loads it back for training.

Backbones (ARCHITECTURES): Llama (SmolLM2, Llama 3; InternLM2 through polar.convert),
Qwen2 (q/k/v biases), GPT-NeoX (Pythia). `build_model` makes a random Llama-shaped
model of a preset; `load_backbone` a pre-trained causal LM's weights (its LM head
dropped, the value head new) with POLAR's special tokens.

Also the pure accounting of a shape: `n_params`, `n_params_nonembed` and
`flops_per_token`, computed from a ModelConfig alone (tests check them against the
real module); `module_counts` counts a checkpoint's real module (built on the meta
device, no weights read). Models are saved and loaded in the Hugging Face directory
format (config.json + safetensors, the tokenizer beside them); never pickled.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from polar.config import ModelConfig

# model_type (config.json) -> the transformers class a POLAR reward model of it is
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                 "gpt_neox": "GPTNeoXForSequenceClassification"}
HF_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size")


def hf_shape(cfg: ModelConfig) -> dict[str, int]:
    """A preset's shape under transformers' config names (HF_SHAPE_KEYS): the one
    translation between the two, used to build models and to check saved ones."""
    values = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
              cfg.intermediate_size)
    return dict(zip(HF_SHAPE_KEYS, values))


def hf_config(cfg: ModelConfig, *, bos_token_id: int = 1, pad_token_id: int = 0,
              reward_token_id: int | None = None, sep_token_id: int | None = None):
    """The transformers (Llama) config of a preset; POLAR's special-token ids ride along."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **hf_shape(cfg), max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
        eos_token_id=None, attention_bias=False, mlp_bias=False, num_labels=1,
    )
    config.reward_token_id = reward_token_id
    config.sep_token_id = sep_token_id
    config.polar_preset = cfg.name
    return config


def _reward_forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids: torch.Tensor | None = None,
                    score_index: torch.Tensor | None = None, score_rows: torch.Tensor | None = None,
                    **attention_kwargs) -> torch.Tensor:
    """Rewards in float32. `score_index` (batch,) or (batch, k) picks the positions whose
    values are the scores; by default the last position of each row. With `score_rows`
    (n,), the scores are read at (score_rows[i], score_index[i]): several per row, as in a
    packed batch.

    attention_mask: a (batch, seq) padding mask, or a 4D mask that transformers uses as
    given (a (batch, 1, seq, seq) boolean/additive tensor, or a FlexAttention BlockMask):
    that is how polar.packing passes its shared-prefix mask, with `attention_kwargs` for
    its attention function (causal_prefix for polar_sdpa)."""
    hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, **attention_kwargs).last_hidden_state
    # .sum(-1) over the head's single output (not squeeze/[:, 0]) returns a new tensor,
    # not a view: FSDP2 cannot hook the backward of a view returned by a sharded module
    if score_rows is not None:
        return self.score(hidden[score_rows, score_index]).float().sum(-1)
    if score_index is None:
        return self.score(hidden[:, -1]).float().sum(-1)
    values = self.score(hidden).float().sum(-1)
    index = score_index if score_index.dim() == 2 else score_index[:, None]
    picked = values.gather(1, index)
    return picked if score_index.dim() == 2 else picked.sum(-1)


@functools.cache
def reward_model_class(model_type: str) -> type:
    """transformers' sequence-classification class of `model_type`, with POLAR's forward;
    same name, so that save_pretrained records the standard architecture."""
    import transformers

    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not a supported backbone; supported: "
                         f"{sorted(ARCHITECTURES)} (InternLM2: convert it first with python -m polar.convert)")
    base = getattr(transformers, ARCHITECTURES[model_type])
    return type(base.__name__, (base,), {"forward": _reward_forward, "__module__": __name__,
                                         "__doc__": f"{base.__name__} reading POLAR rewards at chosen positions."})


def build_model(cfg: ModelConfig, attn_implementation: str = "polar_sdpa", **token_ids: int | None):
    """A randomly initialised model; attention "polar_sdpa" (SDPA, faster on packed
    batches; polar.packing), "sdpa", "flex_attention" (CUDA, packed path) or "eager"."""
    from polar.packing import register_attention

    register_attention()
    config = hf_config(cfg, **token_ids)
    config._attn_implementation = attn_implementation
    return reward_model_class("llama")(config)


def set_attention(model, attn_implementation: str):
    """Switch a built model's attention implementation in place (e.g. to flex_attention
    before packed training on CUDA); returns the model."""
    from polar.packing import register_attention

    register_attention()
    model.set_attn_implementation(attn_implementation)
    return model


def read_hf_config(path: str | Path, what: str) -> dict:
    """A model directory's config.json, with errors that name the directory and `what` it
    should be (never a hub id: the path must be a local directory)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a directory (a local Hugging Face model folder; "
                                "hub ids are not fetched)")
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} holds no config.json; found "
                         f"{sorted(p.name for p in path.iterdir())}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r}: config.json is not valid JSON ({err})") from None


def check_backbone(path: str | Path, preset: ModelConfig | None = None) -> None:
    """Refuse, naming the folder and what would be valid, a model.init_from that is not a
    local causal LM of a supported architecture with its tokenizer; with `preset`, one
    whose shape differs from the preset's."""
    path = Path(path)
    config = read_hf_config(path, "model.init_from")
    reward_model_class(config.get("model_type"))         # raises for an unsupported architecture
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise ValueError(f"model.init_from {str(path)!r} is not a causal LM: its architectures are "
                         f"{config.get('architectures')} (a backbone is a ...ForCausalLM checkpoint)")
    if not _has_weights(path):
        raise ValueError(f"model.init_from {str(path)!r} holds no weights (*.safetensors or *.bin); found "
                         f"{sorted(p.name for p in path.iterdir())}")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"model.init_from {str(path)!r} holds no tokenizer (tokenizer.json, tokenizer_config.json "
                         "or tokenizer.model): a backbone trains with its own tokenizer")
    if preset is not None:
        saved, want = checkpoint_shape(path), hf_shape(preset)
        differ = {k: (saved[k], v) for k, v in want.items() if saved[k] != v}
        if differ:
            raise ValueError(f"model.init_from {str(path)!r} does not have the shape of model={preset.name!r}: "
                             + ", ".join(f"{k} {a} (checkpoint) != {b} (preset)" for k, (a, b) in differ.items())
                             + "; use model=pretrained model.init_from=DIR to take the checkpoint's own shape")


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def load_model(path: str | Path):
    """Load a saved POLAR reward model directory (ours, or a converted official one)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").exists() or not _has_weights(path):
        raise ValueError(f"{str(path)!r} holds no POLAR model: expected config.json and "
                         f"*.safetensors, found {sorted(p.name for p in path.iterdir())}")
    config = read_hf_config(path, "model directory")
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise ValueError(f"{str(path)!r} is not a POLAR reward model: its architectures are "
                         f"{config.get('architectures')}, expected a ...ForSequenceClassification (a causal LM "
                         "is a backbone: model.init_from=DIR)")
    return reward_model_class(config.get("model_type")).from_pretrained(path)


def load_backbone(path: str | Path, special: dict[str, int], vocab_size: int, attn_implementation: str = "polar_sdpa"):
    """A pre-trained causal LM's weights as a reward model: the LM head dropped, a new value
    head (normal, std = the config's initializer_range, as transformers initialises it),
    POLAR's special-token ids in the config, and the embedding resized to `vocab_size` (the
    tokenizer's length, after polar.tokenizer added POLAR's tokens): new rows are drawn
    from the old rows' mean and covariance (transformers' mean_resizing)."""
    from polar.packing import register_attention

    config = read_hf_config(path, "model.init_from")
    register_attention()
    model = reward_model_class(config.get("model_type")).from_pretrained(
        Path(path), num_labels=1, pad_token_id=special["pad"], attn_implementation=attn_implementation)
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    model.config.reward_token_id, model.config.sep_token_id = special["reward"], special["sep"]
    model.config.bos_token_id, model.config.pad_token_id = special["bos"], special["pad"]
    return model


# ---------------------------------------------------------------- pure accounting

def n_params(cfg: ModelConfig) -> int:
    """All parameters, embeddings included (the backbone has no LM head)."""
    return cfg.vocab_size * cfg.hidden_size + n_params_nonembed(cfg)


def n_params_nonembed(cfg: ModelConfig) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    attention = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2   # q, o ; k, v
    mlp = 3 * d * cfg.intermediate_size                                        # gate, up, down
    norms = 2 * d
    return cfg.num_layers * (attention + mlp + norms) + d + d                 # final norm, v_head


def flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """Training FLOPs per token, forward plus backward (PaLM's convention, appendix B):
    6 x (matmul parameters) + 12 x layers x hidden x seq_len for attention scores and
    values over the full (not causally halved) context. Embedding lookups and norms are
    not counted."""
    d, hd = cfg.hidden_size, cfg.head_dim
    matmul = cfg.num_layers * (d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
                               + 3 * d * cfg.intermediate_size) + d
    return 6.0 * matmul + 12.0 * cfg.num_layers * d * seq_len


@dataclass(frozen=True)
class ShapeCounts:
    """What planning needs of a model's shape: parameter counts and the FLOPs convention's
    inputs (matmul_params: the parameters a token meets in matrix multiplies, the 6N)."""

    n_params: int
    n_params_nonembed: int
    matmul_params: int
    num_layers: int
    hidden_size: int

    def flops_per_token(self, seq_len: float) -> float:
        """As flops_per_token: 6 x matmul parameters + 12 x layers x hidden x seq_len."""
        return 6.0 * self.matmul_params + 12.0 * self.num_layers * self.hidden_size * seq_len


def preset_counts(cfg: ModelConfig) -> ShapeCounts:
    """The counts of a Llama-shaped preset, from its shape alone."""
    matmul = round(flops_per_token(cfg, 0.0) / 6)
    return ShapeCounts(n_params(cfg), n_params_nonembed(cfg), matmul, cfg.num_layers, cfg.hidden_size)


def checkpoint_counts(path: str | Path, vocab_size: int = 0) -> ShapeCounts:
    """The counts of a checkpoint's reward model (its backbone and a value head), from the
    real module built on the meta device: any supported architecture's biases, MLP and
    norms are counted as they are; no weights are read. vocab_size: the tokenizer's length
    with POLAR's tokens, where it outgrows the embedding (load_backbone resizes it)."""
    import transformers

    config = read_hf_config(path, "model.init_from")
    config["vocab_size"] = max(config.get("vocab_size", 0), vocab_size)
    cls = reward_model_class(config.get("model_type"))
    hf = transformers.AutoConfig.for_model(**{**config, "num_labels": 1})
    with torch.device("meta"):
        model = cls(hf)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return ShapeCounts(total, total - embed, matmul, hf.num_hidden_layers, hf.hidden_size)


def checkpoint_shape(path: str | Path) -> dict[str, int]:
    """A checkpoint's shape under HF_SHAPE_KEYS (GPT-NeoX has no separate KV heads: its
    num_key_value_heads is its num_attention_heads)."""
    config = read_hf_config(path, "model.init_from")
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    return {k: config.get(k) for k in HF_SHAPE_KEYS}
