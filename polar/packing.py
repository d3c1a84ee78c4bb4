"""Shared-prefix packing: one row segment per triplet instead of two full sequences.

The two sequences of a triplet, BOS P R <|reward|> P A END and BOS P R <|reward|> P B END,
share the prefix BOS P R <|reward|> P. Packing lays out each triplet once,

    [ prefix | A END | B END ]

with position ids 0..n-1 over the prefix and, for each candidate, positions that
continue from the end of the prefix (so B's positions restart where A's started), and
an attention rule that lets a token see an earlier token of the same triplet only if
that token is in the prefix or in its own candidate. Several triplets share a row
(balanced, up to a row capacity), so little compute goes to padding. The
scores are read at each candidate's END token.

This module owns the layout (`pack_triplets` -> `PackedBatch`), the attention rule in
one place (`allowed`), its two renderings (a dense 4D mask for SDPA/eager on the CPU, a
FlexAttention BlockMask on CUDA that never materialises the mask), the CPU attention
"polar_sdpa" (SDPA that computes the causal block every row starts with without a mask,
skipping its upper triangle, and only the rest against the dense mask; plain SDPA for
unpacked batches), which attention suits a device (`attention_for`) and the packed
forward pass (`packed_rewards`). Rewards, loss and gradients equal the naive
two-sequence path (`polar.data.naive_batch`) within float32 tolerance
(tests/test_packing.py).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, fields, replace

import torch

from polar.template import layout_ids

PREFIX, POSITIVE, NEGATIVE = 0, 1, 2    # values of PackedBatch.part
PAD_DOC = -1                            # PackedBatch.doc of padding tokens


@dataclass
class PackedBatch:
    """R rows of width L holding B triplets.

    input_ids, position_ids, doc (triplet slot in its row; PAD_DOC for padding) and part
    (PREFIX / POSITIVE / NEGATIVE; padding counts as PREFIX of the PAD_DOC document, so a
    padding token attends causally to the padding before it and no attention row is
    empty) are (R, L). score_rows / score_cols (2B,) locate the END tokens: the B
    positives first, then the B negatives, in the triplets' order (as naive_batch).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc: torch.Tensor
    part: torch.Tensor
    score_rows: torch.Tensor
    score_cols: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Tokens of the triplets, padding excluded."""
        return int((self.doc != PAD_DOC).sum())

    @property
    def n_slots(self) -> int:
        """Tokens the model processes: rows x width, padding included."""
        return self.input_ids.numel()

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def padded_to(self, multiple: int, pad_id: int) -> "PackedBatch":
        """The same batch with rows widened to a multiple of `multiple` (FlexAttention's
        block size); the new tokens are padding."""
        extra = -self.input_ids.shape[1] % multiple
        if not extra:
            return self

        def widen(t, value):
            return torch.nn.functional.pad(t, (0, extra), value=value)

        return replace(self, input_ids=widen(self.input_ids, pad_id), position_ids=widen(self.position_ids, 0),
                       doc=widen(self.doc, PAD_DOC), part=widen(self.part, PREFIX))


# ---------------------------------------------------------------- layout

def triplet_pieces(prompt, reference, positive, negative, special) -> tuple[list[int], list[int], list[int]]:
    """(prefix, positive + END, negative + END) of one triplet: the naive sequence of the
    positive (polar.template.layout_ids, as naive_batch builds it) split before the
    candidate, so both paths share one definition of the layout."""
    sequence = layout_ids(prompt, reference, positive, special)
    prefix = sequence[: len(sequence) - len(positive) - 1]
    return prefix, sequence[len(prefix):], list(negative) + [special["reward"]]


def balanced_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows (lists of item indices) for items of these lengths: the fewest rows whose
    fill stays within `capacity` (raised to the longest item), each filled longest item
    first into the emptiest row. Rows end up evenly filled, and since every row is as
    wide as the fullest one, even fills mean little padding."""
    capacity = max(capacity, max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n_rows = -(-sum(lengths) // capacity)
    while True:
        rows, fills = _emptiest_first(order, lengths, n_rows)
        if max(fills) <= capacity:
            return [row for row in rows if row]
        n_rows += 1       # terminates: with one row per item every fill is within capacity


def _emptiest_first(order: list[int], lengths: list[int], n_rows: int) -> tuple[list[list[int]], list[int]]:
    heap = [(0, r) for r in range(n_rows)]
    rows = [[] for _ in range(n_rows)]
    for i in order:
        fill, r = heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (fill + lengths[i], r))
    fills = [0] * n_rows
    for fill, r in heap:
        fills[r] = fill
    return rows, fills


def pack_triplets(batch, special: dict[str, int], max_len: int | None = None) -> PackedBatch:
    """Pack a TokenTriplets batch into rows of at most max(max_len, longest triplet)
    tokens (`balanced_rows`). The default, rows as wide as the longest triplet, suits
    the dense masks of the CPU path, whose attention cost grows with the row width;
    FlexAttention skips masked blocks, so on CUDA wide rows (thousands of tokens) cost
    nothing extra and leave less padding."""
    pieces = [triplet_pieces(p, r, a, b, special)
              for p, r, a, b in zip(batch.prompt, batch.reference, batch.positive, batch.negative)]
    lengths = [sum(len(x) for x in piece) for piece in pieces]
    rows = balanced_rows(lengths, max_len or 0)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), special["pad"], dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    doc = torch.full((len(rows), width), PAD_DOC, dtype=torch.long)
    part = torch.full((len(rows), width), PREFIX, dtype=torch.long)
    ends = torch.zeros((2, len(pieces), 2), dtype=torch.long)        # (pos/neg, triplet, row/col)
    for r, row in enumerate(rows):
        offset = 0
        for slot, t in enumerate(row):
            ends[:, t] = _place(pieces[t], r, offset, slot, ids, pos, doc, part)
            offset += lengths[t]
    return PackedBatch(ids, pos, doc, part, ends[:, :, 0].reshape(-1), ends[:, :, 1].reshape(-1))


