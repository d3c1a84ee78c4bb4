"""Datasets and collation: triplets of text -> token ids -> model batches.

A triplet (prompt P, reference R, positive A2, negative B1) becomes two sequences in
POLAR's layout, P R <|reward|> P A2 END and P R <|reward|> P B1 END. The naive collation
pads them into one (2B, T) batch: rows [0, B) hold the positives, rows [B, 2B) the
negatives, and `score_index` points at each END token. That naive path is the reference;
the shared-prefix packed collation, which computes the common prefix once, lives in
polar.packing (its attention masks make it more than collation).

This module owns the token ids of a data set: `TokenTriplets` (Python lists: fine-tuning
data, tests) and `TokenShards`, a synthesized data set tokenized once per tokenizer into
memory-mapped files beside it (`token_shards`), which a job opens without reading them:
data_dir/tokens/{split}.ids.npy (int32, every piece concatenated), {split}.offsets.npy
(int64, 4n+1 boundaries: prompt, reference, positive, negative of each triplet, already
truncated) and {split}.json (n, the manifest's data_id, the tokenizer's identity, size and
sha256 of both files). The data set's JSONL shards are the source of truth: token files
that are missing, damaged, or of another data_id or tokenizer are written again. It also
owns the per-step sample order (`batch_order`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from polar.template import Layout, layout_ids, truncate_pieces

PIECES = ("prompt", "reference", "positive", "negative")
TOKENS = "tokens"                       # the token files' folder inside a data set
log = logging.getLogger(__name__)


def naive_counts(lengths: np.ndarray) -> np.ndarray:
    """Tokens the naive path processes per triplet (two full sequences), from the (n, 4)
    piece lengths (prompt, reference, positive, negative)."""
    p, r, a, b = (lengths[:, k].astype(np.int64) for k in range(4))
    return 2 * (3 + 2 * p + r) + a + b


def packed_counts(lengths: np.ndarray) -> np.ndarray:
    """Tokens the shared-prefix packed path processes per triplet (polar.packing): the
    prefix BOS P R <|reward|> P once, then each candidate with its END."""
    p, r, a, b = (lengths[:, k].astype(np.int64) for k in range(4))
    return 2 + 2 * p + r + (a + 1) + (b + 1)


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
        return TokenTriplets(*[[getattr(self, f)[i] for i in index] for f in PIECES])

    def lengths(self, index=None) -> np.ndarray:
        """(n, 4) piece lengths of the rows `index` (all rows when None)."""
        rows = range(len(self)) if index is None else index
        return np.array([[len(getattr(self, f)[i]) for f in PIECES] for i in rows], dtype=np.int64).reshape(-1, 4)

    def naive_tokens(self, index=None) -> np.ndarray:
        """Tokens the naive path processes per triplet (of `index`, or all)."""
        return naive_counts(self.lengths(index))

    def packed_tokens(self, index=None) -> np.ndarray:
        """Tokens the shared-prefix packed path processes per triplet (of `index`, or all)."""
        return packed_counts(self.lengths(index))


class TokenShards:
    """A split's token ids, memory-mapped (np.load mmap_mode="r"): nothing is read until
    asked for, and `subset` reads only the rows it returns. Pickles as its paths, so a
    DataLoader worker maps the same files."""

    def __init__(self, ids_path: str | Path, offsets_path: str | Path):
        self.paths = (Path(ids_path), Path(offsets_path))
        self.ids = np.load(self.paths[0], mmap_mode="r")
        self.offsets = np.load(self.paths[1], mmap_mode="r")
        if self.offsets.ndim != 1 or len(self.offsets) % 4 != 1:
            raise ValueError(f"{self.paths[1]} holds {self.offsets.shape} offsets, not 4n+1")

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["paths"])

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 4

    def _bounds(self, index) -> np.ndarray:
        """(n, 5) offsets of the rows `index`: the start of each piece and the row's end."""
        if index is None:
            return np.lib.stride_tricks.sliding_window_view(np.asarray(self.offsets), 5)[::4]
        rows = np.asarray(index, dtype=np.int64).reshape(-1)
        return np.asarray(self.offsets[4 * rows[:, None] + np.arange(5)])

    def lengths(self, index=None) -> np.ndarray:
        """(n, 4) piece lengths of the rows `index` (all rows when None), from the offsets alone."""
        return np.diff(self._bounds(index), axis=1)

    def naive_tokens(self, index=None) -> np.ndarray:
        return naive_counts(self.lengths(index))

    def packed_tokens(self, index=None) -> np.ndarray:
        return packed_counts(self.lengths(index))

    def subset(self, index) -> TokenTriplets:
        """The rows `index` as TokenTriplets, reading only their ids."""
        out = TokenTriplets([], [], [], [])
        columns = [getattr(out, f) for f in PIECES]
        for row in self._bounds(list(index)):
            for k, column in enumerate(columns):
                column.append(self.ids[row[k]:row[k + 1]].tolist())
        return out


