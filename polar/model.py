"""The reward model: a transformers Llama backbone plus a bias-free linear value head.

Also the pure accounting of a shape: `n_params`, `n_params_nonembed` and
`flops_per_token`, computed from a ModelConfig alone (tests check them against the
real module). Models are saved and loaded in the Hugging Face directory format
(config.json + model.safetensors, the tokenizer beside them); never pickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel

from polar.config import ModelConfig

HF_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size")


def hf_shape(cfg: ModelConfig) -> dict[str, int]:
    """A preset's shape under transformers' config names (HF_SHAPE_KEYS): the one
    translation between the two, used to build models and to check saved ones."""
    values = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
              cfg.intermediate_size)
    return dict(zip(HF_SHAPE_KEYS, values))


def hf_config(cfg: ModelConfig, *, bos_token_id: int = 1, pad_token_id: int = 0,
              reward_token_id: int | None = None, sep_token_id: int | None = None) -> LlamaConfig:
    """The transformers config of a shape; POLAR's special-token ids ride along."""
    config = LlamaConfig(
        **hf_shape(cfg), max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
        eos_token_id=None, attention_bias=False, mlp_bias=False,
    )
    config.reward_token_id = reward_token_id
    config.sep_token_id = sep_token_id
    config.polar_preset = cfg.name
    config.architectures = ["PolarRewardModel"]
    return config


class PolarRewardModel(LlamaPreTrainedModel):
    """r(prompt, reference, candidate): the value head read at a chosen position."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask=None,
                position_ids: torch.Tensor | None = None,
                score_index: torch.Tensor | None = None,
                score_rows: torch.Tensor | None = None, **attention_kwargs) -> torch.Tensor:
        """Rewards in float32. `score_index` (batch,) or (batch, k) picks the positions
        whose values are the scores; by default the last position of each row. With
        `score_rows` (n,), the scores are read at (score_rows[i], score_index[i]): several
        per row, as in a packed batch.

        attention_mask: a (batch, seq) padding mask, or a 4D mask that transformers uses
        as given (a (batch, 1, seq, seq) boolean/additive tensor, or a FlexAttention
        BlockMask): that is how polar.packing passes its shared-prefix mask, with
        `attention_kwargs` for its attention function (causal_prefix for polar_sdpa)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False, **attention_kwargs).last_hidden_state
        # .sum(-1) over the head's single output (not squeeze/[:, 0]) returns a new tensor,
        # not a view: FSDP2 cannot hook the backward of a view returned by a sharded module
        if score_rows is not None:
            return self.v_head(hidden[score_rows, score_index]).float().sum(-1)
        if score_index is None:
            return self.v_head(hidden[:, -1]).float().sum(-1)
        values = self.v_head(hidden).float().sum(-1)
        index = score_index if score_index.dim() == 2 else score_index[:, None]
        picked = values.gather(1, index)
        return picked if score_index.dim() == 2 else picked.sum(-1)


def build_model(cfg: ModelConfig, attn_implementation: str = "polar_sdpa", **token_ids: int | None) -> PolarRewardModel:
    """A randomly initialised model; attention "polar_sdpa" (SDPA, faster on packed
    batches; polar.packing), "sdpa", "flex_attention" (CUDA, packed path) or "eager"."""
    from polar.packing import register_attention

    register_attention()
    config = hf_config(cfg, **token_ids)
    config._attn_implementation = attn_implementation
    return PolarRewardModel(config)


def set_attention(model: PolarRewardModel, attn_implementation: str) -> PolarRewardModel:
    """Switch a built model's attention implementation in place (e.g. to flex_attention
    before packed training on CUDA); returns the model."""
    from polar.packing import register_attention

    register_attention()
    model.set_attn_implementation(attn_implementation)
    return model


def load_model(path: str | Path) -> PolarRewardModel:
    """Load a saved POLAR model directory, with a clear error when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        raise ValueError(f"{str(path)!r} holds no POLAR model: expected config.json and "
                         f"*.safetensors, found {sorted(p.name for p in path.iterdir())}")
    model = PolarRewardModel.from_pretrained(path)
    if getattr(model.config, "reward_token_id", None) is None:
        raise ValueError(f"{str(path)!r} is not a POLAR reward model: its config has no reward_token_id")
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
