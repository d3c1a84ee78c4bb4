"""Pure: how much memory one rank of a training run needs, before anything starts.

Per rank: the fp32 weights, their gradients and AdamW's two moments (16 bytes per
parameter; FSDP shards all of it over the ranks, DDP keeps a full copy on each), plus
the activations that the backward pass keeps for one micro-batch of the data set's
longest rows, plus a fixed overhead (CUDA context, kernels' workspaces, allocator slack).

Activations of a decoder layer, per token, are the tensors autograd saves. With fused
kernels (torch.compile'd layers on GPUs, `train.compile`) or in fp32 on the CPU: the inputs
of the two norms and of every matmul (hidden 6h, q/k/v 2 x kv dim, MLP 4 x intermediate),
in the compute dtype (2 bytes under bf16 autocast, 4 in fp32). Eager layers under bf16
autocast keep more (measured on an H200, bench/README.md): the RMSNorms compute in fp32
(input and normalised output, 16h bytes), every projection saves its own bf16 cast of its
input (10h), plus rotated q and k, v, the attention output and its transposed copy, and
four MLP tensors: 32h + 4kv + 8I bytes; and autocast keeps a bf16 copy of every weight for
the step (2 bytes per parameter; not under FSDP, whose parameters are gathered in bf16).
A fused attention kernel (FlexAttention, SDPA's flash/memory-efficient kernels on GPUs)
keeps no scores; the CPU's masked SDPA keeps the scores and the probabilities
(2 x heads x T^2 per sequence). With activation checkpointing a layer keeps only its
input (the fp32 residual stream in eager layers) and one layer at a time is recomputed
in full during the backward pass.

`estimate` is what the dry run shows and what the plan checks (`fits`); tests compare it
with the tensors a real step holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from polar.config import DataConfig, ModelConfig
from polar.template import N_SPECIAL, Layout

ADAMW_BYTES_PER_PARAM = 16        # fp32 weights + grads + two Adam moments
GPU_OVERHEAD_GB = 2.0             # CUDA context, workspaces, allocator fragmentation
USABLE_FRACTION = 0.9             # of a GPU's memory a plan may fill


@dataclass(frozen=True)
class MemoryEstimate:
    """Per rank, in GB."""

    state_gb: float               # weights + grads + AdamW moments (this rank's share)
    activations_gb: float         # one micro-batch of the longest rows
    overhead_gb: float
    micro_batch: int              # triplets per micro-batch (per rank)
    row_tokens: int               # tokens of the longest sequence (naive) or packed triplet
    checkpointing: bool
    casts_gb: float = 0.0         # autocast's bf16 copies of the weights (eager layers, not FSDP)

    @property
    def total_gb(self) -> float:
        return self.state_gb + self.casts_gb + self.activations_gb + self.overhead_gb

    def describe(self) -> str:
        casts = f", bf16 weight copies {self.casts_gb:.1f}" if self.casts_gb else ""
        return (f"{self.total_gb:.1f} GB per GPU (state {self.state_gb:.1f}{casts}, activations "
                f"{self.activations_gb:.1f} at micro-batch {self.micro_batch} of rows of {self.row_tokens:,} tokens"
                f"{', checkpointed' if self.checkpointing else ''}, overhead {self.overhead_gb:.1f})")


def longest_row(data: DataConfig, packing: bool, layout: Layout = Layout()) -> int:
    """Tokens of the data set's longest training row: a sequence BOS P R <|reward|> P O END
    (naive), or a packed triplet (the shared prefix once, both candidates), as POLAR's
    layout truncates them (layout.max_length per sequence)."""
    p, r = data.prefix_max, data.max_response_tokens
    seq = min(N_SPECIAL + 2 * p + 2 * r, layout.max_length)
    return min(N_SPECIAL - 1 + 2 * p + 3 * r + 2, 2 * seq) if packing else seq


def layer_bytes_per_token(model: ModelConfig, on_gpu: bool, compiled: bool) -> float:
    """Bytes one decoder layer keeps for the backward pass per token (fused attention)."""
    h, kv, inter = model.hidden_size, model.num_kv_heads * model.head_dim, model.intermediate_size
    if on_gpu and not compiled:          # eager under bf16 autocast (module docstring)
        return 32 * h + 4 * kv + 8 * inter
    return (2 if on_gpu else 4) * (6 * h + 2 * kv + 4 * inter)


def activation_bytes_per_token(model: ModelConfig, on_gpu: bool, compiled: bool, checkpointing: bool) -> float:
    """Bytes autograd keeps per token for the whole model (fused attention: no scores)."""
    layer = layer_bytes_per_token(model, on_gpu, compiled)
    residual = 2 if on_gpu and compiled else 4           # the residual stream (fp32 in eager layers)
    if checkpointing:   # each layer's input, plus one layer recomputed at a time
        return residual * (model.num_layers + 2) * model.hidden_size + layer
    return model.num_layers * layer + residual * 2 * model.hidden_size


def estimate(model: ModelConfig, n_params: int, data: DataConfig, *, micro_batch: int, ranks: int, sharded: bool,
             packing: bool, checkpointing: bool, on_gpu: bool, compiled: bool = False) -> MemoryEstimate:
    """One rank's memory for this run (see the module docstring)."""
    state = ADAMW_BYTES_PER_PARAM * n_params / (ranks if sharded else 1)
    casts = 2 * n_params if on_gpu and not compiled and not sharded else 0
    row = longest_row(data, packing)
    tokens = micro_batch * (row if packing else 2 * row)      # naive: two sequences per triplet
    act = tokens * activation_bytes_per_token(model, on_gpu, compiled, checkpointing)
    if not on_gpu:      # the CPU's masked attention keeps scores and probabilities
        layers = 1 if checkpointing else model.num_layers
        rows = micro_batch if packing else 2 * micro_batch
        act += layers * rows * 2 * model.num_heads * row * row * 4
    return MemoryEstimate(state / 1e9, act / 1e9, GPU_OVERHEAD_GB if on_gpu else 0.0, micro_batch, row,
                          checkpointing, casts / 1e9)


