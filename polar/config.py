"""Typed configuration of the science: model shape, data synthesis, training.

Plain dataclasses, validated in __post_init__ with errors that name the bad value and
what would be valid. `sweeps/schema.py` registers them with Hydra; nothing here imports
Hydra, so the same objects serve the CLI, the tests and the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


def local_dir(path: str, key: str) -> str:
    """A directory the config names (`key=path`), resolved against the working directory as
    a local path (never a Hugging Face hub id), or FileNotFoundError naming key and path."""
    from pathlib import Path

    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(missing_dir(path, key))
    return str(resolved)


def missing_dir(path: str, key: str) -> str:
    """Why `key=path` is refused when it is not a local directory."""
    from pathlib import Path

    resolved = Path(path).expanduser().resolve()
    what = "is a file, not a directory" if resolved.exists() else "does not exist"
    return (f"{key}={path} {what} ({resolved}): give a local Hugging Face folder (hub ids are not fetched; "
            "a relative path is read from the working directory)")


def _one_of(owner: str, name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {list(valid)}")


@dataclass
class ModelConfig:
    """A backbone: the shape of a randomly initialised Llama-architecture model, or a
    pre-trained checkpoint (`init_from`, a local Hugging Face causal-LM folder; InternLM2.5
    is Llama-shaped once converted). A preset that names a checkpoint keeps its shape,
    which is checked against the checkpoint's before anything starts; with
    shape_from_checkpoint (model=pretrained) the shape is the checkpoint's own."""

    name: str = "1m"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 352
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    init_from: Optional[str] = None           # a local causal-LM folder: the backbone's pre-trained weights
    backbone_tokens: Optional[float] = None   # Dp: the tokens the backbone was pre-trained on
    shape_from_checkpoint: bool = False       # the shape fields above are read from init_from/config.json
    paper_tokens: Optional[float] = None      # the reward-model tokens POLAR trained this preset on
    lm_pretrain_tokens: Optional[float] = None  # CPU studies: first pre-train the backbone as a causal LM on the
                                              # data's corpus for this many tokens (polar.lm_pretrain; cached)
    lm_pretrain_lr: float = 3e-3

    def __post_init__(self) -> None:
        for key in ("backbone_tokens", "paper_tokens", "lm_pretrain_tokens", "lm_pretrain_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0 (or null), got {getattr(self, key)}")
        if self.lm_pretrain_tokens is not None:
            if self.init_from:
                raise ValueError(f"model.lm_pretrain_tokens={self.lm_pretrain_tokens:g} pre-trains a backbone here; "
                                 f"model.init_from={self.init_from} already names one: give one of them")
            if self.backbone_tokens is None:
                self.backbone_tokens = self.lm_pretrain_tokens      # Dp, as for any pre-trained backbone
        if self.shape_from_checkpoint and not self.init_from:
            raise ValueError(f"model={self.name} reads its shape from a checkpoint: give model.init_from=DIR "
                             "(a local Hugging Face causal-LM folder)")
        _positive("model", hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                  intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
                  max_position_embeddings=self.max_position_embeddings,
                  rope_theta=self.rope_theta)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                             f"model.num_kv_heads={self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class PolicySpec:
    """One member of the policy pool.

    kind=ngram: a token n-gram model of `order` trained on corpus `source`, or on part
    `part` of `parts` equal contiguous slices of it (the books of the Bible, the modules
    of the standard library in turn: neighbouring slices write alike, far ones less).
    kind=hf: a transformers causal LM loaded from the local directory `path`.
    """

    name: str = ""
    kind: str = "ngram"
    order: int = 2
    source: str = "stdlib"
    part: int = 0
    parts: int = 1
    path: str = ""
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50

    def __post_init__(self) -> None:
        _one_of("policy", "kind", self.kind, ("ngram", "hf"))
        _positive(f"policy[{self.name}]", temperature=self.temperature, top_p=self.top_p,
                  top_k=self.top_k, order=self.order, parts=self.parts)
        if not 0 <= self.part < self.parts:
            raise ValueError(f"policy[{self.name}].part={self.part} must be in 0..{self.parts - 1} "
                             f"(parts={self.parts})")
        if self.top_p > 1:
            raise ValueError(f"policy[{self.name}].top_p must be in (0, 1], got {self.top_p}")
        if self.kind == "hf" and not self.path:
            raise ValueError(f"policy[{self.name}] of kind 'hf' needs a local model directory in 'path'")
        if not self.name:
            source = self.source if self.parts == 1 else f"{self.source}.{self.part}of{self.parts}"
            self.name = (f"{self.kind}{self.order}-{source}-t{self.temperature:g}"
                         if self.kind == "ngram" else f"hf-{self.path}-t{self.temperature:g}")


CORPUS_SOURCES = ("stdlib", "pydoc", "kjv")  # polar.corpus.SOURCES
CORPUS_FORMATS = ("jsonl", "parquet", "text", "arrow")
ENGINES = ("hf", "vllm")


