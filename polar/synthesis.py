"""Synthesis: corpus prefixes -> policy trajectories -> (reference, positive, negative) triplets.

For each prefix two distinct policies A and B are drawn from the pool; A writes the
reference and the positive, B the negative. Prefixes for the validation set come from a
held-out tail of every corpus source. The output is a folder of JSONL shards with a
manifest; its content hash is the data_id. Shard i depends only on (seed, split, i), so
an interrupted synthesis resumes at the first missing shard and the same seed gives the
same data. Shards are written to a temporary name and renamed: a half-written shard is
never read. The manifest holds each shard's size and sha256: every process checks a shard
against them before its first use (hashed once per process, `polar.integrity`);
`synthesize` regenerates a missing or damaged shard from the config, and `read_split`
refuses one (DataError, naming the file), so a data_id always names the same triplets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from polar.atomic import write_text_atomic
from polar.config import DataConfig
from polar.integrity import file_digest

MANIFEST = "manifest.json"
FIELDS = ("prompt", "reference", "positive", "negative", "policy_a", "policy_b")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set on disk is damaged (a shard missing or not the one its manifest lists,
    or an unreadable manifest); the message names the files and what to do."""


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
        texts = pool[index].generate([prefixes[row] for row, _ in wanted], cfg.max_response_tokens,
                                     seed=int(rng.integers(2**31)))
        for (row, field), text in zip(wanted, texts):
            rows[row][field] = text
    return rows


def synthesize(cfg: DataConfig, tokenizer, out_dir: str | Path, progress: bool = True) -> dict:
    """Write (or finish writing) the shards and manifest of `cfg` into out_dir; return the
    manifest. A data set already written is checked against its manifest, and a missing or
    damaged shard regenerated (the same seed gives the same shard)."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        damaged = shard_problems(out, manifest)
        if damaged:
            _regenerate(cfg, tokenizer, out, manifest, damaged, progress)
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    plan = _shard_plan(cfg)
    _write_shards(cfg, tokenizer, out, plan, progress)
    return _write_manifest(out, cfg, plan)


def _write_shards(cfg: DataConfig, tokenizer, out: Path, plan, progress: bool) -> None:
    """Write every shard of `plan` that is not in out yet."""
    from tqdm import tqdm

    from polar.policies import build_pool

    corpus = corpus_token_ids(cfg.corpus, tokenizer)
    train_regions = {s: split_ids(ids, cfg.val_fraction)[0] for s, ids in corpus.items()}
    val_regions = {s: split_ids(ids, cfg.val_fraction)[1] for s, ids in corpus.items()}
    pool = build_pool(cfg.policies, tokenizer, train_regions)
    bar = tqdm(plan, desc=f"synthesize {out.name}", unit="shard", disable=not progress)
    for split, index, n in bar:
        path = out / f"{split}-{index:05d}.jsonl"
        if path.exists():
            continue                      # finished in an earlier, interrupted run
        rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
        regions = train_regions if split == "train" else val_regions
        rows = synthesize_shard(pool, sample_prefixes(regions, n, cfg, rng, tokenizer), cfg, rng)
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _regenerate(cfg: DataConfig, tokenizer, out: Path, manifest: dict, damaged: list[tuple[Path, str]],
                progress: bool) -> None:
    """Rewrite the damaged shards from the config; refuse when they come out other than
    the manifest says (the data_id would then name other triplets)."""
    log.warning("data set %s: %s; regenerating %s from its config", out,
                "; ".join(f"{path}: {what}" for path, what in damaged), "it" if len(damaged) == 1 else "them")
    for path, _ in damaged:
        path.unlink(missing_ok=True)
    _write_shards(cfg, tokenizer, out, _shard_plan(cfg), progress)
    still = shard_problems(out, manifest)
    if still:
        raise DataError(f"shards of data set {out} regenerated from its config still differ from its manifest "
                        f"({'; '.join(f'{path}: {what}' for path, what in still)}): synthesis does not reproduce "
                        f"them here. Delete the folder {out} to synthesize the data set anew (a new data_id).")


def shard_problems(out: str | Path, manifest: dict, split: str | None = None) -> list[tuple[Path, str]]:
    """(path, what is wrong) for each shard of the manifest (of `split`, or all) that is
    missing, or whose size or sha256 is not the manifest's. Each version of a file is
    hashed once per process (polar.integrity.file_digest); a size that differs is found
    without hashing."""
    out, problems = Path(out), []
    for shard in manifest["shards"]:
        path = out / shard["file"]
        if split is not None and shard["split"] != split:
            continue
        if not path.is_file():
            problems.append((path, "missing"))
        elif "bytes" in shard and path.stat().st_size != shard["bytes"]:   # manifests before 2026-11-29: no size
            problems.append((path, f"{path.stat().st_size} bytes where the manifest says {shard['bytes']} "
                                   "(lines removed or added?)"))
        elif file_digest(path)["sha256"] != shard["sha256"]:
            problems.append((path, "its sha256 is not the manifest's (edited or damaged)"))
    return problems


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
        digest = file_digest(out / name)
        shards.append({"split": split, "file": name, "n": n, "bytes": digest["size"], "sha256": digest["sha256"]})
    data_id = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
    manifest = {"data_id": data_id, "shards": shards, "config": asdict(cfg)}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: {out} is not a synthesized data set (or was not finished)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} cannot be read ({err}); delete the folder {out} to synthesize the data set "
                        "anew") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"{path} is not a data set manifest (no list of shards); delete the folder {out} to "
                        "synthesize the data set anew")
    return manifest


def read_split(out: str | Path, split: str) -> list[dict]:
    """All triplets of one split ("train" or "val"), in shard order; DataError when a
    shard is missing or not the one the manifest lists."""
    out = Path(out)
    manifest = read_manifest(out)
    damaged = shard_problems(out, manifest, split)
    if damaged:
        raise DataError(f"data set {out} is damaged, and training on it would be wrong: "
                        + "; ".join(f"{path}: {what}" for path, what in damaged)
                        + ". Running the job again regenerates the shards from the config in its manifest "
                        f"(polar.synthesis.synthesize); or delete the folder {out} to synthesize it anew.")
    rows = []
    for shard in manifest["shards"]:
        if shard["split"] == split:
            with open(out / shard["file"], encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f)
    return rows


def config_key(cfg: DataConfig, tokenizer_id: str) -> str:
    """Where a data set lives: a hash of everything that changes its content."""
    blob = json.dumps({"cfg": asdict(cfg), "tok": tokenizer_id, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

