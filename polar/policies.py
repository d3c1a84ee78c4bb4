"""The policy pool: anything that continues a prompt, loaded one policy at a time.

A Policy has a `name`, `generate(prompts, max_new_tokens, seed) -> continuations` and
`close()` (frees its memory, and the GPU); `load_policy(spec, ...)` builds one, so a unit
of synthesis work holds one policy at a time. Three kinds ship:
- NGramPolicy: a token n-gram model trained on one corpus source, sampled with
  temperature, top-k and top-p; cheap enough to synthesize thousands of trajectories
  on a laptop CPU. Orders, sources and temperatures give distinct but overlapping styles.
  Its tables are shared by every policy of the same source, part and order in a process.
- HFPolicy (data.engine=hf): any transformers causal LM in a local directory, sampled in
  batches with POLAR's settings; a trajectory ends at the policy's EOS or at
  max_new_tokens, so lengths vary. Chat policies render a chat prompt with their own template.
- VLLMPolicy (data.engine=vllm): the same with vLLM (a GPU and `pip install .[vllm]`).
Policies work on text, as POLAR's LLM policies do; the n-gram models tokenize with the
pool's tokenizer internally. `policy_size(spec)` counts an hf policy's parameters from its
config alone (to size GPU units).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from polar.config import PolicySpec, local_dir
from polar.corpus import Prompt

VLLM_MISSING = "data.engine=vllm needs vLLM: pip install .[vllm] (on a GPU machine)"


class Policy(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, seed: int) -> list[str]: ...

    def close(self) -> None: ...


def _as_prompt(prompt: Prompt | str) -> Prompt:
    return prompt if isinstance(prompt, Prompt) else Prompt(prompt)


class _Closing:
    """`with load_policy(...) as policy:` closes the policy on the way out."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_policy(spec: PolicySpec, *, tokenizer=None, corpus_ids: dict[str, np.ndarray] | None = None,
                engine: str = "hf", batch_size: int = 64, device: str | None = None, **engine_options) -> Policy:
    """One policy of the pool. n-gram policies train on corpus_ids[spec.source] (their part of
    it) with `tokenizer`; hf policies load spec.path with `engine` (hf or vllm), generating
    batch_size prompts per call (hf). engine_options go to VLLMPolicy (tensor_parallel_size,
    load_format, gpu_memory_utilization, ...)."""
    if spec.kind == "ngram":
        if tokenizer is None or corpus_ids is None:
            raise ValueError(f"policy {spec.name!r} is an n-gram model: load_policy needs the pool's tokenizer "
                             "and the corpus token ids it trains on")
        return NGramPolicy(spec, tokenizer, ngram_tables(spec, corpus_ids))
    if engine == "hf":
        return HFPolicy(spec, batch_size=batch_size, device=device)
    if engine == "vllm":
        return VLLMPolicy(spec, **engine_options)
    raise ValueError(f"data.engine={engine!r} is not valid; choose one of ['hf', 'vllm']")


def policy_size(spec: PolicySpec) -> int | None:
    """All parameters of an hf policy (embeddings included), counted from its config.json on
    the meta device without reading weights; None for an n-gram policy."""
    if spec.kind != "hf":
        return None
    import torch
    from transformers import AutoModelForCausalLM

    path = local_dir(spec.path, f"policy {spec.name!r}: path")
    config = causal_lm_config(spec, path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())

# ------------------------------------------------------------------ n-gram policies


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


class NGramPolicy(_Closing):
    """A backoff token n-gram model (order 1 = unigram) with HF-style sampling."""

    def __init__(self, spec: PolicySpec, tokenizer, tables: list[dict]):
        self.name, self.spec, self.tokenizer = spec.name, spec, tokenizer
        self.order = spec.order
        self.tables = tables
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def generate(self, prompts: Sequence[Prompt | str], max_new_tokens: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        texts = [_as_prompt(p).text for p in prompts]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode(self._continue(ids, max_new_tokens, rng)) for ids in encoded]

    def close(self) -> None:
        self._cache.clear()   # the tables stay in the process-wide cache for the next policy of their source

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


# (source, part, parts, order, len(ids), digest of ids) -> tables, most recently used last;
# keyed by content, not id(ids), so a corpus loaded again (or an id reused) cannot mislead it
_TABLES: OrderedDict[tuple, list[dict]] = OrderedDict()
_TABLES_KEPT = 32


def ngram_tables(spec: PolicySpec, corpus_ids: dict[str, np.ndarray]) -> list[dict]:
    """The n-gram tables of spec's source, part and order, built once per process for the same
    corpus token ids and shared by every policy that needs them."""
    import hashlib

    if spec.source not in corpus_ids:
        raise ValueError(f"policy {spec.name!r} trains on corpus source {spec.source!r}, which is not "
                         f"in data.corpus={sorted(corpus_ids)}")
    ids = np.ascontiguousarray(corpus_ids[spec.source])
    digest = hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest() + str(ids.dtype)
    key = (spec.source, spec.part, spec.parts, spec.order, len(ids), digest)
    if key not in _TABLES:
        _TABLES[key] = _ngram_tables(np.array_split(ids, spec.parts)[spec.part], spec.order)
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(key)
    return _TABLES[key]


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

# ------------------------------------------------------------------ LLM policies (transformers, vLLM)


