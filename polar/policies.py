"""The policy pool: anything that continues a text prefix.

A Policy has a `name` and `generate(prefixes, max_new_tokens, seed) -> continuations`.
Two kinds ship:
- NGramPolicy: a token n-gram model trained on one corpus source, sampled with
  temperature, top-k and top-p; cheap enough to synthesize thousands of trajectories
  on a laptop CPU. Orders, sources and temperatures give distinct but overlapping styles.
- HFPolicy: any transformers causal LM from a local directory (the real path on GPUs),
  with batched sampling.
Policies work on text, as POLAR's LLM policies do; the n-gram models tokenize with the
pool's tokenizer internally.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Protocol, Sequence

import numpy as np

from polar.config import PolicySpec


class Policy(Protocol):
    name: str

    def generate(self, prefixes: Sequence[str], max_new_tokens: int, seed: int) -> list[str]: ...


def sampling_distribution(counts: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p (nucleus) truncation, as HF applies
    them (temperature first). `counts` must be sorted in descending order."""
    logp = np.log(counts.astype(np.float64)) / temperature
    logp = logp[: max(1, top_k)]
    p = np.exp(logp - logp.max())
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p, side="left")) + 1   # smallest set with mass >= top_p
    p = p[:keep]
    return p / p.sum()


class NGramPolicy:
    """A backoff token n-gram model (order 1 = unigram) with HF-style sampling."""

    def __init__(self, spec: PolicySpec, tokenizer, tables: list[dict]):
        self.name, self.spec, self.tokenizer = spec.name, spec, tokenizer
        self.order = spec.order
        self.tables = tables
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def generate(self, prefixes: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        encoded = self.tokenizer(list(prefixes), add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode(self._continue(ids, max_new_tokens, rng)) for ids in encoded]

    def _continue(self, ids: list[int], n: int, rng: np.random.Generator) -> list[int]:
        context, out = list(ids), []
        for _ in range(n):
            tokens, cdf = self._distribution(context)
            token = int(tokens[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(tokens) - 1)])
            out.append(token)
            context.append(token)
        return out

    def _distribution(self, context: list[int]) -> tuple[np.ndarray, np.ndarray]:
        for k in range(self.order - 1, -1, -1):       # back off to shorter contexts
            if k > len(context):
                continue
            key = tuple(context[len(context) - k:]) if k else ()
            if key in self._cache:
                return self._cache[key]
            entry = self.tables[k].get(key)
            if entry is not None:
                tokens, counts = entry
                p = sampling_distribution(counts, self.spec.temperature, self.spec.top_k, self.spec.top_p)
                self._cache[key] = (tokens[: len(p)], np.cumsum(p))
                return self._cache[key]
        raise RuntimeError("unigram table is empty")   # unreachable with non-empty training text


def _ngram_tables(ids: np.ndarray, order: int) -> list[dict[tuple, tuple[np.ndarray, np.ndarray]]]:
    """For each context length k < order: context tuple -> (next tokens, counts), sorted by count."""
    ids = [int(i) for i in ids]
    tables = []
    for k in range(order):
        grouped: dict[tuple, Counter] = defaultdict(Counter)
        for i in range(k, len(ids)):
            grouped[tuple(ids[i - k:i])][ids[i]] += 1
        table = {}
        for key, counter in grouped.items():
            pairs = counter.most_common()
            table[key] = (np.array([t for t, _ in pairs]), np.array([c for _, c in pairs]))
        tables.append(table)
    return tables


class HFPolicy:
    """A transformers causal LM from a local directory, sampled in batches."""

    def __init__(self, spec: PolicySpec, batch_size: int = 32, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from polar.config import local_dir

        self.name, self.spec, self.batch_size = spec.name, spec, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = local_dir(spec.path, f"policy {spec.name!r}: path")   # never a hub id
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(self.device).eval()

    def generate(self, prefixes: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
        import torch

        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):   # the seed is ours; the caller's RNG stays as it was
            torch.manual_seed(seed)
            return self._sample(prefixes, max_new_tokens)

    def _sample(self, prefixes: Sequence[str], max_new_tokens: int) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(prefixes), self.batch_size):
            batch = self.tokenizer(list(prefixes[start:start + self.batch_size]), return_tensors="pt",
                                   padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                ids = self.model.generate(**batch, do_sample=True, max_new_tokens=max_new_tokens,
                                          min_new_tokens=max_new_tokens,
                                          temperature=self.spec.temperature, top_p=self.spec.top_p,
                                          top_k=self.spec.top_k, pad_token_id=self.tokenizer.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def build_pool(specs: Sequence[PolicySpec], tokenizer, corpus_ids: dict[str, np.ndarray]) -> list[Policy]:
    """Instantiate the pool; n-gram policies train on their source's training split (or
    their part of it)."""
    if len(specs) < 2:
        raise ValueError(f"the policy pool needs at least two policies, got {len(specs)}")
    pool: list[Policy] = []
    tables: dict[tuple, list[dict]] = {}   # shared by policies of one source, part and order
    for spec in specs:
        if spec.kind == "hf":
            pool.append(HFPolicy(spec))
        elif spec.source not in corpus_ids:
            raise ValueError(f"policy {spec.name!r} trains on corpus source {spec.source!r}, which is not "
                             f"in data.corpus={sorted(corpus_ids)}")
        else:
            key = (spec.source, spec.part, spec.parts, spec.order)
            if key not in tables:
                tables[key] = _ngram_tables(np.array_split(corpus_ids[spec.source], spec.parts)[spec.part],
                                            spec.order)
            pool.append(NGramPolicy(spec, tokenizer, tables[key]))
    return pool