@dataclass
class CorpusFiles:
    """A corpus source of local files, read lazily with Hugging Face `datasets`: one
    document per row (per line for format=text). `field` names the column holding the
    text, or a list of chat messages ({role, content}), which chat policies render with
    their own chat template."""

    path: str = ""                  # a glob of local files, e.g. /data/web/*.jsonl
    format: str = "jsonl"           # jsonl | parquet | text | arrow
    field: str = "text"             # format=text: always "text"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("a data.corpus entry of files needs 'path' (a glob of local files), e.g. "
                             "{path: /data/web/*.jsonl, format: jsonl, field: text}")
        _one_of("data.corpus", "format", self.format, CORPUS_FORMATS)

    @property
    def name(self) -> str:
        return self.path


def corpus_source(entry: Any) -> "str | CorpusFiles":
    """One data.corpus entry: a built-in source's name, or CorpusFiles (from a mapping)."""
    if isinstance(entry, CorpusFiles):
        return entry
    if isinstance(entry, str):
        _one_of("data", "corpus", entry, CORPUS_SOURCES)
        return entry
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"path", "format", "field"})
        if unknown:
            raise ValueError(f"data.corpus entry {entry} has unknown keys {unknown}; valid: path, format, field")
        return CorpusFiles(**entry)
    raise ValueError(f"data.corpus entry {entry!r} is neither a built-in source {list(CORPUS_SOURCES)} nor "
                     "files {path: GLOB, format: jsonl|parquet|text|arrow, field: NAME}")


def cpu_policy_pool() -> list[PolicySpec]:
    """The default pool: n-gram models of orders 1-3 on each corpus source, sampled at a
    low and a high temperature: 18 policies with distinct but overlapping styles."""
    return [PolicySpec(order=order, source=source, temperature=temperature)
            for order in (1, 2, 3) for source in CORPUS_SOURCES for temperature in (0.7, 1.2)]


@dataclass
class DataConfig:
    """What to synthesize (corpus, tokenizer, policy pool, triplet counts and lengths) and
    how much of it a run may use (max_epochs, which is not part of the data's identity)."""

    corpus: list[Any] = field(default_factory=lambda: list(CORPUS_SOURCES))   # names or CorpusFiles mappings
    tokenizer: str = "bpe"           # "bpe" (train offline) or a local HF tokenizer directory
    vocab_size: int = 1024           # for tokenizer=bpe
    policies: list[PolicySpec] = field(default_factory=cpu_policy_pool)
    n_train: int = 4096
    n_val: int = 256
    prefix_min: int = 8
    prefix_max: int = 24
    max_response_tokens: int = 24    # hf policies stop at their EOS or here; n-gram policies write exactly this many
    val_fraction: float = 0.1        # share of each corpus source held out for val prefixes
    shard_size: int = 1024
    seed: int = 0
    engine: str = "hf"               # how hf policies generate: hf (transformers) | vllm (pip install .[vllm])
    gen_batch_size: int = 64         # prompts per generate call of an hf policy
    max_epochs: float = 1.0          # most passes a run's budget may make over the training triplets

    def __post_init__(self) -> None:
        _positive("data", n_train=self.n_train, n_val=self.n_val, prefix_min=self.prefix_min,
                  prefix_max=self.prefix_max, max_response_tokens=self.max_response_tokens,
                  vocab_size=self.vocab_size, shard_size=self.shard_size,
                  val_fraction=self.val_fraction, gen_batch_size=self.gen_batch_size,
                  max_epochs=self.max_epochs)
        _one_of("data", "engine", self.engine, ENGINES)
        if self.prefix_min > self.prefix_max:
            raise ValueError(f"data.prefix_min={self.prefix_min} must be <= data.prefix_max={self.prefix_max}")
        if not self.corpus:
            raise ValueError(f"data.corpus is empty; list at least one of {list(CORPUS_SOURCES)} or files "
                             "{path: GLOB, format: jsonl|parquet|text|arrow, field: NAME}")
        self.corpus = [corpus_source(entry) for entry in self.corpus]
        self.policies = [p if isinstance(p, PolicySpec) else PolicySpec(**p) for p in self.policies]
        if len(self.policies) < 2:
            raise ValueError(f"data.policies holds {len(self.policies)} policy; POLAR needs at least "
                             "two (a positive pair comes from one policy, the negative from another)")
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            raise ValueError(f"data.policies has duplicate names: {sorted(names)}")

    @property
    def builtin_sources(self) -> list[str]:
        return [s for s in self.corpus if isinstance(s, str)]

    @property
    def source_names(self) -> list[str]:
        """Each corpus source's name: a built-in's, or a file source's glob."""
        return [s if isinstance(s, str) else s.name for s in self.corpus]

    def local_dirs(self, uses_tokenizer: bool = True) -> list[tuple[str, str]]:
        """(config key, path) of every local directory this config names: each hf policy's
        model folder, and the tokenizer folder (unless "bpe", or not used: uses_tokenizer
        is False where a backbone brings its own)."""
        dirs = [(f"data.policies[{i}].path", p.path) for i, p in enumerate(self.policies) if p.kind == "hf"]
        if uses_tokenizer and self.tokenizer != "bpe":
            dirs.insert(0, ("data.tokenizer", self.tokenizer))
        return dirs

    @property
    def mean_prefix_len(self) -> float:
        return (self.prefix_min + self.prefix_max) / 2