def _causal_lm_names() -> tuple[set[str], set[str]]:
    """(model types, architecture class names) that AutoModelForCausalLM loads."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        classes.update([value] if isinstance(value, str) else value)
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), classes


def causal_lm_config(spec: PolicySpec, path: str):
    """The config of the causal LM in `path`, or ValueError naming the policy, the path and
    what would be valid."""
    from transformers import AutoConfig

    valid = ("give a local folder of a transformers causal LM: a config.json whose architecture "
             "AutoModelForCausalLM loads (e.g. LlamaForCausalLM, Qwen2ForCausalLM, GPTNeoXForCausalLM), "
             "its weights and its tokenizer")
    where = f"policy {spec.name!r}: path={spec.path} ({path})"
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{where} holds no config.json; {valid}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{where}: its config.json does not load ({e}); {valid}") from None
    types, classes = _causal_lm_names()
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type not in types or (architectures and not set(architectures) & classes):
        what = f"architectures {architectures}" if architectures else f"model_type {config.model_type!r}"
        raise ValueError(f"{where} is not a causal LM ({what}); {valid}")
    return config


def policy_tokenizer(spec: PolicySpec, path: str):
    """The policy's own tokenizer (left padding), or ValueError naming the policy and path."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"policy {spec.name!r}: path={spec.path} ({path}) has no tokenizer that loads ({e}); "
                         "save the policy's tokenizer beside its weights (tokenizer.save_pretrained(path))") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def render(tokenizer, prompt: Prompt | str) -> str:
    """What a policy continues: a chat prompt through the policy's chat template (with the
    assistant turn opened) when it has one, otherwise the prompt's text."""
    prompt = _as_prompt(prompt)
    if prompt.messages and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([dict(m) for m in prompt.messages], add_generation_prompt=True,
                                             tokenize=False)
    return prompt.text


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class HFPolicy(_Closing):
    """A transformers causal LM from a local directory, sampled in batches of `batch_size`
    prompts (sorted by length, left-padded; bf16 on CUDA, fp32 on CPU)."""

    def __init__(self, spec: PolicySpec, batch_size: int = 64, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.name, self.spec, self.batch_size = spec.name, spec, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = local_dir(spec.path, f"policy {spec.name!r}: path")   # never a hub id
        causal_lm_config(spec, path)
        self.tokenizer = policy_tokenizer(spec, path)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=self.device,
                                                          local_files_only=True).eval()   # straight to the device
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def generate(self, prompts: Sequence[Prompt | str], max_new_tokens: int, seed: int) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in self.sample_tokens(prompts, max_new_tokens, seed)]

    def sample_tokens(self, prompts: Sequence[Prompt | str], max_new_tokens: int, seed: int) -> list[list[int]]:
        """The new token ids of each prompt's trajectory, in input order: up to and including
        the policy's EOS, or max_new_tokens of them."""
        import torch

        encoded = [self.tokenizer(render(self.tokenizer, p), add_special_tokens=False)["input_ids"]
                   for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))   # less padding per batch
        out: list[list[int]] = [[] for _ in encoded]
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):   # the seed is ours; the caller's RNG stays as it was
            torch.manual_seed(seed)
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                for row, ids in zip(rows, self._sample_batch([encoded[i] for i in rows], max_new_tokens)):
                    out[row] = ids
        return out

    def _sample_batch(self, encoded: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        with torch.no_grad():
            new = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      do_sample=True, max_new_tokens=max_new_tokens,
                                      temperature=self.spec.temperature, top_p=self.spec.top_p,
                                      top_k=self.spec.top_k, eos_token_id=self.eos_ids or None,
                                      pad_token_id=self.pad_id)[:, width:].tolist()
        return [self._until_eos(ids) for ids in new]

    def _until_eos(self, ids: list[int]) -> list[int]:
        ends = [i for i, t in enumerate(ids) if t in self.eos_ids]
        return ids[: ends[0] + 1] if ends else ids

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMPolicy(_Closing):
    """A causal LM from a local directory served by vLLM (bf16 on the GPU). Each prompt gets
    its own sampling seed (derived from the call's seed), so repeated prompts differ."""

    def __init__(self, spec: PolicySpec, tensor_parallel_size: int = 1, load_format: str = "auto",
                 dtype: str = "bfloat16", seed: int = 0, **llm_options):
        try:
            import vllm
        except ImportError:
            raise ImportError(VLLM_MISSING) from None
        self.name, self.spec = spec.name, spec
        path = local_dir(spec.path, f"policy {spec.name!r}: path")
        causal_lm_config(spec, path)
        self.tokenizer = policy_tokenizer(spec, path)
        self._vllm = vllm
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, seed=seed,
                            tensor_parallel_size=tensor_parallel_size, load_format=load_format, **llm_options)

    def generate(self, prompts: Sequence[Prompt | str], max_new_tokens: int, seed: int) -> list[str]:
        requests = [{"prompt_token_ids": self.tokenizer(render(self.tokenizer, p), add_special_tokens=False)
                     ["input_ids"]} for p in prompts]
        seeds = np.random.default_rng(seed).integers(2**31, size=len(requests))
        params = [self._vllm.SamplingParams(temperature=self.spec.temperature, top_p=self.spec.top_p,
                                            top_k=self.spec.top_k, max_tokens=max_new_tokens, seed=int(s))
                  for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        import gc

        import torch

        self.llm = None
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:   # noqa: BLE001 - older/newer vLLM layouts: freeing memory is best effort
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
