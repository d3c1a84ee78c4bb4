"""The plan of a whole sweep: what every launcher knows before it starts anything.

Owns what the launchers in hydra_plugins/polar_launchers share: every job of a sweep is
composed, converted to a JobConfig and planned before the first one is started or
submitted (`plan_sweep`, with the sweep's errors SweepError and SweepFailed); how many
jobs the local launcher runs at once (`check_n_jobs`, `local_workers`, `largest_first`);
the SLURM resource shape of each job and the grouping of a sweep into one job array per
shape (`shape_of`, `group_by_shape`); and the job table that the dry run and the SLURM
launcher print (`job_table`). Plain Python: no Hydra launcher, no submitit, no MLflow at
import time.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, TypeVar

from hydra.errors import CompactHydraException

from sweeps.schema import JobConfig, ResourcesConfig

if TYPE_CHECKING:   # sweeps.derive imports torch (polar.model): only where a plan is made or read
    from sweeps.derive import Plan


class SweepError(CompactHydraException, ValueError):
    """A sweep that must not start: invalid jobs, no jobs, SLURM unreachable, ...
    (Hydra prints a CompactHydraException as its message alone, without a traceback.)"""


class SweepFailed(CompactHydraException, RuntimeError):
    """A sweep whose jobs ran and at least one of them failed or was cancelled."""


class JobError(CompactHydraException, ValueError):
    """A single run (no -m) that must not start: its config, inputs or plan are invalid.
    Printed as one paragraph, like a SweepError."""


T = TypeVar("T")


@dataclass(frozen=True)
class PlannedJob:
    """One point of the sweep, checked: its index, overrides, typed config and plan."""

    idx: int
    overrides: tuple[str, ...]
    job: JobConfig
    plan: Plan

    @property
    def label(self) -> str:
        return f"#{self.idx} ({shown(self.overrides) or 'no overrides'})"

    @property
    def name(self) -> str:
        return self.plan.model


@dataclass(frozen=True)
class PlainJob:
    """One job of a Hydra app that is not a POLAR sweep (no JobConfig, so no plan; Hydra's
    launcher test suite runs such apps): its index, overrides and composed config."""

    idx: int
    overrides: tuple[str, ...]
    config: Any

    @property
    def name(self) -> str:
        return str(self.config.hydra.job.name)


# ------------------------------------------------------------------ validation

def check_every_job(job_overrides: Sequence[Sequence[str]], build: Callable[[int, tuple[str, ...]], T],
                    initial_idx: int = 0) -> list[T]:
    """build(index, overrides) for every job of the sweep, in order; one SweepError that
    lists every job whose build raised, or a sweep of no jobs."""
    if not job_overrides:
        raise SweepError("the sweep expands to no jobs, so nothing was started: check the sweep's values "
                         "(an empty list such as `seed=range(0)` or an empty hydra.sweeper.params entry); "
                         "a sweep needs at least one value per swept key, e.g. `-m model=1m,3m`")
    built, errors = [], []
    for i, overrides in enumerate(job_overrides):
        idx, ovs = initial_idx + i, tuple(str(o) for o in overrides)
        try:
            built.append(build(idx, ovs))
        except Exception as err:   # collect every bad job, then report them together
            errors.append(f"#{idx} ({shown(ovs) or 'no overrides'}): {_message(err)}")
    if errors:
        raise SweepError(f"{len(errors)} of {len(job_overrides)} jobs of the sweep are invalid; nothing was "
                         "started:\n  " + "\n  ".join(errors))
    return built


def plan_sweep(job_overrides: Sequence[Sequence[str]], compose: Callable[[list[str]], JobConfig],
               initial_idx: int = 0, refuse_local: bool = False, gpu_here: bool = False,
               dry: bool = False) -> list[PlannedJob]:
    """Compose and plan every job; raise one SweepError that lists every bad job.

    compose(overrides) -> JobConfig (the launcher's Hydra composition plus
    sweeps.schema.to_job_config). refuse_local: the jobs run on this machine (the local
    launcher), so derive.local_refusal applies to each job that trains on its CPU: every
    job without a GPU here (gpu_here=False), else those with train.device=cpu. dry: a dry
    run, which also plans jobs whose inputs (a backbone checkpoint, ...) are not on disk.
    """
    from sweeps.derive import local_refusal

    def build(idx: int, overrides: tuple[str, ...]) -> PlannedJob:
        job = compose(list(overrides))
        plan = _plan(job)
        reasons = [] if dry else _missing(job)
        if refuse_local and (plan.on_cpu or not gpu_here) and (refusal := local_refusal(plan, job.resources)):
            reasons.append(refusal)
        if reasons:
            raise SweepError("; ".join(reasons))
        return PlannedJob(idx, overrides, job, plan)

    return check_every_job(job_overrides, build, initial_idx)


def plan_single(compose: Callable[[], JobConfig], gpu_here: bool) -> tuple[JobConfig, Plan]:
    """A single run's (no -m) job and plan, checked as a sweep's jobs are before anything
    starts: the config converts, its inputs are on disk and pass the stage's checks, it
    plans, and on a machine without a GPU (gpu_here=False) derive.local_refusal lets it
    run here. Any of these failing is one JobError naming the problem."""
    from omegaconf.errors import OmegaConfBaseException

    from sweeps.derive import local_refusal
    from sweeps.jobs import plan_job

    try:
        job = compose()
        plan = plan_job(job)
    except (ValueError, OSError, OmegaConfBaseException) as err:
        raise JobError(f"the job is invalid, so nothing was started: {_message(err)}") from None
    if not gpu_here and (refusal := local_refusal(plan, job.resources)):
        raise JobError(f"the job was not started: {refusal}")
    return job, plan


def _plan(job: JobConfig) -> Plan:
    """The job's plan; from its configuration alone where its inputs are not on disk yet."""
    from sweeps.jobs import plan_job

    return plan_job(job, dry=True)


