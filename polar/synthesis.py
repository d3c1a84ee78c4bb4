"""Synthesis: corpus prefixes -> policy trajectories -> (reference, positive, negative) triplets.

For each prefix two distinct policies A and B are drawn from the pool; A writes the
reference and the positive, B the negative. Prefixes for the validation set come from a
held-out tail of every corpus source. The output is a folder of JSONL shards with a
manifest; its content hash is the data_id. Shard i depends only on (seed, split, i), so
an interrupted synthesis resumes at the first missing shard and the same seed gives the
same data. Shards are written to a temporary name and renamed: a half-written shard is
never read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from polar.atomic import write_text_atomic
from polar.config import DataConfig

MANIFEST = "manifest.json"
FIELDS = ("prompt", "reference", "positive", "negative", "policy_a", "policy_b")


def corpus_token_ids(sources: Sequence[str], tokenizer) -> dict[str, np.ndarray]:
    from polar.corpus import load_text

    out = {}
    for source in sources:
        text = load_text(source)
        out[source] = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    return out


def split_ids(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def sample_prefixes(regions: dict[str, np.ndarray], n: int, cfg: DataConfig, rng: np.random.Generator,
                    tokenizer) -> list[str]:
    """n prefixes: a source drawn uniformly, then a random window of prefix_min..prefix_max tokens."""
    sources = sorted(regions)
    prefixes = []
    for _ in range(n):
        ids = regions[sources[rng.integers(len(sources))]]
        length = int(rng.integers(cfg.prefix_min, cfg.prefix_max + 1))
        if len(ids) <= length:
            raise ValueError(f"a corpus region has {len(ids)} tokens, shorter than the requested prefix "
                             f"length {length}; lower data.prefix_max or use a larger corpus")
        start = int(rng.integers(0, len(ids) - length))
        prefixes.append(tokenizer.decode(ids[start:start + length]))
    return prefixes


def synthesize_shard(pool, prefixes: list[str], cfg: DataConfig, rng: np.random.Generator) -> list[dict]:
    """Triplets for these prefixes; generation is batched per policy."""
    pairs = [rng.choice(len(pool), size=2, replace=False) for _ in prefixes]
    requests: dict[int, list[tuple[int, str]]] = {i: [] for i in range(len(pool))}
    for row, (a, b) in enumerate(pairs):
        requests[a] += [(row, "reference"), (row, "positive")]
        requests[b].append((row, "negative"))
    rows = [{"prompt": p, "policy_a": pool[a].name, "policy_b": pool[b].name}
            for p, (a, b) in zip(prefixes, pairs)]
    for index, wanted in requests.items():
        if not wanted:
            continue
        texts = pool[index].generate([prefixes[row] for row, _ in wanted], cfg.response_len,
                                     seed=int(rng.integers(2**31)))
        for (row, field), text in zip(wanted, texts):
            rows[row][field] = text
    return rows


def synthesize(cfg: DataConfig, tokenizer, out_dir: str | Path, progress: bool = True) -> dict:
    """Write (or finish writing) the shards and manifest of `cfg` into out_dir; return the manifest."""
    from tqdm import tqdm

    from polar.policies import build_pool

    out = Path(out_dir)
    if (out / MANIFEST).exists():
        return read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_token_ids(cfg.corpus, tokenizer)
    train_regions = {s: split_ids(ids, cfg.val_fraction)[0] for s, ids in corpus.items()}
    val_regions = {s: split_ids(ids, cfg.val_fraction)[1] for s, ids in corpus.items()}
    pool = build_pool(cfg.policies, tokenizer, train_regions)
    plan = _shard_plan(cfg)
    bar = tqdm(plan, desc=f"synthesize {out.name}", unit="shard", disable=not progress)
    for split, index, n in bar:
        path = out / f"{split}-{index:05d}.jsonl"
        if path.exists():
            continue                      # finished in an earlier, interrupted run
        rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
        regions = train_regions if split == "train" else val_regions
        rows = synthesize_shard(pool, sample_prefixes(regions, n, cfg, rng, tokenizer), cfg, rng)
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return _write_manifest(out, cfg, plan)


def _shard_plan(cfg: DataConfig) -> list[tuple[str, int, int]]:
    plan = []
    for split, total in (("train", cfg.n_train), ("val", cfg.n_val)):
        for index, start in enumerate(range(0, total, cfg.shard_size)):
            plan.append((split, index, min(cfg.shard_size, total - start)))
    return plan


def _write_manifest(out: Path, cfg: DataConfig, plan) -> dict:
    shards = []
    for split, index, n in plan:
        name = f"{split}-{index:05d}.jsonl"
        shards.append({"split": split, "file": name, "n": n,
                       "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()})
    data_id = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
    manifest = {"data_id": data_id, "shards": shards, "config": asdict(cfg)}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(out: str | Path) -> dict:
    return json.loads((Path(out) / MANIFEST).read_text())


def read_split(out: str | Path, split: str) -> list[dict]:
    """All triplets of one split ("train" or "val"), in shard order."""
    out = Path(out)
    rows = []
    for shard in read_manifest(out)["shards"]:
        if shard["split"] == split:
            with open(out / shard["file"], encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f)
    return rows


def config_key(cfg: DataConfig, tokenizer_id: str) -> str:
    """Where a data set lives: a hash of everything that changes its content."""
    blob = json.dumps({"cfg": asdict(cfg), "tok": tokenizer_id, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