def _place(piece, row, offset, slot, ids, pos, doc, part) -> torch.Tensor:
    """Write one triplet at `offset` of `row`; returns [[row, col of A's END], [row, col of B's END]]."""
    prefix, positive, negative = piece
    n = len(prefix)
    ends = []
    for kind, tokens, start in ((PREFIX, prefix, offset), (POSITIVE, positive, offset + n),
                                (NEGATIVE, negative, offset + n + len(positive))):
        span = slice(start, start + len(tokens))
        ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        pos[row, span] = torch.arange(len(tokens)) + (0 if kind == PREFIX else n)
        doc[row, span] = slot
        part[row, span] = kind
        ends.append([row, start + len(tokens) - 1])
    return torch.tensor(ends[1:])


# ---------------------------------------------------------------- attention rule

def allowed(doc: torch.Tensor, part: torch.Tensor, b, q, kv) -> torch.Tensor:
    """May query token q of row b attend to key token kv? Same triplet, not in the
    future, and the key is in the prefix or in the query's own candidate. Written with
    indexing only, so it serves as a FlexAttention mask_mod and on broadcast index grids."""
    same_doc = doc[b, q] == doc[b, kv]
    key_part = part[b, kv]
    return same_doc & (kv <= q) & ((key_part == PREFIX) | (key_part == part[b, q]))


def dense_mask(packed: PackedBatch) -> torch.Tensor:
    """(R, 1, L, L) boolean mask, True = attend: `allowed` over all index pairs (SDPA)."""
    doc, part = packed.doc, packed.part
    width = doc.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc.device).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]
    visible = (part[:, None, :] == PREFIX) | (part[:, None, :] == part[:, :, None])
    return (same_doc & visible & causal)[:, None]


def additive_mask(packed: PackedBatch, dtype=torch.float32) -> torch.Tensor:
    """dense_mask as 0 / most-negative float (eager attention adds its mask to the scores)."""
    return torch.zeros((), dtype=dtype).masked_fill(~dense_mask(packed), torch.finfo(dtype).min)