def _missing(job: JobConfig) -> list[str]:
    from sweeps.stages import stage_of

    return stage_of(job).missing(job)


def shown(overrides: Iterable[str]) -> str:
    """Overrides as printed: space-separated, a URI's credentials hidden (sweeps.runs.redact)."""
    from sweeps.runs import redact

    return redact(" ".join(overrides))


def _message(err: BaseException) -> str:
    from sweeps.runs import redact

    text = redact(str(err)).strip() or type(err).__name__
    # OmegaConf/Hydra errors carry a multi-line "full_key: ... object_type=..." trailer
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def compose_with_hydra(hydra_context, config) -> Callable[[list[str]], JobConfig]:
    """compose(overrides) for plan_sweep, as Hydra's launchers compose a sweep's job:
    load_sweep_config, then drop the hydra node and convert to dataclasses."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from sweeps.schema import to_job_config

    def compose(overrides: list[str]) -> JobConfig:
        cfg = hydra_context.config_loader.load_sweep_config(config, overrides)
        HydraConfig.instance().set_config(cfg)   # for ${hydra:...} interpolations in job values
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        return to_job_config(cfg)

    return compose


def check_n_jobs(n_jobs: int | str) -> None:
    """hydra.launcher.n_jobs is a positive int or "auto" (the schema types it Union[int, str])."""
    if isinstance(n_jobs, bool) or not (n_jobs == "auto" or (isinstance(n_jobs, int) and n_jobs >= 1)):
        raise SweepError(f"hydra.launcher.n_jobs={n_jobs!r} is not valid: give a positive integer "
                         "(jobs run at once) or 'auto' (as many as the cores and memory allow)")


def local_workers(n_jobs: int | str, planned: Sequence[PlannedJob], cpus: int, memory_gb: float,
                  gpu: bool = False) -> int:
    """How many jobs of a sweep the local launcher runs at once.

    n_jobs: a positive int (at most that many, never more than there are jobs), or
    "auto": as many as fit the machine's cores when every job pins train.threads
    (cpus // threads), and the memory (80% of memory_gb over the largest job's
    derive.cpu_memory_gb); one when a job uses all cores (threads=0), or when jobs
    train on this machine's GPU (gpu).
    """
    from sweeps.derive import cpu_memory_gb

    check_n_jobs(n_jobs)
    if not planned:
        return 1
    if n_jobs != "auto":
        return min(int(n_jobs), len(planned))
    threads = [p.job.train.threads for p in planned]
    if gpu or min(threads) <= 0:
        return 1
    by_cores = cpus // max(threads)
    by_memory = int(0.8 * memory_gb // max(cpu_memory_gb(p.plan) for p in planned))
    return max(1, min(len(planned), by_cores, by_memory))


def largest_first(planned: Sequence[PlannedJob]) -> list[int]:
    """Positions in ``planned``, the largest planned compute first (ties keep their
    order). Jobs started in this order on a few workers finish sooner: the short jobs
    fill the gaps at the end, instead of one long job running alone after the rest."""
    return sorted(range(len(planned)), key=lambda i: -planned[i].plan.compute)


def machine() -> tuple[int, float]:
    """(usable CPU cores, physical memory in GB) of this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def no_gpu_here() -> bool:
    """True on a machine without a usable CUDA GPU (where the local launcher refuses big jobs)."""
    import torch

    return not torch.cuda.is_available()


