"""Pure derivation: preset + budget (+ recipe) -> the plan of one training run.

Everything a job or a dry run needs to know before it starts: parameter counts, FLOPs
per token, planned tokens and compute, optimizer steps, batch size, learning rate and
the resources to ask for. No I/O; every function here is a function of its arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from polar.config import DataConfig, ModelConfig, TrainConfig
from polar.model import flops_per_token, n_params, n_params_nonembed

ADAMW_BYTES_PER_PARAM = 16   # fp32 weights + grads + two Adam moments


@dataclass
class ResourcesConfig:
    """How to size a job on GPUs, and when a CPU-only machine should refuse it."""

    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    gpu_peak_flops: float = 989e12          # H100 SXM dense bf16
    assumed_mfu: float = 0.35
    time_margin: float = 1.5                # requested time = estimate x margin (+ 10 min)
    cpu_flops: float = 1e10                 # fp32 training on a laptop core; tiny models are overhead-bound
    cpu_memory_gb: float = 8.0              # refuse local CPU runs that need more
    cpu_max_hours: float = 2.0              # refuse local CPU runs that would take longer


@dataclass(frozen=True)
class Plan:
    model: str
    n_params: int
    n_params_nonembed: int
    flops_per_token: float
    seq_len: float                 # mean tokens per sequence in POLAR's layout
    tokens_per_triplet: float      # tokens the training path processes per triplet
    tokens: float                  # planned
    compute: float                 # planned training FLOPs
    batch_size: int
    lr: float
    steps: int
    gpus: int
    nodes: int
    memory_gb: float
    time_limit_min: int
    gpu_hours: float
    parallel: str = "ddp"          # how the ranks of a multi-GPU job share the model: ddp | fsdp


def sequence_lengths(data: DataConfig, packing: bool = False) -> tuple[float, float]:
    """(mean sequence length, tokens processed per triplet). A sequence is
    BOS P R <|reward|> P O END; the naive path processes two per triplet, the packed path
    the shared prefix once and each candidate with its END. Tokens, and so compute,
    count what the training path processes."""
    p, r = data.mean_prefix_len, data.response_len
    seq = 3 + 2 * p + r + r
    return seq, (2 + 2 * p + r + 2 * (r + 1)) if packing else 2 * seq


def polar_lr(n_params: float, backbone_tokens: float, rm_tokens: float) -> float:
    """POLAR's fitted LR law; N in millions of parameters, token counts in billions."""
    return 2.306e-4 * (n_params / 1e6) ** 0.01125 * (backbone_tokens / 1e9) ** -0.66587 \
        * (rm_tokens / 1e9) ** 0.33916


def polar_batch_size(n_params: float, rm_tokens: float) -> float:
    """POLAR's fitted batch-size law (in sequences); N in millions, tokens in billions."""
    return 31.9032 * (n_params / 1e6) ** 0.06944 * (rm_tokens / 1e9) ** 0.52997


def plan_run(model: ModelConfig, data: DataConfig, train: TrainConfig, tokens: float | None,
             flops: float | None, recipe: str = "fixed", backbone_tokens: float = 0.0,
             resources: ResourcesConfig = ResourcesConfig(),
             lengths: tuple[float, float] | None = None) -> Plan:
    """The plan of one run. Exactly one of tokens / flops is given. lengths: (mean
    sequence length, tokens per triplet) measured on real data (fine-tuning), instead of
    the synthesis config's (sequence_lengths)."""
    if (tokens is None) == (flops is None):
        raise ValueError("give exactly one budget: budget.tokens=... or budget.flops=... "
                         f"(got tokens={tokens}, flops={flops})")
    seq, per_triplet = lengths or sequence_lengths(data, train.packing)
    fpt = flops_per_token(model, seq)
    tokens = tokens if tokens is not None else flops / fpt
    n = n_params(model)
    batch, lr = _recipe(recipe, train, n, tokens, backbone_tokens)
    if recipe == "fixed" and train.lr_width_ref > 0:
        lr = lr * train.lr_width_ref / model.hidden_size
    gpus, nodes, mem, minutes, gpu_hours = _resources(n, tokens * fpt, resources)
    if recipe != "fixed":
        batch = -(-batch // gpus) * gpus             # every rank gets an equal share
    if batch % gpus:
        raise ValueError(f"train.batch_size={batch} does not split over the {gpus} GPUs that model "
                         f"{model.name!r} needs; choose a multiple of {gpus}")
    steps = math.floor(tokens / (per_triplet * batch))
    if steps < 1:
        raise ValueError(f"budget too small for one optimizer step of model {model.name!r}: "
                         f"{tokens:.3g} tokens < one batch of {batch} triplets x {per_triplet:.0f} "
                         f"tokens = {batch * per_triplet:.3g}; raise the budget or lower train.batch_size")
    parallel = train.parallel if train.parallel != "auto" else ("fsdp" if gpus > 1 else "ddp")
    return Plan(model.name, n, n_params_nonembed(model), fpt, seq, per_triplet, tokens, tokens * fpt,
                batch, lr, steps, gpus, nodes, mem, minutes, gpu_hours, parallel)


def _recipe(recipe: str, train: TrainConfig, n: int, tokens: float, backbone_tokens: float):
    if recipe == "fixed":
        return train.batch_size, train.lr
    if backbone_tokens <= 0:
        raise ValueError("recipe=polar_law needs train.backbone_tokens (the backbone's pre-training "
                         "tokens, e.g. 2e12), got {backbone_tokens}")
    return max(1, round(polar_batch_size(n, tokens))), polar_lr(n, backbone_tokens, tokens)


def _resources(n: int, compute: float, res: ResourcesConfig):
    """GPUs (a power of two), nodes, memory per GPU, a time limit and the GPU-hours."""
    state_gb = ADAMW_BYTES_PER_PARAM * n / 1e9
    need = max(1, math.ceil(state_gb / (0.6 * res.gpu_memory_gb)))   # 40% left for activations
    gpus = 1 << (need - 1).bit_length()
    nodes = max(1, math.ceil(gpus / res.gpus_per_node))
    hours = compute / (gpus * res.gpu_peak_flops * res.assumed_mfu) / 3600
    minutes = int(math.ceil(hours * 60 * res.time_margin)) + 10
    return gpus, nodes, round(min(res.gpu_memory_gb, state_gb / gpus * 1.6 + 4), 1), minutes, hours * gpus


def cpu_memory_gb(plan: Plan) -> float:
    """Memory of a CPU run: AdamW state (weights, grads, two moments) with 50% for
    activations and buffers, plus 0.5 GB for the interpreter, torch and the data."""
    return plan.n_params * ADAMW_BYTES_PER_PARAM / 1e9 * 1.5 + 0.5


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
