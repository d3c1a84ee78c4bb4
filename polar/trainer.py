"""Training: fit / train_step / evaluate, with atomic checkpoints and exact resume.

The data order is a pure function of (seed, step) (`polar.data.batch_order`), so a run
resumed from its checkpoint sees the same batches as an uninterrupted one. `StepBatches`
turns a step into this rank's collated micro-batches: each rank reads only its own share of
the global batch (from TokenShards, memory-mapped, or TokenTriplets) and counts the step's
tokens from the piece lengths alone; with train.data_workers > 0 a DataLoader's worker
processes collate the next steps while this one trains, with the same result. Metrics go
to a MetricSink; train metrics are buffered and flushed at each evaluation, just before
the checkpoint.

Data parallelism (processes started by torchrun or SLURM, `polar.distributed`): the
caller wraps the model (DDP, or FSDP2 for models that do not fit one GPU), each rank trains on
its contiguous share of every global batch, every rank evaluates the whole validation
set (fully_shard needs all ranks in every forward), and rank 0 writes the checkpoint,
whose unsharded states resume on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from polar import names
from polar.atomic import atomic_path
from polar.config import TrainConfig
from polar.data import TokenShards, TokenTriplets, batch_order, naive_batch
from polar.distributed import (
    DistEnv,
    any_rank,
    broadcast_object,
    dist_env,
    load_training_state,
    mean_across,
    no_grad_sync,
    on_main,
    shard,
    sum_across,
    training_state,
    unwrap,
)
from polar.integrity import file_digest
from polar.loss import pair_accuracy, pretrain_loss
from polar.packing import PackedBatch, pack_triplets, packed_rewards, row_capacity
from polar.sharded_checkpoint import candidates as sharded_candidates
from polar.sharded_checkpoint import is_sharded, load_sharded, save_sharded
from polar.sharded_checkpoint import read_state as read_sharded_state

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"            # the checkpoint before the last, kept to fall back to
CHECKSUMS = "checkpoint.sha256.json"       # {file name: {"size", "sha256"}} of the two above
DECAY_DIR = "decay"                        # the running WSD decay branch's own checkpoints, in the run folder

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of a run folder can be trusted; the message names each file and
    what is wrong with it, and how to start the run over."""


class Preempted(Exception):
    """fit stopped early because `stop` asked it to, after writing a checkpoint at that
    step; fit called again with the same arguments continues from there."""


@dataclass
class TrainResult:
    val_loss: float
    val_acc: float
    steps: int
    tokens_seen: int
    flops_seen: float


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Warmup (linear) then the configured decay, as a multiple of cfg.lr. wsd: stable
    until the last cfg.decay_fraction of `total` steps, then linear to cfg.min_lr_ratio."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "wsd":
        start = decay_start(total, cfg)
        factor = 1.0 if step < start else 1 - (1 - cfg.min_lr_ratio) * (step + 1 - start) / (total - start)
    elif cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "linear":
        factor = 1 - (1 - cfg.min_lr_ratio) * progress
    else:
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * factor


def decay_start(total: int, cfg: TrainConfig) -> int:
    """The step where a WSD run of `total` steps leaves its stable learning rate."""
    return total - max(1, round(cfg.decay_fraction * total))


def decay_branches(steps: int, cfg: TrainConfig) -> dict[int, int]:
    """WSD decay branches of a run of `steps`: {start step: end step}. A branch ending at
    a fraction p of the run (cfg.decay_at) leaves the stable phase where a WSD run of that
    length would start decaying, so its end is the converged point of a shorter run."""
    ends = sorted({round(p * steps) for p in cfg.decay_at})
    branches = {decay_start(end, cfg): end for end in ends}
    warmup = int(cfg.warmup_fraction * steps)
    if len(branches) < len(cfg.decay_at) or any(start <= warmup for start in branches):
        raise ValueError(f"train.decay_at={list(cfg.decay_at)} gives decay branches {branches} in a run of {steps} "
                         f"steps: they must be distinct and start after the warmup ({warmup} steps); use fewer "
                         "or later points, or a longer run")
    return branches