def block_mask(packed: PackedBatch):
    """FlexAttention BlockMask of `allowed`: fully masked blocks are skipped and the mask
    is never materialised. The rows should be a multiple of 128 wide (`padded_to`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc, part = packed.doc, packed.part
    rows, width = doc.shape

    def mask_mod(b, h, q, kv):
        return allowed(doc, part, b, q, kv)

    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=doc.device,
                             _compile=doc.device.type == "cuda")


FLEX_BLOCK = 128
FLEX_ROW = 8192       # row capacity under FlexAttention: wide rows, little padding, no extra attention


def causal_prefix(packed: PackedBatch) -> int:
    """Length of the causal block that every row starts with: its first triplet's
    prefix attends only to itself, so the shortest of those prefixes."""
    return int((packed.part != PREFIX).int().argmax(dim=1).min())


def split_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, causal_prefix: int = 0, **kwargs):
    """transformers attention "polar_sdpa": the first `causal_prefix` query positions of
    every row attend causally among themselves (SDPA's is_causal, no mask, the upper
    triangle skipped), the rest against the dense packed mask; without causal_prefix
    (unpacked batches), transformers' SDPA. Returns (batch, seq, heads, dim), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    p = causal_prefix
    if p <= 0 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:                              # grouped-query attention: as transformers' repeat_kv
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    head = sdpa(query[:, :, :p], key[:, :, :p], value[:, :, :p], is_causal=True, dropout_p=dropout, scale=scaling)
    tail = sdpa(query[:, :, p:], key, value, attn_mask=attention_mask[:, :, p:], dropout_p=dropout, scale=scaling)
    return torch.cat([head, tail], dim=2).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make "polar_sdpa" an attention implementation transformers knows (idempotent);
    polar.model calls it before building or switching a model to it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("polar_sdpa", split_sdpa_attention)
    AttentionMaskInterface.register("polar_sdpa", sdpa_mask)


def attention_for(device, packing: bool) -> str:
    """The attention implementation to train with: FlexAttention for packed batches on
    CUDA (masked blocks skipped, the mask never materialised), else polar_sdpa."""
    return "flex_attention" if packing and torch.device(device).type == "cuda" else "polar_sdpa"


def attention_implementation(model) -> str:
    """The transformers attention implementation of a (possibly DDP-wrapped) model."""
    return getattr(model, "module", model).config._attn_implementation


def row_capacity(model) -> int | None:
    """The row capacity to pack for this model: FLEX_ROW under FlexAttention, which
    skips masked blocks; None (the longest triplet) for dense masks, whose attention
    cost grows with the row width."""
    return FLEX_ROW if attention_implementation(model) == "flex_attention" else None


def packed_rewards(model, packed: PackedBatch, device) -> torch.Tensor:
    """Rewards (2B,) of a packed batch, positives first; the mask is rendered for the
    model's attention implementation (flex_attention: BlockMask; sdpa and polar_sdpa:
    boolean; eager: additive) and handed to transformers as a 4D mask, which it uses as given
    (transformers 5.x, masking_utils._preprocess_mask_arguments: a 4D tensor or a
    BlockMask returns early, so no causal/padding mask is re-derived and the position
    ids are not read as packed-sequence boundaries)."""
    impl = attention_implementation(model)
    if impl == "flex_attention":
        pad_id = getattr(model, "module", model).config.pad_token_id or 0
        packed = packed.padded_to(FLEX_BLOCK, pad_id).to(device)
        mask = block_mask(packed)
    else:
        packed = packed.to(device)
        mask = dense_mask(packed) if impl in ("sdpa", "polar_sdpa") else additive_mask(packed)
    extra = {"causal_prefix": causal_prefix(packed)} if impl == "polar_sdpa" else {}
    return model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                 score_index=packed.score_cols, score_rows=packed.score_rows, **extra)
