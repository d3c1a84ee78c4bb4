"""Synthesis: corpus prefixes -> policy trajectories -> (reference, positive, negative) triplets.

For each prefix two distinct policies A and B are drawn from the pool; A writes the
reference and the positive, B the negative. Synthesis runs in three resumable steps, in
a data set's folder (`out`):

1. plan (`prepare`): every shard's prefixes with their pairs (A, B) and one generation
   seed per policy, a pure function of the config's seed (`plan/SPLIT-NNNNN.json`); the
   config and the tokenizer are saved beside them (`synthesis.json`, `tokenizer/`), so a
   unit of work anywhere (a SLURM array task) needs only the folder;
2. units of work (`run_units`): one per (policy, shard) that has requests. A unit loads
   ONE policy, generates all of that policy's requests of the shard in batches and writes
   an atomic part file (`parts/SPLIT-NNNNN.pPPPP.jsonl`); run locally, each policy is
   loaded once for all its units; an interrupted synthesis resumes at the first missing
   part, and a unit's output depends only on its plan and seed;
3. assemble (`assemble`): parts joined into triplet shards (`SPLIT-NNNNN.jsonl`) and the
   manifest, whose content hash is the data_id; the plan and parts are then removed.

`synthesize` runs all three here. Validation prefixes come from held-out text
(polar.corpus). Files are written to a temporary name and renamed: a half-written file is
never read; steps that write shared files hold the folder's lock. The manifest holds each
shard's size and sha256: every process checks a shard against them before its first use
(hashed once per process, `polar.integrity`); `synthesize` regenerates a missing or
damaged shard from the config, and `read_split` refuses one (DataError, naming the
file), so a data_id always names the same triplets.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from polar.atomic import write_text_atomic
from polar.config import DataConfig
from polar.integrity import file_digest

MANIFEST = "manifest.json"
SETUP = "synthesis.json"
FIELDS = ("prompt", "reference", "positive", "negative", "policy_a", "policy_b")
SPLITS = ("train", "val")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set on disk is damaged (a shard missing or not the one its manifest lists,
    or an unreadable manifest); the message names the files and what to do."""


@dataclass(frozen=True)
class Unit:
    """One unit of work: policy `policy` (its index in the pool) writes its requests of
    one shard."""

    split: str
    shard: int
    policy: int
    name: str                 # the policy's name
    requests: int

    @property
    def key(self) -> str:
        return f"{self.split}-{self.shard:05d}.p{self.policy:04d}"

    def part(self, out: Path) -> Path:
        return Path(out) / "parts" / f"{self.key}.jsonl"


@contextmanager
def locked(out: str | Path) -> Iterator[None]:
    """The data set folder's lock (an flock on out/.lock): one process plans, assembles
    or tokenizes at a time; the others wait, then find the work done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------ 1. plan

def shard_plan(cfg: DataConfig) -> list[tuple[str, int, int]]:
    """(split, index, rows) of every shard."""
    plan = []
    for split, total in (("train", cfg.n_train), ("val", cfg.n_val)):
        for index, start in enumerate(range(0, total, cfg.shard_size)):
            plan.append((split, index, min(cfg.shard_size, total - start)))
    return plan


def plan_shard(corpus, n_policies: int, split: str, index: int, n: int, cfg: DataConfig) -> dict:
    """The plan of one shard, from (seed, split, index) alone: its prompts, each with its
    pair (a, b) of distinct policy indices, and one generation seed per policy with
    requests (drawn in policy order after the pairs)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    prompts = corpus.sample(split, n, cfg.prefix_min, cfg.prefix_max, rng)
    pairs = [rng.choice(n_policies, size=2, replace=False) for _ in prompts]
    used = sorted({int(p) for pair in pairs for p in pair})
    seeds = {str(p): int(rng.integers(2**31)) for p in used}
    rows = [{**prompt.to_json(), "a": int(a), "b": int(b)} for prompt, (a, b) in zip(prompts, pairs)]
    return {"split": split, "index": index, "rows": rows, "seeds": seeds}