@dataclass
class TrainSettings:
    """Optimisation, except the learning rate and batch size: AdamW, warmup then decay,
    clipping, accumulation, evaluation, where to train. A sweep's recipe chooses LR and
    batch per run (sweeps/recipes.py); `for_trainer` adds them, making the TrainConfig that
    the trainer takes."""

    micro_batch_size: int = 0        # 0 = the whole batch at once (no accumulation)
    warmup_fraction: float = 0.05
    schedule: str = "cosine"         # cosine | constant | linear | wsd (warmup, stable, linear decay at the end)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2      # wsd: the share of a run's (or a decay branch's) steps spent decaying
    decay_at: list[float] = field(default_factory=list)   # wsd: fractions of the run's steps where a decay
                                     # branch ends: each branches off the stable phase, decays, and logs its own point
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    n_evals: int = 12                # validation points per run
    eval_spacing: str = "log"        # log | linear in optimizer steps (= in compute)
    packing: bool = False            # shared-prefix packing (naive two-sequence path if False)
    device: str = "auto"             # auto (a GPU where there is one, else the CPU) | cpu | cuda
    threads: int = 0                 # torch threads on the CPU; 0 = leave torch's default
    dtype: str = "auto"              # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    activation_checkpointing: Optional[bool] = None   # None: on where the plan needs it to fit a GPU
    compile: bool = False            # CUDA: torch.compile each decoder layer (speed only: 1.37x for 1.8b on an H200);
                                     # ignored on the CPU, where inductor breaks the packed attention's dynamic shapes
    checkpoint_every_min: float = 0.0  # also checkpoint when this much wall-clock time passed since the last; 0: at evaluations only
    data_workers: int = 0            # DataLoader processes collating batches; 0 = in the training process
    parallel: str = "auto"           # with several ranks: ddp | fsdp | auto (fsdp where one GPU cannot hold the training state)
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("train", n_evals=self.n_evals)
        _one_of("train", "schedule", self.schedule, ("cosine", "constant", "linear", "wsd"))
        self._check_decays()
        _one_of("train", "eval_spacing", self.eval_spacing, ("log", "linear"))
        _one_of("train", "dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _one_of("train", "parallel", self.parallel, ("auto", "ddp", "fsdp"))
        _one_of("train", "device", self.device, ("auto", "cpu", "cuda"))
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not self.checkpoint_every_min >= 0:
            raise ValueError(f"train.checkpoint_every_min must be >= 0 (0: at evaluations only), got "
                             f"{self.checkpoint_every_min}")
        if self.micro_batch_size < 0:
            raise ValueError(f"train.micro_batch_size must be >= 0 (0: no accumulation), got {self.micro_batch_size}")
        if not isinstance(self.data_workers, int) or self.data_workers < 0:
            raise ValueError(f"train.data_workers must be an integer >= 0 (0: collate in the training process), "
                             f"got {self.data_workers!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")

    def _check_decays(self) -> None:
        if not 0 < self.decay_fraction < 1:
            raise ValueError(f"train.decay_fraction must be in (0, 1), got {self.decay_fraction}")
        at = list(self.decay_at)
        if at and self.schedule != "wsd":
            raise ValueError(f"train.decay_at={at} needs train.schedule=wsd (decay branches leave a stable "
                             f"learning rate), got train.schedule={self.schedule}")
        first = self.warmup_fraction / (1 - self.decay_fraction)
        bad = [p for p in at if not first < p < 1]
        if bad or at != sorted(set(at)):
            raise ValueError(f"train.decay_at must be increasing fractions of the run in ({first:.3g}, 1) (a "
                             f"branch starts after the warmup, train.warmup_fraction={self.warmup_fraction}, and "
                             f"decays over train.decay_fraction={self.decay_fraction} of its length; the run's own "
                             f"end is its last point), got {at}")

    def for_trainer(self, lr: float, batch_size: int) -> "TrainConfig":
        """These settings plus the LR and batch size: the trainer's config."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)}, lr=lr,
                           batch_size=batch_size)


@dataclass
class TrainConfig(TrainSettings):
    """What the trainer takes: the settings plus the peak LR and the (global) batch size."""

    lr: float = 1e-3
    batch_size: int = 32             # triplets per optimizer step

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("train", lr=self.lr, batch_size=self.batch_size)
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.micro_batch_size={self.micro_batch_size} must be 0 or divide "
                             f"the batch size {self.batch_size}")
