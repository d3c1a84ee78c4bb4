"""Pure derivation: preset + budget + recipe -> the plan of one training run.

Everything a job or a dry run needs to know before it starts: parameter counts, FLOPs
per token, planned tokens and compute, optimizer steps, batch size and learning rate
(from the job's recipe, sweeps/recipes.py), where it trains (GPUs, or the CPU for
train.device=cpu) and the resources to ask for. No I/O; every function here is a
function of its arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from polar.config import DataConfig, ModelConfig, TrainSettings
from polar.lm_pretrain import BLOCK
from polar.model import ShapeCounts, preset_counts
from sweeps.memory import ADAMW_BYTES_PER_PARAM, MemoryEstimate, estimate, fits, what_would_fit
from sweeps.recipes import FixedRecipe, Recipe
from sweeps.schema import ResourcesConfig


@dataclass(frozen=True)
class Plan:
    model: str
    n_params: int
    n_params_nonembed: int
    flops_per_token: float
    seq_len: float                 # mean tokens per sequence in POLAR's layout
    tokens_per_triplet: float      # tokens per triplet in data terms (two sequences, whatever the path)
    tokens: float                  # planned
    compute: float                 # planned training FLOPs
    batch_size: int
    lr: float
    steps: int
    gpus: int                      # 0: trains on the CPU (train.device=cpu)
    nodes: int
    memory_gb: float               # per GPU; on the CPU, of the whole run
    time_limit_min: int
    gpu_hours: float
    parallel: str = "ddp"          # how the ranks of a multi-GPU job share the model: ddp | fsdp
    n_triplets: int = 0            # training triplets of the data set
    passes: float = 0.0            # passes the budget makes over them (steps x batch / n_triplets)
    gpu_memory: Optional[MemoryEstimate] = None   # per GPU (None on the CPU); says whether checkpointing is on

    @property
    def activation_checkpointing(self) -> bool:
        return self.gpu_memory is not None and self.gpu_memory.checkpointing

    @property
    def on_cpu(self) -> bool:
        return self.gpus == 0


def sequence_lengths(data: DataConfig) -> tuple[float, float]:
    """(mean sequence length, tokens per triplet). A sequence is BOS P R <|reward|> P O END,
    two per triplet: tokens, and so compute, are data terms (what POLAR counts), whatever
    the training path does to go faster (packing computes the shared prefix once)."""
    p, r = data.mean_prefix_len, data.max_response_tokens
    seq = 3 + 2 * p + r + r
    return seq, 2 * seq


def decay_branch_share(train: TrainSettings) -> float:
    """The training a run's WSD decay branches add, as a share of the run's own: each
    branch ending at a fraction p of the run trains decay_fraction x p of its steps. The
    run's tokens and FLOPs (the scaling axes) are its main line's; this is extra cost."""
    return train.decay_fraction * sum(train.decay_at)


def lm_pretrain_flops(model: ModelConfig, counts: ShapeCounts) -> float:
    """FLOPs of the backbone's causal-LM pre-training (model.lm_pretrain_tokens,
    polar.lm_pretrain: blocks of BLOCK tokens, plus the LM head). Whichever job of a size
    comes first trains it and the others load it from the cache, so every job's time limit
    counts it; it is never a scaling axis (the run logs it as backbone_tokens)."""
    if not model.lm_pretrain_tokens:
        return 0.0
    head = 6.0 * model.vocab_size * counts.hidden_size
    return model.lm_pretrain_tokens * (counts.flops_per_token(BLOCK) + head)


def plan_run(model: ModelConfig, data: DataConfig, train: TrainSettings, tokens: float | None,
             flops: float | None, recipe: Optional[Recipe] = None,
             resources: ResourcesConfig = ResourcesConfig(),
             lengths: tuple[float, float] | None = None, counts: ShapeCounts | None = None,
             n_triplets: int | None = None) -> Plan:
    """The plan of one run. Exactly one of tokens / flops is given; recipe: how batch and
    LR follow from the size and the tokens (None: FixedRecipe's defaults). lengths: (mean
    sequence length, tokens per triplet) measured on real data (fine-tuning), instead of
    the synthesis config's (sequence_lengths). counts: a checkpoint's real parameter counts
    (polar.model.checkpoint_counts), instead of the preset's (preset_counts). n_triplets:
    the training set's size (None: data.n_train), for the passes over it."""
    if (tokens is None) == (flops is None):
        raise ValueError("give exactly one budget: budget.tokens=... or budget.flops=... "
                         f"(got tokens={tokens}, flops={flops})")
    recipe = recipe if recipe is not None else FixedRecipe()
    seq, per_triplet = lengths or sequence_lengths(data)
    counts = counts or preset_counts(model)
    fpt = counts.flops_per_token(seq)
    tokens = tokens if tokens is not None else flops / fpt
    n = counts.n_params
    batch, lr = recipe.batch_and_lr(n, counts.hidden_size, tokens)
    # time and GPU-hours: the decay branches and the backbone's LM pre-training too
    work = tokens * fpt * (1 + decay_branch_share(train)) + lm_pretrain_flops(model, counts)
    if train.device == "cpu":
        gpus, nodes, mem, minutes, gpu_hours = 0, 1, round(cpu_state_gb(n), 1), cpu_minutes(work, resources), 0.0
    else:
        gpus, nodes, mem, minutes, gpu_hours = _resources(n, work, resources)
    batch = _split_batch(batch, recipe, model, max(1, gpus), train.micro_batch_size)
    steps = math.floor(tokens / (per_triplet * batch))
    if steps < 1:
        raise ValueError(f"budget too small for one optimizer step of model {model.name!r}: "
                         f"{tokens:.3g} tokens < one batch of {batch} triplets x {per_triplet:.0f} "
                         f"tokens = {batch * per_triplet:.3g}; raise the budget or lower recipe.batch_size")
    one_gpu_holds_state = ADAMW_BYTES_PER_PARAM * n / 1e9 <= 0.6 * resources.gpu_memory_gb
    parallel = train.parallel if train.parallel != "auto" else ("fsdp" if gpus > 1 and not one_gpu_holds_state
                                                                else "ddp")
    n_triplets = n_triplets or data.n_train
    memory = gpu_memory(model, n, data, train, batch, gpus, parallel, resources) if gpus else None
    return Plan(model.name, n, counts.n_params_nonembed, fpt, seq, per_triplet, tokens, tokens * fpt,
                batch, lr, steps, gpus, nodes, mem, minutes, gpu_hours, parallel, n_triplets,
                steps * batch / n_triplets, memory)