def requests_of(shard: dict, policy: int) -> list[tuple[int, str]]:
    """(row, field) pairs that `policy` writes in a planned shard, in row order: A writes
    the reference and the positive, B the negative."""
    wanted = []
    for row, r in enumerate(shard["rows"]):
        if r["a"] == policy:
            wanted += [(row, "reference"), (row, "positive")]
        if r["b"] == policy:
            wanted.append((row, "negative"))
    return wanted


def _plan_path(out: Path, split: str, index: int) -> Path:
    return out / "plan" / f"{split}-{index:05d}.json"


def prepare(cfg: DataConfig, tokenizer, out_dir: str | Path, only: Sequence[tuple[str, int]] | None = None,
            progress: bool = True) -> list[Unit]:
    """Step 1: save the config and tokenizer, plan every shard not planned yet (or only
    the shards `only` names) and return the units of work that have no part file yet.
    Idempotent; the same config and seed give the same plan."""
    from tqdm import tqdm

    out = Path(out_dir)
    with locked(out):
        _save_setup(cfg, tokenizer, out)
        todo = [(s, i, n) for s, i, n in shard_plan(cfg)
                if (only is None or (s, i) in only) and not _plan_path(out, s, i).exists()
                and not (out / f"{s}-{i:05d}.jsonl").exists()]
        if todo:
            corpus = _corpus(cfg, tokenizer, out)
            for split, index, n in tqdm(todo, desc=f"plan {out.name}", unit="shard", disable=not progress):
                write_text_atomic(_plan_path(out, split, index),
                                  json.dumps(plan_shard(corpus, len(cfg.policies), split, index, n, cfg),
                                             ensure_ascii=False))
    return pending_units(out)


def _corpus(cfg: DataConfig, tokenizer, out: Path):
    from polar.corpus import Corpus

    return Corpus(cfg.corpus, tokenizer, cfg.val_fraction, seed=cfg.seed, cache_dir=out.parent.parent)   # paths.cache_dir/hf_datasets


def _save_setup(cfg: DataConfig, tokenizer, out: Path) -> None:
    if not (out / "tokenizer").is_dir():
        from polar.atomic import atomic_path

        with atomic_path(out / "tokenizer", keep_existing=True) as tmp:
            tokenizer.save_pretrained(tmp)
    if not (out / SETUP).exists():
        write_text_atomic(out / SETUP, json.dumps({"config": asdict(cfg)}, indent=1, default=str))


