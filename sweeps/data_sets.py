"""The data sets of a sweep: which ones its jobs need, what synthesizing them costs, and
making each one once, before the jobs that train on it start.

A pretrain or synthesize job names its data set by its data config and the tokenizer
its prefixes are cut with: the folder paths.cache_dir/data/<key> (polar.inputs.data_dir).
Local launchers synthesize each missing data set here, once, one policy at a time
(`synthesize_missing`); the SLURM launcher submits its units of work as job arrays and
the sweep's jobs with a dependency on them (hydra_plugins/polar_launchers/slurm.py,
`prepare_units`). `estimate` (pure) says what the units of a data config cost; the dry
run and the SLURM launcher print it (`unit_table`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from polar.config import DataConfig, ModelConfig
from sweeps.schema import JobConfig, ResourcesConfig

DATA_STAGES = ("pretrain", "synthesize")
BF16_BYTES = 2


@dataclass(frozen=True)
class UnitEstimate:
    """What one policy's units of work cost (expected values; an upper bound on tokens,
    since a trajectory may end at EOS before max_response_tokens)."""

    policy: str
    kind: str
    n_params: Optional[int]       # None: an n-gram policy, or an hf folder not on disk yet
    units: int                    # one per shard (at most)
    requests: float               # trajectories it writes
    tokens: float                 # prompt + generated tokens it processes, at most
    gpus: int                     # per unit; 0: a CPU unit
    gpu_hours: float


@dataclass
class DataSet:
    """One data set a sweep needs, and the jobs (indices) that need it."""

    data: DataConfig
    model: ModelConfig
    cache_dir: str
    jobs: list

    @property
    def dir(self) -> Path:
        from polar.inputs import data_dir

        return data_dir(self.data, self.model, self.cache_dir)

    @property
    def ready(self) -> bool:
        from polar.synthesis import MANIFEST

        return (self.dir / MANIFEST).exists()

    @property
    def name(self) -> str:
        return self.dir.name


def estimate(data: DataConfig, sizes: Sequence[Optional[int]], res: ResourcesConfig) -> list[UnitEstimate]:
    """Per policy: units, trajectories, tokens, GPUs per unit and GPU-hours (pure).
    sizes: each policy's parameter count (None for n-gram policies). Each row draws an
    ordered pair of distinct policies, so a policy writes 3/P trajectories per row."""
    rows, n_pol = data.n_train + data.n_val, len(data.policies)
    shards = math.ceil(data.n_train / data.shard_size) + math.ceil(data.n_val / data.shard_size)
    out = []
    for spec, n in zip(data.policies, sizes):
        requests = 3 * rows / n_pol
        tokens = requests * (data.mean_prefix_len + data.max_response_tokens)
        gpus = unit_gpus(n, res) if spec.kind == "hf" and n else 0
        hours = 2 * n * tokens / (res.gpu_peak_flops * res.generation_mfu) / 3600 * max(gpus, 1) if gpus else 0.0
        out.append(UnitEstimate(spec.name, spec.kind, n, shards, requests, tokens, gpus, hours))
    return out


def unit_gpus(n_params: int, res: ResourcesConfig) -> int:
    """GPUs one unit of a policy of n_params needs: its bf16 weights with 25% for the KV
    cache and activations, in 90% of each GPU's memory."""
    need_gb = BF16_BYTES * n_params * 1.25 / 1e9
    return max(1, math.ceil(need_gb / (0.9 * res.gpu_memory_gb)))


def policy_sizes(data: DataConfig) -> list[Optional[int]]:
    """Each policy's parameter count, where its folder is on disk (None otherwise)."""
    from polar.policies import policy_size

    return [policy_size(p) if p.kind == "hf" and Path(p.path).is_dir() else None for p in data.policies]


def refusal(estimates: Sequence[UnitEstimate], res: ResourcesConfig) -> Optional[str]:
    """Why the units cannot run on this cluster's GPU shape (a policy larger than one
    node's GPUs), or None."""
    big = [e for e in estimates if e.gpus > res.gpus_per_node]
    if not big:
        return None
    return "; ".join(f"policy {e.policy!r} ({e.n_params:.3g} parameters) needs {e.gpus} GPUs of "
                     f"{res.gpu_memory_gb:g} GB for one unit, more than resources.gpus_per_node="
                     f"{res.gpus_per_node}" for e in big) + " (use a smaller policy, or GPUs with more memory: " \
        "resources.gpu_memory_gb)"


