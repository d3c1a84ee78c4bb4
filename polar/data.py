"""Datasets and collation: triplets of text -> token ids -> model batches.

A triplet (prompt P, reference R, positive A2, negative B1) becomes two sequences in
POLAR's layout, P R <|reward|> P A2 END and P R <|reward|> P B1 END. The naive collation
pads them into one (2B, T) batch: rows [0, B) hold the positives, rows [B, 2B) the
negatives, and `score_index` points at each END token. That naive path is the reference;
the shared-prefix packed collation, which computes the common prefix once, lives in
polar.packing (its attention masks make it more than collation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from polar.template import Layout, layout_ids, truncate_pieces


@dataclass
class TokenTriplets:
    """Token ids of n triplets, already truncated."""

    prompt: list[list[int]]
    reference: list[list[int]]
    positive: list[list[int]]
    negative: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt)

    def subset(self, index) -> "TokenTriplets":
        return TokenTriplets(*[[getattr(self, f)[i] for i in index]
                               for f in ("prompt", "reference", "positive", "negative")])

    def naive_tokens(self) -> np.ndarray:
        """Tokens the naive path processes per triplet (two full sequences)."""
        p, r = np.array([len(x) for x in self.prompt]), np.array([len(x) for x in self.reference])
        a, b = np.array([len(x) for x in self.positive]), np.array([len(x) for x in self.negative])
        return 2 * (3 + 2 * p + r) + a + b

    def packed_tokens(self) -> np.ndarray:
        """Tokens the shared-prefix packed path processes per triplet (polar.packing):
        the prefix BOS P R <|reward|> P once, then each candidate with its END."""
        p, r = np.array([len(x) for x in self.prompt]), np.array([len(x) for x in self.reference])
        a, b = np.array([len(x) for x in self.positive]), np.array([len(x) for x in self.negative])
        return 2 + 2 * p + r + (a + 1) + (b + 1)


def tokenize_triplets(rows: list[dict], tokenizer, layout: Layout = Layout()) -> TokenTriplets:
    """Encode each piece separately (as the reference does), then truncate. Pre-training
    data use the "pretrain" wrapper (a plain continuation, no "\n"); sft-wrapped
    preference data go through polar.finetune.preference_triplets instead."""
    if layout.wrapper != "pretrain":
        raise ValueError(f"tokenize_triplets builds pre-training triplets (wrapper 'pretrain'), got "
                         f"wrapper={layout.wrapper!r}; encode sft-wrapped data with "
                         "polar.finetune.preference_triplets")

    def enc(field):
        return tokenizer([r[field] for r in rows], add_special_tokens=False)["input_ids"]

    prompt, ref, pos, neg = enc("prompt"), enc("reference"), enc("positive"), enc("negative")
    out = TokenTriplets([], [], [], [])
    for p, r, a, b in zip(prompt, ref, pos, neg):
        p1, r1, a1 = truncate_pieces(p, r, a, layout)
        p2, _, b1 = truncate_pieces(p, r, b, layout)
        out.prompt.append(p1 if len(p1) <= len(p2) else p2)   # the smaller budget, as xtuner does
        out.reference.append(r1)
        out.positive.append(a1)
        out.negative.append(b1)
    return out


def naive_batch(batch: TokenTriplets, special: dict[str, int]) -> dict[str, torch.Tensor]:
    """(2B, T) right-padded input ids, attention mask and the END positions."""
    seqs = [layout_ids(p, r, a, special) for p, r, a in zip(batch.prompt, batch.reference, batch.positive)]
    seqs += [layout_ids(p, r, b, special) for p, r, b in zip(batch.prompt, batch.reference, batch.negative)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), special["pad"], dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    score_index = torch.tensor([len(s) - 1 for s in seqs])
    return {"input_ids": ids, "attention_mask": mask, "score_index": score_index}


def batch_order(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the triplets in optimizer step `step`: epochs of seeded permutations,
    so the order depends only on (n, seed, step) and a resumed run sees the same data."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return np.array(out)
