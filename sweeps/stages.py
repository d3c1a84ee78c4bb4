"""A job's stage: what it checks before anything starts, what it hashes into the run key,
what it measures for the plan, and how it builds its RunInputs (polar.inputs).

- pretrain: synthesized data (cached by content) and a randomly initialised model of the
  `model` preset; nothing to measure (lengths come from the data config).
- synthesize: the pretrain stage's data set only (no model, no run; sweeps.jobs.synthesize_job).
- finetune: a saved POLAR model (`finetune.init_from`, checked against the `model`
  preset's shape) and the reference implementation's preference JSONL; the plan uses the
  data's measured lengths and, without a budget, one epoch. Measuring reads and tokenizes
  the files once per process (`measure` and `inputs` share the result).

sweeps.jobs runs every stage the same way: plan -> track -> build inputs -> fit -> save.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from polar.inputs import RunInputs
from polar.model import ShapeCounts
from sweeps import schema
from sweeps.schema import JobConfig


@dataclass(frozen=True)
class Measured:
    """Lengths of a stage's real data, for the plan (pure planning takes them as input)."""

    n_triplets: int
    seq_len: float                 # mean tokens per sequence in POLAR's layout
    tokens_per_triplet: float      # tokens per triplet in data terms (two sequences)


class Stage:
    """What every stage answers; the defaults are a stage with nothing to check, hash,
    measure or start from beyond the job config itself."""

    name, suffix = "", ""          # `stage=NAME`; what the run name carries

    def missing(self, job: JobConfig) -> list[str]:
        """Inputs on disk the job names that are not there (a dry run lists them; every
        other launcher refuses the job)."""
        return []

    def check(self, job: JobConfig) -> None:
        """Refuse the job before anything starts (bad inputs on disk)."""

    def counts(self, job: JobConfig) -> ShapeCounts | None:
        """The real model's parameter counts, where its shape comes from a checkpoint."""
        return None

    def key_extras(self, job: JobConfig) -> dict:
        """What the run key hashes beyond the job config (e.g. input files' contents)."""
        return {}

    def measure(self, job: JobConfig) -> Measured | None:
        """The real data's lengths for the plan; None: the data config's are used."""
        return None

    def inputs(self, job: JobConfig, with_model: bool = True) -> RunInputs:
        """What the run consumes; with_model=False: all but the model (None), for FSDP ranks
        that receive their shards from rank 0 (polar.distributed.shard_from_rank0)."""
        raise NotImplementedError(f"stage {self.name!r} builds no inputs")

    def init_from(self, job: JobConfig) -> str | None:
        """The model the run starts from (a run parameter), None for random weights."""
        return None


class Pretrain(Stage):
    name = "pretrain"

    def missing(self, job: JobConfig) -> list[str]:
        path = job.model.init_from
        return ([f"model.init_from={path} (model={job.model.name}'s backbone) is not on disk: put the checkpoint "
                 "there, or point paths.models_dir ($POLAR_MODELS_DIR) or model.init_from at it"]
                if path and not Path(path).exists() else []) + _missing_data_dirs(job)

    def check(self, job: JobConfig) -> None:
        from polar.model import check_backbone, checkpoint_shape
        from polar.tokenizer import backbone_tokenizer

        check_data(job)
        path = job.model.init_from
        if not path:
            return
        check_backbone(path, None if job.model.shape_from_checkpoint else job.model)
        rows, tokens = checkpoint_shape(path)["vocab_size"], len(backbone_tokenizer(path))
        if tokens > rows + 3:          # beyond POLAR's <|reward|>, [UNUSED_TOKEN_130] and a pad token
            raise ValueError(f"model.init_from {path!r}: its tokenizer has {tokens} tokens but its embedding "
                             f"{rows} rows: not the tokenizer the model was trained with")

    def counts(self, job: JobConfig) -> ShapeCounts | None:
        from polar.model import checkpoint_counts
        from polar.tokenizer import backbone_tokenizer

        if not job.model.init_from:
            return None
        return checkpoint_counts(job.model.init_from, len(backbone_tokenizer(job.model.init_from)))

    def init_from(self, job: JobConfig) -> str | None:
        return str(Path(job.model.init_from).resolve()) if job.model.init_from else None

    def inputs(self, job: JobConfig, with_model: bool = True) -> RunInputs:
        from polar.inputs import pretrain_inputs

        return pretrain_inputs(job.model, job.data, job.paths.cache_dir, job.seed, with_model)


class Synthesize(Pretrain):
    """`stage=synthesize`: only the data set a pretrain job of the same config would train
    on (cut with the same tokenizer); no model is trained. Its plan is the units' cost."""

    name, suffix = "synthesize", "-data"

    def counts(self, job: JobConfig) -> ShapeCounts | None:
        return None

    def inputs(self, job: JobConfig, with_model: bool = True) -> RunInputs:
        raise NotImplementedError("stage=synthesize trains nothing (sweeps.jobs.synthesize_job)")


