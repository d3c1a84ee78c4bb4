"""What one training run consumes: `RunInputs`, built by one function per stage.

- `pretrain_inputs`: the tokenizer (a pre-trained backbone's own; else a small BPE trained
  offline, or a tokenizer directory), the synthesized data set (cached by content; its
  hash is the data_id), its token ids (polar.data.TokenShards: tokenized once per data set
  and tokenizer, memory-mapped, never held as lists), and the model: the backbone's weights with a
  new value head (a checkpoint, or one pre-trained here on the corpus: polar.lm_pretrain),
  or a randomly initialised model of the preset's shape.
- `finetune_inputs`: a saved POLAR model directory, its own tokenizer, and the
  reference implementation's preference JSONL as token triplets (data_id: a hash of the
  files' contents).

The job (sweeps.jobs) does the same with either: plan, track, build inputs, fit, save.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polar.config import DataConfig, ModelConfig
from polar.data import TokenShards, TokenTriplets
from polar.template import Layout


@dataclass
class RunInputs:
    model: Any                      # a polar.model reward model (a ...ForSequenceClassification) on the CPU, or None
    tokenizer: Any
    special: dict[str, int]         # bos, sep, reward, pad ids (polar.tokenizer.special_ids)
    train: TokenShards | TokenTriplets     # pre-training: memory-mapped; fine-tuning: lists
    val: TokenShards | TokenTriplets
    data_id: str


# ---------------------------------------------------------------- pre-training

def tokenizer_id(data: DataConfig, model: ModelConfig) -> str:
    """The identity of the tokenizer a data set's prefixes are cut with (part of its
    cache key), without loading it: a backbone's folder, the small BPE's settings, or the
    tokenizer folder."""
    if model.init_from:
        return f"backbone:{Path(model.init_from).resolve()}"
    if data.tokenizer == "bpe":
        return f"bpe-{data.vocab_size}-{'-'.join(data.source_names)}"
    return str(Path(data.tokenizer).resolve())


def data_tokenizer(data: DataConfig, model: ModelConfig, cache_dir: str | Path):
    """(tokenizer, its identity for the data set's cache key): a pre-trained backbone's own
    (with POLAR's tokens), else the data config's (a small BPE, or a tokenizer folder)."""
    from polar.tokenizer import backbone_tokenizer, cached_bpe, load_tokenizer

    if model.init_from:
        tok = backbone_tokenizer(model.init_from)
    elif data.tokenizer == "bpe":
        tok = cached_bpe(data.corpus, data.vocab_size, Path(cache_dir))
    else:
        tok = load_tokenizer(data.tokenizer)
    return tok, tokenizer_id(data, model)


def data_dir(data: DataConfig, model: ModelConfig, cache_dir: str | Path) -> Path:
    """Where the data set of `data`, cut with the job's tokenizer, lives (synthesized or not)."""
    from polar.synthesis import config_key

    return Path(cache_dir) / "data" / config_key(data, tokenizer_id(data, model))


def synthesized_data(data: DataConfig, model: ModelConfig, cache_dir: str | Path):
    """(tokenizer, data folder, manifest) of a data config, synthesized when not cached yet."""
    from polar.synthesis import synthesize

    tok, _ = data_tokenizer(data, model, cache_dir)
    if not model.init_from and len(tok) > model.vocab_size:   # a backbone's embedding grows to its tokenizer
        raise ValueError(f"the tokenizer has {len(tok)} tokens but model.vocab_size={model.vocab_size}; "
                         "use a model preset with a vocabulary at least as large")
    where = data_dir(data, model, cache_dir)
    return tok, where, synthesize(data, tok, where)   # reads the manifest when the data set exists


def pretrain_inputs(model: ModelConfig, data: DataConfig, cache_dir: str | Path, seed: int,
                    with_model: bool = True) -> RunInputs:
    """The run's inputs; with_model=False leaves the model out (None): an FSDP rank that
    receives its shards from rank 0."""
    import torch

    from polar.data import token_shards
    from polar.model import build_model, load_backbone
    from polar.tokenizer import special_ids

    tok, data_dir, manifest = synthesized_data(data, model, cache_dir)
    special = special_ids(tok)
    torch.manual_seed(seed)                       # the value head of a backbone too
    if not with_model:
        net = None
    elif model.init_from:
        net = load_backbone(model.init_from, special, vocab_size=len(tok))
    elif model.lm_pretrain_tokens:
        from polar.lm_pretrain import ensure_backbone

        backbone = ensure_backbone(model, data, tok, tokenizer_id(data, model), cache_dir)
        torch.manual_seed(seed)
        net = load_backbone(backbone, special, vocab_size=len(tok))
    else:
        net = build_model(model, bos_token_id=special["bos"], pad_token_id=special["pad"],
                          reward_token_id=special["reward"], sep_token_id=special["sep"])
    return RunInputs(net, tok, special, token_shards(data_dir, "train", tok), token_shards(data_dir, "val", tok),
                     manifest["data_id"])


# ---------------------------------------------------------------- fine-tuning

@functools.lru_cache(maxsize=8)
def preference_data_id(*paths: str | Path | None) -> str:
    """Content hash of the preference files (None entries skipped); hashed once per
    process (the run key and the inputs both need it)."""
    h = hashlib.sha256()
    for path in paths:
        if path is not None:
            try:
                h.update(Path(path).read_bytes())
            except OSError as err:
                raise ValueError(f"cannot read preference file {str(path)!r}: {err.strerror}") from None
    return h.hexdigest()[:16]


def finetune_data(model_dir: str | Path, train_path: str | Path, val_path: str | Path | None,
                  val_fraction: float, seed: int, layout: Layout):
    """(tokenizer of model_dir, train TokenTriplets, val TokenTriplets), without loading the
    model. Validation: val_path, else a seeded val_fraction of the training file."""
    from polar.finetune import preference_triplets, read_preferences, split_rows
    from polar.tokenizer import model_tokenizer

    tokenizer = model_tokenizer(Path(model_dir))
    rows = read_preferences(train_path)
    if val_path is not None:
        train_rows, val_rows = rows, read_preferences(val_path)
    else:
        train_rows, val_rows = split_rows(rows, val_fraction, seed)
    return tokenizer, preference_triplets(train_rows, tokenizer, layout), preference_triplets(val_rows, tokenizer, layout)


def finetune_inputs(model_dir: str | Path, tokenizer, train: TokenTriplets, val: TokenTriplets,
                    data_id: str, with_model: bool = True) -> RunInputs:
    """A fine-tuning run's inputs from finetune_data's result and the starting model (left
    out with with_model=False)."""
    from polar.model import load_model
    from polar.tokenizer import special_ids

    return RunInputs(load_model(Path(model_dir)) if with_model else None, tokenizer, special_ids(tokenizer), train,
                     val, data_id)