def truncate_triplet(p: list[int], r: list[int], a: list[int], b: list[int], layout: Layout):
    """(prompt, reference, positive, negative) of one encoded triplet, truncated as the
    reference does: each sequence on its own, the prompt with the smaller budget."""
    p1, r1, a1 = truncate_pieces(p, r, a, layout)
    p2, _, b1 = truncate_pieces(p, r, b, layout)
    return (p1 if len(p1) <= len(p2) else p2), r1, a1, b1   # the smaller budget, as xtuner does


def _encode_rows(rows: list[dict], tokenizer, layout: Layout):
    """Truncated (prompt, reference, positive, negative) id lists of each row."""
    if layout.wrapper != "pretrain":
        raise ValueError(f"tokenize_triplets builds pre-training triplets (wrapper 'pretrain'), got "
                         f"wrapper={layout.wrapper!r}; encode sft-wrapped data with "
                         "polar.finetune.preference_triplets")
    enc = [tokenizer([r[f] for r in rows], add_special_tokens=False)["input_ids"] for f in PIECES]
    return [truncate_triplet(p, r, a, b, layout) for p, r, a, b in zip(*enc)]


def tokenize_triplets(rows: list[dict], tokenizer, layout: Layout = Layout()) -> TokenTriplets:
    """Encode each piece separately (as the reference does), then truncate. Pre-training
    data use the "pretrain" wrapper (a plain continuation, no "\n"); sft-wrapped
    preference data go through polar.finetune.preference_triplets instead."""
    out = TokenTriplets([], [], [], [])
    for triplet in _encode_rows(rows, tokenizer, layout):
        for f, piece in zip(PIECES, triplet):
            getattr(out, f).append(piece)
    return out


# ------------------------------------------------------------------ token shards on disk