# ------------------------------------------------------------------ SLURM shapes

@dataclass(frozen=True)
class Shape:
    """What one SLURM job of a sweep asks for. gpus_per_node=0: no GPU request at all
    (a CPU job, or a CPU cluster without GRES); tasks_per_node = GPUs per node (one task
    per GPU). cpus_per_task None: SLURM's default."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    mem_gb: Optional[int]     # per node; None: the partition's default; 0: all of the node
    timeout_min: int
    cpus_per_task: Optional[int] = None

    def describe(self) -> str:
        gpus = f"{self.gpus_per_node} GPU/node" if self.gpus_per_node else "no GPU"
        cpus = f" x {self.cpus_per_task} CPU{'s' * (self.cpus_per_task > 1)}" if self.cpus_per_task else ""
        mem = "default mem" if self.mem_gb is None else ("all mem" if self.mem_gb == 0 else f"{self.mem_gb} GB/node")
        return (f"{self.nodes} node{'s' * (self.nodes > 1)} x {gpus}, {self.tasks_per_node} task"
                f"{'s' * (self.tasks_per_node > 1)}/node{cpus}, {mem}, {fmt_minutes(self.timeout_min)}")


def shape_of(plan: Plan, res: ResourcesConfig, gpus_per_node: Optional[int] = None,
             nodes: Optional[int] = None, tasks_per_node: Optional[int] = None,
             mem_gb: Optional[int] = None, timeout_min: Optional[int] = None,
             max_timeout_min: Optional[int] = None, cpus_per_task: Optional[int] = None,
             threads: int = 0) -> Shape:
    """The SLURM request for one planned job. Each argument left None comes from the plan;
    a value overrides it for every job. A job that trains on the CPU (train.device=cpu,
    plan.gpus=0), or any job with gpus_per_node=0 (a CPU cluster), asks for no GPU: one
    task, CPU memory and CPU time, and `threads` (train.threads) CPUs per task when > 0.
    max_timeout_min caps the time limit (a job that reaches it is requeued and resumes,
    see max_num_timeout)."""
    from sweeps.derive import cpu_memory_gb, cpu_minutes

    if plan.on_cpu or gpus_per_node == 0:
        n_nodes, gpn, tasks = nodes or 1, 0, tasks_per_node or 1
        mem = math.ceil(cpu_memory_gb(plan)) if mem_gb is None else mem_gb
        minutes = cpu_minutes(plan.compute, res) if timeout_min is None else timeout_min
        cpus = cpus_per_task or (threads if threads > 0 else None)
    else:
        n_nodes = nodes or plan.nodes
        gpn = gpus_per_node or math.ceil(plan.gpus / plan.nodes)
        tasks = tasks_per_node or gpn
        # host RAM per node >= the training state its GPUs hold (checkpoints pass through it)
        mem = math.ceil(plan.memory_gb * gpn) if mem_gb is None else mem_gb
        minutes = plan.time_limit_min if timeout_min is None else timeout_min
        cpus = cpus_per_task
    if max_timeout_min:
        minutes = min(minutes, max_timeout_min)
    return Shape(n_nodes, gpn, tasks, mem if mem is None or mem >= 0 else None, max(1, minutes), cpus)


def job_shape(job: PlannedJob, **overrides) -> Shape:
    """shape_of a planned job, with its resources and train.threads; `overrides` are
    shape_of's (the SLURM launcher's per-job resources, None for "from the plan")."""
    return shape_of(job.plan, job.job.resources, threads=job.job.train.threads, **overrides)


def time_problems(job: PlannedJob, shape: Shape, max_num_timeout: int, signal_delay_s: float) -> list[str]:
    """Why SLURM's limits cannot carry this job to its end: its time limit times
    (max_num_timeout + 1) runs shorter than its estimated time (at resources.cpu_flops or
    the assumed MFU, before any margin), or a signal_delay_s shorter than twice a
    checkpoint of its training state (resources.checkpoint_gb_per_s) and 5 s for a step."""
    from sweeps.derive import ADAMW_BYTES_PER_PARAM

    plan, res = job.plan, job.job.resources
    estimated = plan.compute / res.cpu_flops / 60 if plan.on_cpu else plan.gpu_hours / plan.gpus * 60
    allowed = shape.timeout_min * (max_num_timeout + 1)
    problems = []
    if allowed < estimated:
        problems.append(f"#{job.idx} ({plan.model}) needs about {fmt_minutes(estimated)}, but its time limit "
                        f"{fmt_minutes(shape.timeout_min)} x {max_num_timeout + 1} runs (hydra.launcher.max_num_timeout"
                        f"={max_num_timeout} requeues) allows {fmt_minutes(allowed)}: raise hydra.launcher."
                        f"max_num_timeout to {math.ceil(estimated / shape.timeout_min) - 1} or the time limit")
    state_gb = ADAMW_BYTES_PER_PARAM * plan.n_params / 1e9
    seconds = 2 * state_gb / res.checkpoint_gb_per_s + 5
    if signal_delay_s < seconds:
        problems.append(f"#{job.idx} ({plan.model}): hydra.launcher.signal_delay_s={signal_delay_s:g} does not cover "
                        f"twice a checkpoint of its {state_gb:.0f} GB training state and a step (~{seconds:.0f} s at "
                        f"resources.checkpoint_gb_per_s={res.checkpoint_gb_per_s:g}): set hydra.launcher."
                        f"signal_delay_s={math.ceil(seconds / 60) * 60}")
    return problems


def group_by_shape(jobs: Iterable[PlannedJob], shape: Callable[[PlannedJob], Shape]) -> dict[Shape, list[PlannedJob]]:
    """Jobs grouped by resource shape, in order of first appearance: one job array each."""
    groups: dict[Shape, list[PlannedJob]] = {}
    for job in jobs:
        groups.setdefault(shape(job), []).append(job)
    return groups


# ------------------------------------------------------------------ the job table

def fmt_count(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def fmt_minutes(minutes: float) -> str:
    minutes = int(math.ceil(minutes))
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return (f"{days}d" if days else "") + f"{hours:d}h{mins:02d}m"


def fmt_hours(hours: float) -> str:
    if hours == 0:
        return "0"
    return f"{hours:.3g}" if hours >= 0.01 else f"{hours:.1e}"


TABLE_COLUMNS = ("#", "model", "N", "tokens", "FLOPs", "steps", "lr", "batch", "triplets", "passes", "GPUs",
                 "parallel", "nodes", "time limit", "GPU-hours", "mem/GPU", "swept overrides")


def fmt_memory(plan: Plan) -> str:
    """A GPU plan's memory per GPU (sweeps.memory), "+ckpt" with activation checkpointing."""
    mem = plan.gpu_memory
    return "-" if mem is None else f"{mem.total_gb:.0f}G" + ("+ckpt" if mem.checkpointing else "")