class Finetune(Stage):
    name, suffix = "finetune", "-ft"

    def missing(self, job: JobConfig) -> list[str]:
        ft = job.finetune
        return [f"finetune.{k}={v} is not on disk" for k, v in
                (("init_from", ft.init_from), ("train_path", ft.train_path), ("val_path", ft.val_path))
                if v is not None and not Path(v).exists()]

    def check(self, job: JobConfig) -> None:
        check_init_from(job)

    def key_extras(self, job: JobConfig) -> dict:
        from polar.inputs import preference_data_id

        ft = job.finetune
        return {"finetune": {**asdict(ft), "data_id": preference_data_id(ft.train_path, ft.val_path),
                             "init_from": _model_identity(ft.init_from)}}

    def measure(self, job: JobConfig) -> Measured:
        _, train, _ = _finetune_data(job)
        per_triplet = train.naive_tokens()                  # data terms, packed or not
        return Measured(len(train), float(per_triplet.mean()) / 2, float(per_triplet.mean()))

    def inputs(self, job: JobConfig, with_model: bool = True) -> RunInputs:
        from polar.inputs import finetune_inputs, preference_data_id

        tokenizer, train, val = _finetune_data(job)
        data_id = preference_data_id(job.finetune.train_path, job.finetune.val_path)
        return finetune_inputs(job.finetune.init_from, tokenizer, train, val, data_id, with_model)

    def init_from(self, job: JobConfig) -> str | None:
        return str(Path(job.finetune.init_from).resolve())


STAGES = {s.name: s for s in (Pretrain(), Finetune(), Synthesize())}
assert tuple(STAGES) == schema.STAGES, "sweeps.schema.STAGES and sweeps.stages.STAGES must agree"


def stage_of(job: JobConfig):
    return STAGES[job.stage]


def _missing_data_dirs(job: JobConfig) -> list[str]:
    """The data config's local folders (hf policies, a tokenizer) that are not directories."""
    from polar.config import missing_dir

    return [missing_dir(path, key) for key, path in job.data.local_dirs(uses_tokenizer=not job.model.init_from)
            if not Path(path).expanduser().is_dir()]


def check_data(job: JobConfig) -> None:
    """The data config's inputs on disk, before anything starts: corpus files that match
    and hold their field, hf policies that are causal LMs with a tokenizer."""
    from polar.config import CorpusFiles, local_dir
    from polar.corpus import check_files
    from polar.policies import causal_lm_config, policy_tokenizer

    for source in job.data.corpus:
        if isinstance(source, CorpusFiles):
            check_files(source)
    for i, spec in enumerate(job.data.policies):
        if spec.kind == "hf":
            path = local_dir(spec.path, f"data.policies[{i}].path")
            causal_lm_config(spec, path)
            policy_tokenizer(spec, path)


def check_init_from(job: JobConfig) -> Path:
    """The starting model directory, checked against the `model` preset's shape."""
    path = Path(job.finetune.init_from)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"finetune.init_from={str(path)!r} is not a POLAR model directory (no config.json); "
                         "give a pre-training run's model folder, e.g. outputs/runs/<run key>/model")
    from polar.model import hf_shape

    saved, preset = json.loads(config.read_text()), hf_shape(job.model)
    differ = {k: (saved.get(k), v) for k, v in preset.items() if saved.get(k) != v}
    if differ:
        raise ValueError(f"finetune.init_from={str(path)!r} does not have the shape of model={job.model.name!r}: "
                         + ", ".join(f"{k} {a} (saved) != {b} (preset)" for k, (a, b) in differ.items())
                         + "; pick the preset the model was pre-trained with")
    return path


def _finetune_data(job: JobConfig):
    """(tokenizer, train, val); the starting model was checked by `check` (plan_job)."""
    ft = job.finetune
    return _preference_data(str(ft.init_from), ft.train_path, ft.val_path, ft.val_fraction, job.seed,
                            ft.wrapper)


@functools.lru_cache(maxsize=8)
def _preference_data(init_from, train_path, val_path, val_fraction, seed, wrapper):
    """Read and tokenized once per process (planning and training both need them)."""
    from polar.inputs import finetune_data
    from polar.template import Layout

    return finetune_data(init_from, train_path, val_path, val_fraction, seed, Layout(wrapper=wrapper))


def _model_identity(path: str) -> dict:
    """Which starting model: its folder, and size and mtime of its weights (cheap to take
    for a 7B model, unlike a hash)."""
    weights = sorted(Path(path).glob("*.safetensors"))
    return {"path": str(Path(path).resolve()),
            "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}