def needed(jobs: Iterable) -> list[DataSet]:
    """The distinct data sets of a sweep's jobs (sweeps.sweep_plan.PlannedJob, or plain
    JobConfigs, numbered from 0) that synthesize or pre-train, in order of first use."""
    found: dict[Path, DataSet] = {}
    for i, planned in enumerate(jobs):
        job: JobConfig = getattr(planned, "job", planned)
        if job.stage not in DATA_STAGES:
            continue
        ds = DataSet(job.data, job.model, job.paths.cache_dir, [])
        found.setdefault(ds.dir, ds).jobs.append(getattr(planned, "idx", i))
    return list(found.values())


def synthesize_missing(data_sets: Sequence[DataSet]) -> None:
    """Each data set that is not there yet synthesized here, once (with its progress); a
    bad corpus or policy is a SweepError naming the data set and its jobs."""
    from polar.inputs import synthesized_data

    for ds in data_sets:
        if not ds.ready:
            print(f"[data] synthesizing data set {ds.name} for jobs "
                  f"{' '.join(f'#{i}' for i in ds.jobs)} in {ds.dir}", flush=True)
        with refused_as_sweep_error(ds):
            synthesized_data(ds.data, ds.model, ds.cache_dir)


@contextmanager
def refused_as_sweep_error(ds: DataSet):
    """A data set that cannot be made (prefixes longer than its documents, a policy that
    does not load, a failed unit) ends the sweep in one paragraph, before its jobs start;
    what was written stays."""
    from sweeps.sweep_plan import SweepError

    try:
        yield
    except (ValueError, OSError, RuntimeError) as err:
        raise SweepError(f"data set {ds.name} (for jobs {' '.join(f'#{i}' for i in ds.jobs)}) could not be "
                         f"made, so no job was started: {err}") from err


def prepare_units(ds: DataSet) -> list:
    """Plan a missing data set here (cheap: prefixes and pairs) and return its pending
    units of work (polar.synthesis.Unit), for job arrays."""
    from polar.inputs import data_tokenizer
    from polar.synthesis import prepare

    with refused_as_sweep_error(ds):
        tok, _ = data_tokenizer(ds.data, ds.model, ds.cache_dir)
        return prepare(ds.data, tok, ds.dir)


def unit_table(data_sets: Sequence[DataSet], res: ResourcesConfig) -> str:
    """The synthesis units of the data sets not there yet, one line per policy."""
    from sweeps.sweep_plan import fmt_count, fmt_hours

    lines = []
    for ds in data_sets:
        if ds.ready:
            lines.append(f"data set {ds.name} (jobs {' '.join(f'#{i}' for i in ds.jobs)}): synthesized, nothing to do")
            continue
        est = estimate(ds.data, policy_sizes(ds.data), res)
        lines.append(f"data set {ds.name} (jobs {' '.join(f'#{i}' for i in ds.jobs)}): to synthesize first, "
                     f"{sum(e.units for e in est)} units of work (policy x shard), "
                     f"{fmt_hours(sum(e.gpu_hours for e in est))} GPU-hours")
        for e in est:
            size = fmt_count(e.n_params) if e.n_params else ("n-gram" if e.kind == "ngram" else "?")
            unknown = e.kind == "hf" and not e.n_params          # its folder is not on disk yet
            where = f"{e.gpus} GPU{'s' * (e.gpus > 1)}/unit" if e.gpus else ("GPUs ?" if unknown else "CPU")
            hours = "?" if unknown else fmt_hours(e.gpu_hours)
            lines.append(f"  {e.policy}: {size}, {e.units} units, ~{fmt_count(e.requests)} trajectories, "
                         f"<= {fmt_count(e.tokens)} tokens, {where}, {hours} GPU-hours")
    return "\n".join(lines)
