"""Preference fine-tuning data: the reference implementation's JSONL -> triplet rows -> tokens.

The reference (InternLM/POLAR README "Fine-tune"; xtuner/dataset/preference_dataset.py,
`tokenize_ref`) fine-tunes on lines

    {"prompt": [...], "reference": [...], "chosen": [...], "rejected": [...]}

(chat message lists; we also accept plain strings, as the scoring client does), optionally
with "wrapper": "sft" | "pretrain" (default sft). A ranked triple A > B > C becomes a
triplet with A the reference, B the positive and C the negative, so the trainer fits
L = -log sigmoid(r(P, A, B) - r(P, A, C)) with the same code as pre-training. Rows use
synthesis' keys (prompt, reference, positive, negative; texts already joined).

Tokens follow the reference exactly (polar.template.encode_pieces: encode, cut, decode,
join, tokenize; the prompt is cut once for both candidates, as xtuner does), split so that
layout_ids(prompt, reference, candidate) rebuilds each full sequence.

`finetune(...)` is the whole stage: load a saved model directory, read the data, train with
polar.trainer.fit (checkpoints, resume, metrics) and save the result as a model directory;
`prepare_finetune(...)` is its first half, for callers that run fit themselves.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polar.scoring import jsonl_objects, require_fields
from polar.template import SFT, WRAPPERS, Layout, as_text, encode_pieces

FIELDS = ("prompt", "reference", "chosen", "rejected")
ROW_KEYS = {"prompt": "prompt", "reference": "reference", "chosen": "positive", "rejected": "negative"}


class BadPreferenceData(ValueError):
    """A preference line that cannot be used; the message names the file, line and problem."""


def parse_preference(obj: Any, where: str) -> dict:
    """One preference record as a triplet row with texts (keys of polar.synthesis rows)."""
    require_fields(obj, FIELDS, where, BadPreferenceData)
    row = {}
    for field in FIELDS:
        try:
            row[ROW_KEYS[field]] = as_text(obj[field], field)
        except TypeError as err:
            raise BadPreferenceData(f"{where}: {err}") from None
    wrapper = obj.get("wrapper")
    if wrapper is not None:
        if wrapper not in WRAPPERS:
            raise BadPreferenceData(f"{where}: wrapper={wrapper!r} is not valid; choose one of {list(WRAPPERS)}")
        row["wrapper"] = wrapper
    return row


def read_preferences(path: str | Path) -> list[dict]:
    """All records of a preference JSONL file (blank lines skipped), as triplet rows."""

    rows = [parse_preference(obj, where)
            for _, where, obj in jsonl_objects(path, "preference file", BadPreferenceData)]
    if not rows:
        raise BadPreferenceData(f"{path}: holds no preference records")
    return rows


def preference_triplets(rows: Sequence[dict], tokenizer, layout: Layout = SFT):
    """TokenTriplets of rows (prompt, reference, positive, negative; optional wrapper),
    encoded exactly as xtuner's tokenize_ref."""
    from polar.data import TokenTriplets
    from polar.tokenizer import special_ids

    special = special_ids(tokenizer)
    out = TokenTriplets([], [], [], [])
    for row in rows:
        row_layout = replace(layout, wrapper=row["wrapper"]) if row.get("wrapper") else layout
        p, r, (a, b) = encode_pieces(tokenizer, row["prompt"], row["reference"],
                                     [row["positive"], row["negative"]], row_layout, special)
        out.prompt.append(p), out.reference.append(r), out.positive.append(a), out.negative.append(b)
    return out


def split_rows(rows: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split into (train, val); val gets round(n * val_fraction) rows, at least one."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(rows) < 2:
        raise ValueError(f"need at least 2 preference records to hold some out for validation, got {len(rows)}")
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in perm[n_val:]], [rows[i] for i in perm[:n_val]]


def prepare_finetune(model_dir: str | Path, train_path: str | Path, val_path: str | Path | None = None,
                     val_fraction: float = 0.1, seed: int = 0, layout: Layout = SFT,
                     device: str | None = None) -> dict:
    """What a fine-tuning run needs: the saved model (on `device`), its tokenizer and special
    ids, train and val TokenTriplets, and the training FLOPs per token of this data.
    Validation: val_path, else a seeded val_fraction of the training file."""
    import torch

    from polar.model import load_model
    from polar.tokenizer import special_ids

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(Path(model_dir)).to(device)
    tokenizer, train, val = preference_data(model_dir, train_path, val_path, val_fraction, seed, layout)
    seq_len = float(train.naive_tokens().mean()) / 2
    return {"model": model, "tokenizer": tokenizer, "special": special_ids(tokenizer), "train": train,
            "val": val, "flops_per_token": _flops_per_token(model.config, seq_len)}


def preference_data(model_dir: str | Path, train_path: str | Path, val_path: str | Path | None = None,
                    val_fraction: float = 0.1, seed: int = 0, layout: Layout = SFT):
    """(tokenizer of model_dir, train TokenTriplets, val TokenTriplets), without loading the
    model. Validation: val_path, else a seeded val_fraction of the training file."""
    from polar.scoring import _load_tokenizer

    tokenizer = _load_tokenizer(Path(model_dir))
    rows = read_preferences(train_path)
    if val_path is not None:
        train_rows, val_rows = rows, read_preferences(val_path)
    else:
        train_rows, val_rows = split_rows(rows, val_fraction, seed)
    return tokenizer, preference_triplets(train_rows, tokenizer, layout), preference_triplets(val_rows, tokenizer, layout)


def finetune(model_dir: str | Path, train_path: str | Path, out_dir: str | Path, cfg, steps: int | None = None,
             val_path: str | Path | None = None, val_fraction: float = 0.1, layout: Layout = SFT,
             sink=None, progress: bool = True, device: str | None = None):
    """Fine-tune the POLAR model saved in model_dir on preference data; returns a FitResult.

    cfg is a polar.config.TrainConfig (lr, batch size, schedule, seed, ...). steps defaults
    to one epoch (the reference trains reward models for one epoch to avoid overfitting).
    Checkpoints go to out_dir/run (an interrupted run resumes there); the final model, with
    its tokenizer, to out_dir/model, written to a temporary folder and renamed.
    """
    import torch

    from polar.sinks import NullSink
    from polar.trainer import fit

    out_dir = Path(out_dir)
    run = prepare_finetune(model_dir, train_path, val_path, val_fraction, cfg.seed, layout, device)
    steps = steps if steps is not None else max(1, math.ceil(len(run["train"]) / cfg.batch_size))
    torch.manual_seed(cfg.seed)
    result = fit(run["model"], run["train"], run["val"], run["special"], cfg, steps, run["flops_per_token"],
                 out_dir / "run", sink or NullSink(), progress=progress, desc="finetune")
    save_model_dir(run["model"], run["tokenizer"], out_dir / "model")
    return result


def save_model_dir(model, tokenizer, path: Path) -> None:
    """config.json + safetensors + tokenizer files, written beside and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _flops_per_token(config, seq_len: float) -> float:
    from polar.config import ModelConfig
    from polar.model import flops_per_token

    shape = ModelConfig(name=getattr(config, "polar_preset", "finetune"), hidden_size=config.hidden_size,
                        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                        num_kv_heads=config.num_key_value_heads, intermediate_size=config.intermediate_size,
                        vocab_size=config.vocab_size)
    return flops_per_token(shape, seq_len)