def varying_overrides(jobs: Sequence[PlannedJob]) -> list[str]:
    """Per job, only its overrides whose key takes more than one value in the sweep (the
    grid's coordinates); the ones shared by every job are left out."""
    values: dict[str, set[str]] = {}
    for j in jobs:
        for o in j.overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return [shown(o for o in j.overrides if len(values[o.partition("=")[0]]) > 1) for j in jobs]


def table_rows(jobs: Sequence[PlannedJob]) -> list[list[str]]:
    rows = []
    for j, varying in zip(jobs, varying_overrides(jobs)):
        p = j.plan
        rows.append([str(j.idx), p.model, fmt_count(p.n_params), fmt_count(p.tokens), f"{p.compute:.3g}",
                     str(p.steps), f"{p.lr:.3g}", str(p.batch_size), fmt_count(p.n_triplets), f"{p.passes:.3g}",
                     str(p.gpus),
                     p.parallel if p.gpus > 1 else "-", str(p.nodes),
                     fmt_minutes(p.time_limit_min), fmt_hours(p.gpu_hours), fmt_memory(p), varying])
    return rows


def job_table(jobs: Sequence[PlannedJob]) -> str:
    """The sweep as a readable table, one row per job, plus a totals line."""
    rows = table_rows(jobs)
    total = ["total", f"{len(jobs)} jobs", "",
             fmt_count(sum(j.plan.tokens for j in jobs)), f"{sum(j.plan.compute for j in jobs):.3g}",
             str(sum(j.plan.steps for j in jobs)), "", "", "", "", str(sum(j.plan.gpus for j in jobs)), "",
             str(sum(j.plan.nodes for j in jobs)), "", fmt_hours(sum(j.plan.gpu_hours for j in jobs)), "", ""]
    table = [list(TABLE_COLUMNS), *rows, total]
    widths = [max(len(r[c]) for r in table) for c in range(len(TABLE_COLUMNS))]
    right = {"N", "tokens", "FLOPs", "steps", "lr", "batch", "triplets", "passes", "GPUs", "nodes", "time limit",
             "GPU-hours", "mem/GPU"}

    def line(r: list[str]) -> str:
        cells = [v.rjust(w) if TABLE_COLUMNS[c] in right else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *map(line, rows), rule, line(total)])


def print_flush(text: str, file=None) -> None:
    print(text, file=file or sys.stdout, flush=True)