def gpu_memory(model: ModelConfig, n: int, data: DataConfig, train: TrainSettings, batch: int, gpus: int,
               parallel: str, res: ResourcesConfig) -> MemoryEstimate:
    """Per-GPU memory at the planned micro-batch: without activation checkpointing where
    that fits (train.activation_checkpointing=null), else with it; a plan that fits
    neither way is refused, naming what would fit."""
    micro = min(train.micro_batch_size or batch, batch // gpus)
    choices = [False, True] if train.activation_checkpointing is None else [train.activation_checkpointing]
    for checkpointing in choices:
        mem = estimate(model, n, data, micro_batch=micro, ranks=gpus, sharded=parallel == "fsdp",
                       packing=train.packing, checkpointing=checkpointing, on_gpu=True,
                       compiled=train.compile)
        if fits(mem, res.gpu_memory_gb):
            return mem
    fix = what_would_fit(model, n, data, micro_batch=micro, ranks=gpus, sharded=parallel == "fsdp",
                         packing=train.packing, compiled=train.compile,
                         gpu_memory_gb=res.gpu_memory_gb, gpus_per_node=res.gpus_per_node)
    raise ValueError(f"model {model.name!r} on {gpus} GPU{'s' * (gpus > 1)} ({parallel}) needs {mem.describe()}, "
                     f"more than {res.gpu_memory_gb:g} GB GPUs hold (90% usable, resources.gpu_memory_gb); "
                     f"it would fit with {fix}")


def synthesis_plan(data: DataConfig, tokens: float, gpu_hours: float) -> Plan:
    """The plan of a `stage=synthesize` job: nothing trained; the tokens its units process
    and their GPU-hours (sweeps.data_sets.estimate). The job itself joins the units'
    parts (a short CPU job)."""
    return Plan("synthesize", 0, 0, 0.0, 0.0, 0.0, tokens, 0.0, 0, 0.0, 0, 0, 1, round(cpu_state_gb(0), 1), 30,
                gpu_hours, "ddp", data.n_train, 0.0)


def passes_refusal(plan: Plan, max_epochs: float) -> str | None:
    """Why a plan repeats its data too often (more than max_epochs passes), or None."""
    if plan.passes <= max_epochs * (1 + 1e-9):
        return None
    most_tokens = max_epochs * plan.n_triplets * plan.tokens_per_triplet
    return (f"model {plan.model!r}: its budget of {plan.tokens:.3g} tokens ({plan.steps} steps x {plan.batch_size} "
            f"triplets) makes {plan.passes:.3g} passes over the data set's {plan.n_triplets:,} training triplets, "
            f"more than data.max_epochs={max_epochs:g} (POLAR trains one pass). Raise data.n_train to at least "
            f"{math.ceil(plan.steps * plan.batch_size / max_epochs):,}, lower the budget to at most "
            f"budget.tokens={most_tokens:.3g}, or allow the repeats with data.max_epochs={math.ceil(plan.passes)}")


def _split_batch(batch: int, recipe: Recipe, model: ModelConfig, ranks: int, micro: int) -> int:
    """The recipe's batch, fitted to the ranks (an equal share each) and to the micro-batch
    (the trainer's TrainConfig needs it to divide the batch): a law's value is rounded up,
    the user's own (recipe.exact_batch) must fit as it is."""
    if not recipe.exact_batch:
        unit = math.lcm(ranks, micro or 1)
        return -(-batch // unit) * unit
    if batch % ranks:
        raise ValueError(f"recipe.batch_size={batch} does not split over the {ranks} GPUs that model "
                         f"{model.name!r} needs; choose a multiple of {ranks}")
    if micro and batch % micro:
        raise ValueError(f"train.micro_batch_size={micro} does not divide recipe.batch_size={batch}; choose a "
                         "micro-batch that divides it, or 0 for none")
    return batch


def _resources(n: int, compute: float, res: ResourcesConfig):
    """GPUs (a power of two that holds the training state with 40% left for activations,
    or resources.gpus where given: the data-parallel width, or as many more as finish within
    resources.target_hours), nodes, memory per GPU, a time limit and the GPU-hours."""
    state_gb = ADAMW_BYTES_PER_PARAM * n / 1e9
    need = max(1, math.ceil(state_gb / (0.6 * res.gpu_memory_gb)))   # 40% left for activations
    gpus = 1 << (need - 1).bit_length()
    if res.gpus:
        if res.gpus < need:
            raise ValueError(f"resources.gpus={res.gpus} cannot hold the training state of {n:.3g} parameters "
                             f"({state_gb:.0f} GB of weights, gradients and AdamW moments): give at least {need}")
        gpus = res.gpus
    elif res.target_hours > 0:    # GPUs for speed: as many as finish within the target (at the assumed MFU)
        one_gpu_hours = compute / (res.gpu_peak_flops * res.assumed_mfu) / 3600
        gpus = max(gpus, 1 << (max(1, math.ceil(one_gpu_hours / res.target_hours)) - 1).bit_length())
    nodes = max(1, math.ceil(gpus / res.gpus_per_node))
    hours = compute / (gpus * res.gpu_peak_flops * res.assumed_mfu) / 3600
    minutes = int(math.ceil(hours * 60 * res.time_margin)) + 10
    return gpus, nodes, round(min(res.gpu_memory_gb, state_gb / gpus * 1.6 + 4), 1), minutes, hours * gpus


def cpu_state_gb(n: int) -> float:
    """Memory of a CPU run of n parameters: AdamW state (weights, grads, two moments) with
    50% for activations and buffers, plus 0.5 GB for the interpreter, torch and the data."""
    return n * ADAMW_BYTES_PER_PARAM / 1e9 * 1.5 + 0.5


def cpu_memory_gb(plan: Plan) -> float:
    """Memory of the plan's run on the CPU (cpu_state_gb)."""
    return cpu_state_gb(plan.n_params)


def cpu_minutes(compute: float, res: ResourcesConfig) -> int:
    """Time limit of a CPU-only run of `compute` FLOPs at resources.cpu_flops, with the
    same margin as on GPUs (x time_margin + 10 min)."""
    return int(math.ceil(compute / res.cpu_flops / 60 * res.time_margin)) + 10


def local_refusal(plan: Plan, res: ResourcesConfig) -> str | None:
    """Why a CPU-only local run of this plan should not start, or None when it may."""
    memory_gb = cpu_memory_gb(plan)
    hours = plan.compute / res.cpu_flops / 3600
    reasons = []
    if memory_gb > res.cpu_memory_gb:
        reasons.append(f"it needs about {memory_gb:.1f} GB of memory (limit resources.cpu_memory_gb="
                       f"{res.cpu_memory_gb:g})")
    if hours > res.cpu_max_hours:
        reasons.append(f"it would take about {hours:.1f} h on this CPU (limit resources.cpu_max_hours="
                       f"{res.cpu_max_hours:g})")
    if not reasons:
        return None
    return (f"model {plan.model!r} ({plan.n_params:.3g} parameters, {plan.compute:.3g} FLOPs) will not run "
            f"locally without a GPU: {' and '.join(reasons)}. Submit it with hydra/launcher=slurm, pick a "
            "smaller preset, or print the plan with hydra/launcher=dryrun.")