def load_setup(out_dir: str | Path) -> tuple[DataConfig, object]:
    """(DataConfig, tokenizer) saved by `prepare` in a data set's folder."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    try:
        setup = json.loads((out / SETUP).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{out / SETUP} cannot be read ({err}): {out} was not prepared for synthesis "
                        "(polar.synthesis.prepare)") from None
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    return DataConfig(**setup["config"]), tokenizer


def pending_units(out_dir: str | Path) -> list[Unit]:
    """Units of the planned shards whose part file is missing, policy by policy."""
    out = Path(out_dir)
    cfg = json.loads((out / SETUP).read_text(encoding="utf-8"))["config"]
    names = [p["name"] for p in cfg["policies"]]
    units = []
    for path in sorted((out / "plan").glob("*.json")):
        shard = json.loads(path.read_text(encoding="utf-8"))
        for policy in map(int, shard["seeds"]):
            unit = Unit(shard["split"], shard["index"], policy, names[policy], len(requests_of(shard, policy)))
            if not unit.part(out).exists():
                units.append(unit)
    return sorted(units, key=lambda u: (u.policy, u.split, u.shard))


# ------------------------------------------------------------------ 2. units of work

def run_units(out_dir: str | Path, units: Sequence[Unit], progress: bool = True, device: str | None = None,
              cfg: DataConfig | None = None, tokenizer=None) -> None:
    """Step 2 for these units: each policy loaded once, for all of its units here, then
    freed. A unit that fails names its policy, shard and part; parts already written stay."""
    from tqdm import tqdm

    out = Path(out_dir)
    if not units:
        return
    if cfg is None or tokenizer is None:
        cfg, tokenizer = load_setup(out)
    corpus = _corpus(cfg, tokenizer, out)
    bar = tqdm(total=len(units), desc=f"synthesize {out.name}", unit="unit", disable=not progress)
    for policy in sorted({u.policy for u in units}):
        mine = [u for u in units if u.policy == policy and not u.part(out).exists()]
        if mine:
            _run_policy(out, cfg, tokenizer, corpus, mine, device, bar)
        bar.update(len([u for u in units if u.policy == policy]) - len(mine))
    bar.close()


def _run_policy(out: Path, cfg: DataConfig, tokenizer, corpus, units: list[Unit], device, bar) -> None:
    from polar.policies import load_policy

    spec = cfg.policies[units[0].policy]
    corpus_ids = {s: corpus.token_ids(s) for s in cfg.builtin_sources if spec.kind == "ngram" and s == spec.source}
    policy = load_policy(spec, tokenizer=tokenizer, corpus_ids=corpus_ids, engine=cfg.engine,
                         batch_size=cfg.gen_batch_size, device=device)
    try:
        for unit in units:
            try:
                _run_unit(out, cfg, policy, unit)
            except Exception as err:
                raise RuntimeError(f"synthesis unit {unit.key} failed: policy {unit.name!r} on shard "
                                   f"{unit.split}-{unit.shard:05d} ({type(err).__name__}: {err}); the parts "
                                   f"already written in {out / 'parts'} are kept") from err
            bar.update(1)
    finally:
        policy.close()


def _run_unit(out: Path, cfg: DataConfig, policy, unit: Unit) -> None:
    from polar.corpus import Prompt

    shard = json.loads(_plan_path(out, unit.split, unit.shard).read_text(encoding="utf-8"))
    wanted = requests_of(shard, unit.policy)
    prompts = [Prompt.from_json(shard["rows"][row]) for row, _ in wanted]
    texts = policy.generate(prompts, cfg.max_response_tokens, seed=shard["seeds"][str(unit.policy)])
    lines = "".join(json.dumps({"row": row, "field": field, "text": text}, ensure_ascii=False) + "\n"
                    for (row, field), text in zip(wanted, texts))
    write_text_atomic(unit.part(out), lines)


def run_unit_task(out_dir: str, keys: Sequence[str]) -> int:
    """A SLURM array task: run the units named by `keys` (Unit.key) of a prepared data
    set; returns how many ran (parts already there are skipped)."""
    wanted = set(keys)
    units = [u for u in pending_units(out_dir) if u.key in wanted]
    run_units(out_dir, units, progress=False)
    return len(units)


# ------------------------------------------------------------------ 3. assemble

def assemble(out_dir: str | Path, cfg: DataConfig) -> dict:
    """Step 3: join the parts into triplet shards and write the manifest; the plan and
    the parts are removed once the manifest is written. Refuses (DataError, naming the
    units) while parts are missing."""
    out = Path(out_dir)
    with locked(out):
        if (out / MANIFEST).exists():
            return read_manifest(out)
        _assemble_shards(out, cfg)
        manifest = _write_manifest(out, cfg, shard_plan(cfg))
        shutil.rmtree(out / "parts", ignore_errors=True)
        shutil.rmtree(out / "plan", ignore_errors=True)
        return manifest


def _assemble_shards(out: Path, cfg: DataConfig) -> None:
    missing = pending_units(out)
    if missing:
        raise DataError(f"data set {out}: {len(missing)} units of work have not written their parts yet "
                        f"({', '.join(u.key for u in missing[:5])}{' ...' if len(missing) > 5 else ''}); run "
                        "them first (polar.synthesis.run_units, or the synthesis job arrays)")
    names = [p.name for p in cfg.policies]
    for split, index, _ in shard_plan(cfg):
        path = out / f"{split}-{index:05d}.jsonl"
        if not path.exists():
            write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in _triplets(out, split, index, names)))


def _triplets(out: Path, split: str, index: int, names: list[str]) -> list[dict]:
    """A shard's rows: prompt (and chat messages), the pair's names, then the texts each
    policy wrote, policy by policy (the key order of the original single-process writer)."""
    shard = json.loads(_plan_path(out, split, index).read_text(encoding="utf-8"))
    rows = []
    for r in shard["rows"]:
        row = {"prompt": r["prompt"], "policy_a": names[r["a"]], "policy_b": names[r["b"]]}
        if r.get("messages"):
            row["messages"] = r["messages"]
        rows.append(row)
    for policy in sorted(map(int, shard["seeds"])):
        unit = Unit(split, index, policy, names[policy], 0)
        with open(unit.part(out), encoding="utf-8") as f:
            for line in f:
                item = json.loads(line)
                rows[item["row"]][item["field"]] = item["text"]
    return rows


# ------------------------------------------------------------------ all three, here

def synthesize(cfg: DataConfig, tokenizer, out_dir: str | Path, progress: bool = True) -> dict:
    """Write (or finish writing) the data set of `cfg` into out_dir and return its
    manifest: plan, the pending units one policy at a time, assemble. A data set already
    written is checked against its manifest, and a missing or damaged shard regenerated
    (the same seed gives the same shard)."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        damaged = shard_problems(out, manifest)
        if damaged:
            _regenerate(cfg, tokenizer, out, manifest, damaged, progress)
        return manifest
    units = prepare(cfg, tokenizer, out, progress=progress)
    run_units(out, units, progress=progress, cfg=cfg, tokenizer=tokenizer)
    return assemble(out, cfg)


