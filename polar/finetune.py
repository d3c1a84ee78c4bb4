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

The stage itself runs through the job path like pre-training (polar.inputs.finetune_inputs,
sweeps.jobs): `python -m sweeps.run stage=finetune ...`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polar.score import jsonl_objects, require_fields
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