def tokenizer_identity(tokenizer, layout: Layout = Layout()) -> str:
    """A hash of what turns text into these ids: the tokenizer's full serialisation (its
    vocabulary where it has none) and the truncation layout."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    blob = json.dumps({"class": type(tokenizer).__name__, "tokenizer": text, "layout": asdict(layout)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_paths(data_dir: str | Path, split: str) -> dict[str, Path]:
    folder = Path(data_dir) / TOKENS
    return {"ids": folder / f"{split}.ids.npy", "offsets": folder / f"{split}.offsets.npy",
            "meta": folder / f"{split}.json"}


def token_shards(data_dir: str | Path, split: str, tokenizer, layout: Layout = Layout(),
                 chunk: int = 2048) -> TokenShards:
    """The split of a synthesized data set as TokenShards, tokenized on first use (under a
    lock on data_dir/tokens/.lock, so parallel jobs tokenize once) and re-tokenized when
    its token files are missing, damaged, or not of this data set and tokenizer."""
    from polar.synthesis import read_manifest

    data_id, tok_id = read_manifest(data_dir)["data_id"], tokenizer_identity(tokenizer, layout)
    paths = token_paths(data_dir, split)
    if token_problem(paths, data_id, tok_id) is not None:
        paths["meta"].parent.mkdir(parents=True, exist_ok=True)
        with open(paths["meta"].parent / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)              # released when the file closes
            problem = token_problem(paths, data_id, tok_id)
            if problem is not None:
                if paths["meta"].exists():
                    log.warning("token files of %s (%s): %s; tokenizing again", data_dir, split, problem)
                write_token_shards(data_dir, split, tokenizer, layout, tok_id, chunk)
    return TokenShards(paths["ids"], paths["offsets"])


def token_problem(paths: dict[str, Path], data_id: str, tok_id: str) -> str | None:
    """What is wrong with a split's token files, or None when they are those its json lists
    for this data_id and tokenizer (sizes always checked, sha256 once per process)."""
    from polar.integrity import file_digest

    try:
        meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not tokenized yet"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{paths['meta']} cannot be read ({err})"
    if not isinstance(meta, dict) or meta.get("data_id") != data_id:
        return f"{paths['meta']} is for data_id {meta.get('data_id') if isinstance(meta, dict) else None}, not {data_id}"
    if meta.get("tokenizer") != tok_id:
        return f"{paths['meta']} is for tokenizer {meta.get('tokenizer')}, not {tok_id}"
    for name in ("ids", "offsets"):
        want, path = meta.get(name) or {}, paths[name]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{path} is {path.stat().st_size} bytes where {paths['meta'].name} says {want.get('size')}"
        if file_digest(path)["sha256"] != want.get("sha256"):
            return f"the sha256 of {path} is not the one {paths['meta'].name} lists (damaged)"
    return None


def _chunks(rows, size: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_token_shards(data_dir: str | Path, split: str, tokenizer, layout: Layout, tok_id: str,
                       chunk: int = 2048) -> dict:
    """Tokenize a split chunk by chunk (shards streamed line by line) into its .npy files
    and json, each written to a temporary name and renamed; the json last, so that it never
    lists files that are not there. Returns the json's content."""
    from polar.atomic import atomic_path, write_text_atomic
    from polar.integrity import file_digest
    from polar.synthesis import iter_split, read_manifest

    data_dir, paths = Path(data_dir), token_paths(data_dir, split)
    raw = paths["ids"].with_name(f".{split}.ids.raw")
    lengths = []
    with open(raw, "wb") as out:
        for rows in _chunks(iter_split(data_dir, split, use="tokenizing it"), chunk):
            triplets = _encode_rows(rows, tokenizer, layout)
            for triplet in triplets:
                for piece in triplet:
                    out.write(np.asarray(piece, dtype=np.int32).tobytes())
            lengths.append(np.array([[len(x) for x in t] for t in triplets], dtype=np.int64).reshape(-1, 4))
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [np.zeros((0, 4), np.int64)]).ravel())])
    try:
        with atomic_path(paths["ids"]) as tmp:
            _npy_from_raw(raw, tmp, int(offsets[-1]))
        with atomic_path(paths["offsets"]) as tmp, open(tmp, "wb") as f:
            np.save(f, offsets.astype(np.int64), allow_pickle=False)
    finally:
        raw.unlink(missing_ok=True)
    meta = {"n": (len(offsets) - 1) // 4, "data_id": read_manifest(data_dir)["data_id"], "tokenizer": tok_id,
            "layout": asdict(layout), "ids": file_digest(paths["ids"]), "offsets": file_digest(paths["offsets"])}
    write_text_atomic(paths["meta"], json.dumps(meta, indent=1))
    return meta


def _npy_from_raw(raw: Path, target: Path, count: int, block: int = 1 << 24) -> None:
    """An int32 .npy of the `count` ids in the raw file, copied a block at a time."""
    if count == 0:
        with open(target, "wb") as f:
            np.save(f, np.zeros(0, np.int32), allow_pickle=False)
        return
    source = np.memmap(raw, dtype=np.int32, mode="r", shape=(count,))
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.int32, shape=(count,))
    for start in range(0, count, block):
        out[start:start + block] = source[start:start + block]
    out.flush()
    del out, source


# ------------------------------------------------------------------ batches

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