def _regenerate(cfg: DataConfig, tokenizer, out: Path, manifest: dict, damaged: list[tuple[Path, str]],
                progress: bool) -> None:
    """Rewrite the damaged shards from the config; refuse when they come out other than
    the manifest says (the data_id would then name other triplets)."""
    log.warning("data set %s: %s; regenerating %s from its config", out,
                "; ".join(f"{path}: {what}" for path, what in damaged), "it" if len(damaged) == 1 else "them")
    shards = []
    for path, _ in damaged:
        path.unlink(missing_ok=True)
        split, index = path.stem.split("-")
        shards.append((split, int(index)))
    units = prepare(cfg, tokenizer, out, only=shards, progress=progress)
    run_units(out, units, progress=progress, cfg=cfg, tokenizer=tokenizer)
    with locked(out):
        _assemble_shards(out, cfg)
        shutil.rmtree(out / "parts", ignore_errors=True)
        shutil.rmtree(out / "plan", ignore_errors=True)
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


def iter_split(out: str | Path, split: str, use: str = "training on it") -> Iterator[dict]:
    """The triplets of one split ("train" or "val"), one at a time, in shard order; DataError
    (before the first row) when a shard is missing or not the one the manifest lists."""
    out = Path(out)
    manifest = read_manifest(out)
    damaged = shard_problems(out, manifest, split)
    if damaged:
        raise DataError(f"data set {out} is damaged, and {use} would be wrong: "
                        + "; ".join(f"{path}: {what}" for path, what in damaged)
                        + ". Running the job again regenerates the shards from the config in its manifest "
                        f"(polar.synthesis.synthesize); or delete the folder {out} to synthesize it anew.")
    return _rows(out, manifest, split)


def _rows(out: Path, manifest: dict, split: str) -> Iterator[dict]:
    for shard in manifest["shards"]:
        if shard["split"] == split:
            with open(out / shard["file"], encoding="utf-8") as f:
                yield from (json.loads(line) for line in f if line.strip())


def read_split(out: str | Path, split: str) -> list[dict]:
    """All triplets of one split, as a list (iter_split)."""
    return list(iter_split(out, split))


def config_key(cfg: DataConfig, tokenizer_id: str) -> str:
    """Where a data set lives: a hash of everything that changes its content (not
    max_epochs, which bounds how a run uses it)."""
    content = {k: v for k, v in asdict(cfg).items() if k != "max_epochs"}
    blob = json.dumps({"cfg": content, "tok": tokenizer_id, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