def fits(mem: MemoryEstimate, gpu_memory_gb: float) -> bool:
    return mem.total_gb <= USABLE_FRACTION * gpu_memory_gb


def what_would_fit(model: ModelConfig, n_params: int, data: DataConfig, *, micro_batch: int, ranks: int,
                   sharded: bool, packing: bool, gpu_memory_gb: float, gpus_per_node: int,
                   compiled: bool = False) -> str:
    """The changes that make a plan that does not fit fit: a smaller micro-batch with
    checkpointing, FSDP instead of DDP, more GPUs (FSDP over them)."""
    def fit(micro: int, gpus: int, shard: bool) -> bool:
        return fits(estimate(model, n_params, data, micro_batch=micro, ranks=gpus, sharded=shard, packing=packing,
                             checkpointing=True, on_gpu=True, compiled=compiled), gpu_memory_gb)

    options = []
    smaller = [m for m in sorted({max(1, micro_batch // 2 ** k) for k in range(1, 8)}, reverse=True)
               if fit(m, ranks, sharded)]
    if smaller:
        options.append(f"train.micro_batch_size={smaller[0]} (per GPU) with activation checkpointing")
    if not sharded and ranks > 1 and fit(micro_batch, ranks, True):
        options.append("train.parallel=fsdp")
    more = [g for g in (2 ** k for k in range(1, 12)) if g > ranks and fit(1, g, True)]
    if more:
        options.append(f"resources.gpus={more[0]} ({math.ceil(more[0] / gpus_per_node)} node"
                       f"{'s' * (more[0] > gpus_per_node)}) with FSDP")
    return " or ".join(options) or "a GPU with more memory (resources.gpu_memory_gb)"