def eval_steps(total: int, n_evals: int, spacing: str) -> list[int]:
    """Optimizer steps after which to evaluate; always includes the last."""
    if spacing == "log":
        points = np.geomspace(max(1, total / 50), total, n_evals)
    else:
        points = np.linspace(total / n_evals, total, n_evals)
    return sorted({max(1, min(total, int(round(p)))) for p in points} | {total})


def collate(batch: TokenTriplets, special: dict[str, int], packing: bool, model=None) -> dict | PackedBatch:
    """Model inputs of a batch: shared-prefix packed rows (as wide as suits the model's
    attention kernel), or the naive (2B, T) batch."""
    return collate_rows(batch, special, packing, row_capacity(model) if packing and model is not None else None)


def collate_rows(batch: TokenTriplets, special: dict[str, int], packing: bool,
                 max_len: int | None = None) -> dict | PackedBatch:
    """`collate` with the packed rows' capacity given (polar.packing.row_capacity of the
    model, computed once by the caller): what a DataLoader worker, which has no model, runs."""
    if not packing:
        return naive_batch(batch, special)
    return pack_triplets(batch, special, max_len=max_len)


def micro_batches(batch: TokenTriplets, special: dict[str, int], cfg: TrainConfig,
                  max_len: int | None) -> list[tuple[dict | PackedBatch, int, int]]:
    """A rank's batch as collated micro-batches of cfg.micro_batch_size triplets, each with
    its number of triplets and the batch's (its loss weighs n / of)."""
    micro = cfg.micro_batch_size or cfg.batch_size
    chunks = [batch.subset(range(start, min(len(batch), start + micro))) for start in range(0, len(batch), micro)]
    return [(collate_rows(chunk, special, cfg.packing, max_len), len(chunk), len(batch)) for chunk in chunks]


class StepBatches(torch.utils.data.Dataset):
    """Optimizer step -> (this rank's collated micro-batches, the step's naive tokens, its
    executed tokens): a pure function of (data, seed, step). The global batch's order comes
    from batch_order; this rank reads only its contiguous share (polar.distributed.shard),
    and the token counts of the whole global batch come from the piece lengths alone."""

    def __init__(self, train: TokenShards | TokenTriplets, special: dict[str, int], cfg: TrainConfig,
                 env: DistEnv, max_len: int | None):
        self.train, self.special, self.cfg, self.env, self.max_len = train, special, cfg, env, max_len

    def __getitem__(self, step: int):
        order = batch_order(len(self.train), self.cfg.batch_size, step, self.cfg.seed)
        naive = int(self.train.naive_tokens(order).sum())                     # data terms, whatever the path
        executed = int(self.train.packed_tokens(order).sum()) if self.cfg.packing else naive
        mine = self.train.subset(shard(order, self.env))
        return micro_batches(mine, self.special, self.cfg, self.max_len), naive, executed


def _as_is(item):
    return item


@contextmanager
def step_batches(data: StepBatches, start: int, stop: int, workers: int) -> Iterator[Iterator]:
    """StepBatches of steps start..stop-1 in order: computed here when workers is 0, else
    by a DataLoader's `workers` processes (a few steps ahead), shut down on leaving."""
    if workers == 0:
        yield (data[step] for step in range(start, stop))
        return
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, stop), num_workers=workers,
                                         collate_fn=_as_is, prefetch_factor=2,
                                         generator=torch.Generator())   # leaves the global RNG alone
    batches = iter(loader)
    try:
        yield batches
    finally:
        batches._shutdown_workers()


def scores(model, batch: dict[str, torch.Tensor] | PackedBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of positives and negatives for a naive batch or a PackedBatch."""
    if isinstance(batch, PackedBatch):
        rewards = packed_rewards(model, batch, device)
    else:
        rewards = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        score_index=batch["score_index"].to(device))
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


@torch.no_grad()
def evaluate(model, val: TokenShards | TokenTriplets, special: dict[str, int], device="cpu", batch_size: int = 64,
             packing: bool = False, env: DistEnv | None = None, cfg: TrainConfig | None = None):
    """Mean pre-training loss and pair accuracy over the whole validation set, through
    the same path (packed or naive) and autocast (cfg's) as training. Several ranks: each
    evaluates its contiguous share in chunks of batch_size and the sums are reduced; every
    rank runs the same number of forwards (FSDP needs them all in each one), a rank with
    fewer rows running a last one that counts for nothing."""
    env = env or dist_env()
    model.eval()
    parts = np.array_split(np.arange(len(val)), env.world_size)
    mine, n_chunks = parts[env.rank], max(-(-len(p) // batch_size) for p in parts)
    sums = np.zeros(3)                                  # loss x rows, accuracy x rows, rows
    for i in range(n_chunks):
        rows = mine[i * batch_size:(i + 1) * batch_size]
        chunk = val.subset(rows if len(rows) else np.arange(min(1, len(val))))
        with _autocast(cfg, device) if cfg is not None else nullcontext():
            pos, neg = scores(model, collate(chunk, special, packing, model), device)
        sums += len(rows) * np.array([pretrain_loss(pos, neg).item(), pair_accuracy(pos, neg).item(), 1.0])
    loss, acc, count = sum_across(sums)
    model.train()
    return float(loss / count), float(acc / count)


def train_step(model, optimizer, batch: TokenTriplets | list, special, cfg: TrainConfig, device) -> float:
    """One optimizer step with gradient accumulation and clipping; returns the mean loss.
    batch: this rank's triplets, or their micro-batches already collated (`micro_batches`)."""
    if isinstance(batch, list):
        micro = batch
    else:
        micro = micro_batches(batch, special, cfg, row_capacity(unwrap(model)) if cfg.packing else None)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (inputs, n, of) in enumerate(micro):
        with _autocast(cfg, device):
            pos, neg = scores(model, inputs, device)
        loss = pretrain_loss(pos, neg) * n / of
        if i == len(micro) - 1:
            loss.backward()          # the last micro-batch reduces gradients across ranks
        else:
            with no_grad_sync(model):
                loss.backward()
        total += loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return total


def _autocast(cfg: TrainConfig, device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and str(device).startswith("cuda"))
    return torch.autocast(device_type=str(device).split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)


def fit(model, train: TokenShards | TokenTriplets, val: TokenShards | TokenTriplets, special: dict[str, int],
        cfg: TrainConfig, steps: int, flops_per_token: float, run_dir: str | Path, sink, progress: bool = True,
        desc: str = "train", position: int | None = None, env: DistEnv | None = None,
        stop: Callable[[], bool] | None = None, peak_flops: float | None = None) -> TrainResult:
    """Train `steps` optimizer steps, resuming from run_dir's newest whole checkpoint; tokens_seen and flops_seen
    are data terms, the same with packing on or off. position: the progress bar's terminal line. stop: asked
    after every step on every rank; when any says so, fit logs, checkpoints that step and raises Preempted (a
    SLURM requeue). Several ranks: pass the wrapped model and the real sink on rank 0 only; cfg.batch_size is
    the global batch. Evaluations log the throughput since the previous one and, given peak_flops, the MFU."""
    env, device, run_dir = env or dist_env(), next(model.parameters()).device, Path(run_dir)
    optimizer = _optimizer(model, cfg)
    step, tokens_seen, executed, val_loss, val_acc, decays_done = _resume(run_dir, model, optimizer, env)
    branches = decay_branches(steps, cfg)
    if all(end in decays_done for end in branches.values()):   # a kill can leave a done branch's folder
        _clear_branch_folder(run_dir, env)
    evals, buffer, clock = eval_steps(steps, cfg.n_evals, cfg.eval_spacing), [], CheckpointClock(cfg.checkpoint_every_min)

    def flush_and_checkpoint():
        # metrics first: a kill between the two re-runs these steps from the older checkpoint, and
        # the sink drops points already logged (polar.sinks.SkipLogged); the other order would lose them
        on_main(lambda: sink.log_many(list(buffer)), env)
        buffer.clear()
        save_checkpoint(run_dir, model, optimizer, env, step=step, tokens_seen=tokens_seen, tokens_executed=executed,
                        val_loss=val_loss, val_acc=val_acc, decays_done=decays_done)
        clock.reset()

    mark = (time.perf_counter(), tokens_seen, executed)        # throughput since the last evaluation
    data = StepBatches(train, special, cfg, env, row_capacity(unwrap(model)) if cfg.packing else None)
    with step_batches(data, step, steps, cfg.data_workers) as batches, \
            _progress_bar(steps, step, desc, progress and env.is_main, position) as bar:
        while step < steps:
            if branches.get(step) not in (None, *decays_done):    # a WSD decay branch leaves here
                flush_and_checkpoint()                             # ... and comes back to this state
                buffer.append(decay_branch(model, optimizer, data, step, branches[step], tokens_seen, val, cfg,
                                           flops_per_token, env, run_dir, stop))
                decays_done.append(branches[step])
                flush_and_checkpoint()
                _clear_branch_folder(run_dir, env)                 # now that the checkpoint records it done
            _set_lr(optimizer, lr_at(step, steps, cfg))
            micro, naive, packed = next(batches)
            loss = mean_across(train_step(model, optimizer, micro, special, cfg, device))
            step += 1
            tokens_seen, executed = tokens_seen + naive, executed + packed      # data terms, and what ran
            _check_finite(loss, step, run_dir)
            buffer.append(({names.TRAIN_LOSS: loss, names.LR: optimizer.param_groups[0]["lr"]}, step))
            bar.update(1)
            if step in evals:
                val_loss, val_acc, point = _evaluation(model, val, special, cfg, env, mark, tokens_seen, executed,
                                                       flops_per_token, peak_flops)
                buffer.append((point, step))
                flush_and_checkpoint()
                mark = (time.perf_counter(), tokens_seen, executed)
                bar.set_postfix(val_loss=f"{val_loss:.4f}", acc=f"{val_acc:.3f}")
            elif clock.due():        # a hard failure loses at most checkpoint_every_min of training
                flush_and_checkpoint()
            if stop is not None and step < steps and any_rank(stop()):
                if buffer:               # not an evaluation step, which has just been checkpointed
                    flush_and_checkpoint()
                raise Preempted(f"stopped at step {step} of {steps}; checkpoint in {run_dir}")
    return TrainResult(val_loss, val_acc, step, tokens_seen, tokens_seen * flops_per_token)


def decay_branch(model, optimizer, data: "StepBatches", start: int, end: int, tokens_seen: int, val, cfg: TrainConfig,
                 flops_per_token: float, env: DistEnv, run_dir: Path, stop: Callable[[], bool] | None = None
                 ) -> tuple[dict, int]:
    """Train steps start..end on the run's own batches with the learning rate of a WSD
    run of `end` steps (its decay), evaluate, restore the state the branch left from (the
    checkpoint in run_dir the caller wrote at `start`), and return the point: its DECAY_*
    metrics at step `start`, where it left the run (so a run's logged steps never fall;
    the point's tokens and FLOPs are its own). The branch checkpoints into run_dir/decay as
    the run does (every cfg.checkpoint_every_min, and when stop() says so, then raising
    Preempted), and a resumed run goes on from there instead of starting the branch over."""
    device, branch_dir = next(model.parameters()).device, Path(run_dir) / DECAY_DIR
    step, tokens_seen = _branch_resume(branch_dir, model, optimizer, env, (start, end), tokens_seen)
    clock = CheckpointClock(cfg.checkpoint_every_min)
    while step < end:
        _set_lr(optimizer, lr_at(step, end, cfg))
        micro, naive, _ = data[step]
        train_step(model, optimizer, micro, data.special, cfg, device)
        step, tokens_seen = step + 1, tokens_seen + naive
        stopping = step < end and stop is not None and any_rank(stop())
        if stopping or (step < end and clock.due()):
            save_checkpoint(branch_dir, model, optimizer, env, step=step, tokens_seen=tokens_seen, branch=[start, end])
            clock.reset()
        if stopping:
            raise Preempted(f"stopped at step {step} of the decay branch {start}->{end}; checkpoint in {branch_dir}")
    loss, acc = _validate(model, val, data.special, cfg, env)
    load_checkpoint(run_dir, model, optimizer, env)
    return {names.DECAY_VAL_LOSS: loss, names.DECAY_VAL_ACC: acc, names.DECAY_TOKENS: tokens_seen,
            names.DECAY_FLOPS: tokens_seen * flops_per_token}, start


def _branch_resume(branch_dir: Path, model, optimizer, env: DistEnv, branch: tuple[int, int],
                   tokens_seen: int) -> tuple[int, int]:
    """(step, tokens_seen) where the decay branch goes on: from its own checkpoint in
    branch_dir, loaded into model and optimizer, or from the run's state at its start
    (the folder, of another branch or damaged, is cleared then)."""
    if _branch_saved(branch_dir, env) == branch:
        counters = load_checkpoint(branch_dir, model, optimizer, env)
        return counters["step"], counters["tokens_seen"]
    _clear_branch_folder(branch_dir.parent, env)
    on_main(lambda: branch_dir.mkdir(exist_ok=True), env)
    return branch[0], tokens_seen


def _branch_saved(branch_dir: Path, env: DistEnv) -> tuple[int, int] | None:
    """(start, end) of the decay branch whose newest whole checkpoint is in branch_dir, on
    every rank; None when there is none (a damaged one is named in a warning)."""
    def newest():
        try:
            found = _newest_checkpoint(branch_dir) if branch_dir.is_dir() else None
        except CheckpointError as err:
            log.warning("a decay branch's checkpoint is damaged and is not used: %s", err)
            return None
        return None if found is None else tuple(found[2].get("branch", ()))

    return broadcast_object(on_main(newest, env))


def _clear_branch_folder(run_dir: Path, env: DistEnv) -> None:
    """Remove run_dir/decay: its branch is recorded done, or no branch is left to run (a
    done branch's folder found while others are left is cleared as the next one starts)."""
    on_main(lambda: shutil.rmtree(run_dir / DECAY_DIR, ignore_errors=True), env)


def _optimizer(model, cfg: TrainConfig):
    """AdamW over the model (activation checkpointing and compilation set as cfg says first)."""
    set_checkpointing(model, bool(cfg.activation_checkpointing))
    set_compiled(model, cfg.compile and next(model.parameters()).device.type == "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _resume(run_dir: Path, model, optimizer, env: DistEnv) -> tuple[int, int, int, float, float, list[int]]:
    """Load run_dir's newest whole checkpoint into model and optimizer: (step, tokens_seen,
    tokens executed, val_loss, val_acc, WSD decay branches done) from its counters."""
    state = load_checkpoint(run_dir, model, optimizer, env)
    return (state["step"], state["tokens_seen"], state.get("tokens_executed", state["tokens_seen"]),
            state.get("val_loss", float("nan")), state.get("val_acc", float("nan")), list(state.get("decays_done", [])))


def _progress_bar(steps: int, step: int, desc: str, show: bool, position: int | None):
    from tqdm import tqdm

    return tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not show, mininterval=2, position=position)


def _evaluation(model, val, special: dict[str, int], cfg: TrainConfig, env: DistEnv, mark: tuple, tokens_seen: int,
                executed: int, flops_per_token: float, peak_flops: float | None) -> tuple[float, float, dict]:
    """(val_loss, val_acc, the evaluation's metrics), with the throughput since `mark`
    (time, tokens_seen, tokens executed at the previous evaluation)."""
    speed = throughput(tokens_seen - mark[1], executed - mark[2], time.perf_counter() - mark[0], flops_per_token,
                       peak_flops, env.world_size)
    val_loss, val_acc = _validate(model, val, special, cfg, env)
    return val_loss, val_acc, _eval_point(val_loss, val_acc, tokens_seen, executed, flops_per_token, speed)


def _validate(model, val, special: dict[str, int], cfg: TrainConfig, env: DistEnv) -> tuple[float, float]:
    """evaluate() as training runs it: its path, autocast and micro-batch size."""
    return evaluate(model, val, special, next(model.parameters()).device, batch_size=cfg.micro_batch_size or 64,
                    packing=cfg.packing, env=env, cfg=cfg)


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class CheckpointClock:
    """When a wall-clock checkpoint is due: every rank asks after every step and they
    agree (any_rank), so all of them save the same step; 0 minutes: never (no collective)."""

    def __init__(self, every_min: float):
        self.every_s, self.last = every_min * 60, time.monotonic()

    def due(self) -> bool:
        return self.every_s > 0 and any_rank(time.monotonic() - self.last >= self.every_s)

    def reset(self) -> None:
        self.last = time.monotonic()


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of every decoder layer (transformers' own, non-reentrant):
    the backward pass recomputes a layer's activations instead of keeping them. Speed
    only: losses and gradients are the same."""
    inner = unwrap(model)
    # transformers 5.2x renamed gradient_* to activation_* (the old names warn); older ones have only gradient_*
    name = "activation" if hasattr(inner, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(inner, f"{name}_checkpointing_enable")(**{f"{name}_checkpointing_kwargs": {"use_reentrant": False}})
    elif getattr(inner, f"is_{name}_checkpointing", False):
        getattr(inner, f"{name}_checkpointing_disable")()


def set_compiled(model, on: bool) -> None:
    """torch.compile each decoder layer (regional compilation, dynamic shapes, so later
    row widths reuse the first compilation), or undo it. Speed only: the layers compute
    the same function (on an H200, 1.8b: MFU 32% -> 45%, bench/README.md)."""
    inner = unwrap(model)
    layers = getattr(inner.base_model, "layers", None)
    if layers is None:
        if on:
            raise ValueError(f"train.compile=true compiles the decoder layers, but {type(inner).__name__} has no "
                             "base_model.layers; set train.compile=false")
        return
    for layer in layers:
        if on:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None     # what nn.Module.compile sets


def _check_finite(loss: float, step: int, run_dir: Path) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss} at step {step}; the last good "
                                 f"checkpoint in {run_dir} is kept (try a lower learning rate)")


def _eval_point(val_loss: float, val_acc: float, tokens_seen: int, executed: int, flops_per_token: float,
                speed: dict) -> dict:
    """An evaluation's metrics: the axes in data terms (tokens of the triplets in POLAR's
    two-sequence layout and their nominal FLOPs), and apart the FLOPs actually executed."""
    return {names.VAL_LOSS: val_loss, names.VAL_ACC: val_acc, names.TOKENS_SEEN: tokens_seen,
            names.FLOPS_SEEN: tokens_seen * flops_per_token, names.FLOPS_EXECUTED: executed * flops_per_token,
            **speed}


def throughput(tokens: int, executed: int, seconds: float, flops_per_token: float, peak_flops: float | None,
               world_size: int = 1) -> dict[str, float]:
    """Metrics of training speed: data tokens per second, and the model FLOPs utilisation
    (the FLOP/s the training path executed over the peak of all devices) where the peak
    of one is known."""
    if seconds <= 0 or tokens <= 0:
        return {}
    out = {names.THROUGHPUT: tokens / seconds}
    if peak_flops:
        out[names.MFU] = executed / seconds * flops_per_token / (peak_flops * world_size)
    return out


def save_checkpoint(run_dir: Path, model, optimizer, env: DistEnv | None = None, **state) -> None:
    """Model, optimizer, RNG state and counters, written atomically (tmp file + rename) by
    rank 0, with its sha256 in checkpoint.sha256.json; the checkpoint it replaces is kept
    as checkpoint.prev.pt, to fall back to should the new one be damaged. A collective
    when there are several ranks (every rank calls it)."""
    env = env or dist_env()
    if is_sharded(model):        # each rank writes its shards (polar.sharded_checkpoint): no gather
        save_sharded(run_dir, model, optimizer, env, {"torch_rng": torch.get_rng_state(), "shape": _shape(model),
                                                      **state})
        return
    model_state, optim_state = training_state(model, optimizer)

    def write():
        payload = {"model": model_state, "optimizer": optim_state, "torch_rng": torch.get_rng_state(),
                   "shape": _shape(model), **state}
        with atomic_path(run_dir / CHECKPOINT) as tmp:
            torch.save(payload, tmp)
            _keep_previous(Path(run_dir), file_digest(tmp))

    on_main(write, env)


def _keep_previous(run_dir: Path, new: dict) -> None:
    """Before a new checkpoint (digest `new`) is renamed into place: list it in the
    checksums, and move the current checkpoint, when it is whole, to checkpoint.prev.pt.
    In this order a kill at any point leaves every file that is there listed."""
    current, listed = run_dir / CHECKPOINT, _read_checksums(run_dir)
    digest = file_digest(current) if current.exists() else None
    keep = digest is not None and (listed is None or listed.get(CHECKPOINT) == digest)
    entries = {CHECKPOINT: new, PREVIOUS: digest if keep else (listed or {}).get(PREVIOUS)}
    with atomic_path(run_dir / CHECKSUMS) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in entries.items() if v}, indent=1), encoding="utf-8")
    if keep:
        os.replace(current, run_dir / PREVIOUS)


def _read_checksums(run_dir: Path) -> dict | None:
    """The checksums of run_dir's checkpoints; None when the folder has none (written
    before checksums existed) or they cannot be read (then torch.load is the only check)."""
    path = run_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(listed, dict) and all(isinstance(v, dict) for v in listed.values()):
            return listed
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    log.warning("%s cannot be read; checkpoints are checked by loading them only", path)
    return None


def _checkpoint_problem(path: Path, listed: dict | None) -> str | None:
    """What is wrong with the checkpoint at `path`, or None when its size and sha256 are
    those of a checkpoint this folder wrote (any listed one: a kill between the renames of
    a save leaves the previous checkpoint under either name)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if listed is None:     # a run folder from before checksums (2026-11-29): still loads, unchecked
        return None
    if file_digest(path) in listed.values():
        return None
    want = listed.get(path.name)
    if want is None:
        return f"it is not listed in {CHECKSUMS} (written by something else?)"
    if want["size"] != size:
        return f"it is {size} bytes where {CHECKSUMS} says {want['size']} (truncated or overwritten)"
    return f"its sha256 differs from the one written with it in {CHECKSUMS} (bytes overwritten)"


def _read_good_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """(path, payload) of the newest checkpoint of run_dir that is whole: checkpoint.pt,
    else checkpoint.prev.pt (with a warning naming what is wrong with the newer one);
    None when there is none; CheckpointError when there are some but none is whole."""
    listed, problems = _read_checksums(run_dir), []
    for path in (run_dir / CHECKPOINT, run_dir / PREVIOUS):
        if not path.exists():
            continue
        problem = _checkpoint_problem(path, listed)
        if problem is None:
            try:
                payload = torch.load(path, weights_only=True, map_location="cpu")
            except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad archive
                problem = f"torch.load cannot read it ({type(err).__name__}: {str(err)[:200]})"
        if problem is None:
            if problems:
                log.warning("damaged checkpoint %s; resuming from the previous one, %s", "; ".join(problems), path)
            return path, payload
        problems.append(f"{path}: {problem}")
    if problems:
        raise CheckpointError(f"no checkpoint in {run_dir} can be trusted, and training from a damaged one "
                              f"would be wrong: {'; '.join(problems)}. To start the run over, delete the run "
                              f"folder (rm -r {run_dir}) and run the same command again.")
    return None


def load_checkpoint(run_dir: Path, model, optimizer, env: DistEnv | None = None) -> dict:
    """Restore the newest whole checkpoint, of either format (a file written by rank 0, or
    the shards every rank of an FSDP run wrote), into model and optimizer, whatever their
    sharding now; a fresh state when there is none (CheckpointError when every one is
    damaged). Rank 0 chooses and reads the counters; they reach every rank."""
    env = env or dist_env()
    found = on_main(lambda: _newest_checkpoint(Path(run_dir)), env)
    kind, path, payload = found if found is not None else (None, Path(run_dir) / CHECKPOINT, None)
    counters = broadcast_object(None if payload is None else
                                (kind, str(path), {k: v for k, v in payload.items()
                                                   if k not in ("model", "optimizer", "torch_rng")}))
    if counters is None:
        return {"step": 0, "tokens_seen": 0}
    kind, path, counters = counters
    if counters.get("shape") != _shape(model):
        raise ValueError(f"checkpoint {path} is for model shape {counters.get('shape')}, not "
                         f"{_shape(model)}; delete it or point the run elsewhere")
    if kind == "sharded":
        load_sharded(Path(path), model, optimizer)
    else:
        states = (payload["model"], _by_name(payload["optimizer"], model)) if payload is not None else ({}, {})
        load_training_state(model, optimizer, *states)
    if payload is not None:
        torch.set_rng_state(payload["torch_rng"])
    return counters


def _newest_checkpoint(run_dir: Path) -> tuple[str, Path, dict] | None:
    """(kind, path, payload) of the newest whole checkpoint in run_dir, either format: a
    sharded one (payload: its counters) or a file; damaged ones are named and skipped."""
    damaged, options = [], []
    for folder, problem in sharded_candidates(run_dir):
        if problem is None:
            options.append(("sharded", folder, read_sharded_state(folder)))
            break
        damaged.append(f"{folder}: {problem}")
    try:
        whole = _read_good_checkpoint(run_dir)
    except CheckpointError:
        if not options:
            raise
        whole = None
    if whole is not None:
        options.append(("file", *whole))
    if damaged and options:
        log.warning("damaged checkpoint %s; resuming from %s", "; ".join(damaged), options[0][1])
    if damaged and not options:
        raise CheckpointError(f"no checkpoint in {run_dir} can be trusted, and training from a damaged one would be "
                              f"wrong: {'; '.join(damaged)}. To start the run over, delete the run folder "
                              f"(rm -r {run_dir}) and run the same command again.")
    # at the same step, the one that has recorded more decay branches is the later (a run
    # resumed on another number of ranks writes a file beside the shards of that step)
    return max(options, key=lambda o: (o[2]["step"], len(o[2].get("decays_done", ())))) if options else None


def _by_name(optim_state: dict, model) -> dict:
    """Optimizer state keyed by parameter name; checkpoints written before 2026-11-27
    keyed it by the parameter's index in model.parameters() (the optimizer's order)."""
    names = [name for name, _ in unwrap(model).named_parameters()]
    if not any(isinstance(k, int) for k in optim_state.get("state", {})):
        return optim_state
    return {"state": {names[i]: v for i, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}


def _shape(model) -> list[int]:
    from polar.model import HF_SHAPE_KEYS

    c = unwrap(model).config
    return [getattr(c, k, None) for k in HF_SHAPE_KEYS]   # GPT-NeoX has no num_key_value_heads
