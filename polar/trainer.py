"""Training: fit / train_step / evaluate, with atomic checkpoints and exact resume.

The data order is a pure function of (seed, step) (`polar.data.batch_order`), so a run
resumed from its checkpoint sees the same batches as an uninterrupted one. Metrics go
to a MetricSink; train metrics are buffered and flushed right after each checkpoint,
so a crash never leaves logged steps that the resumed run would log again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polar.config import TrainConfig
from polar.data import TokenTriplets, batch_order, naive_batch
from polar.loss import pair_accuracy, pretrain_loss
from polar.packing import PackedBatch, pack_triplets, packed_rewards, row_capacity

CHECKPOINT = "checkpoint.pt"


@dataclass
class FitResult:
    val_loss: float
    val_acc: float
    steps: int
    tokens_seen: int
    flops_seen: float


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Warmup (linear) then the configured decay, as a multiple of cfg.lr."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "linear":
        factor = 1 - (1 - cfg.min_lr_ratio) * progress
    else:
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * factor


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
    if not packing:
        return naive_batch(batch, special)
    return pack_triplets(batch, special, max_len=row_capacity(model) if model is not None else None)


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
def evaluate(model, val: TokenTriplets, special: dict[str, int], device="cpu", batch_size: int = 64,
             packing: bool = False):
    """Mean pre-training loss and pair accuracy over the whole validation set, through
    the same path (packed or naive) as training."""
    model.eval()
    losses, accs, weights = [], [], []
    for start in range(0, len(val), batch_size):
        chunk = val.subset(range(start, min(len(val), start + batch_size)))
        pos, neg = scores(model, collate(chunk, special, packing, model), device)
        losses.append(pretrain_loss(pos, neg).item())
        accs.append(pair_accuracy(pos, neg).item())
        weights.append(len(chunk))
    model.train()
    return float(np.average(losses, weights=weights)), float(np.average(accs, weights=weights))


def train_step(model, optimizer, batch: TokenTriplets, special, cfg: TrainConfig, device) -> float:
    """One optimizer step with gradient accumulation and clipping; returns the mean loss."""
    micro = cfg.micro_batch_size or cfg.batch_size
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, len(batch), micro):
        chunk = batch.subset(range(start, min(len(batch), start + micro)))
        with _autocast(cfg, device):
            pos, neg = scores(model, collate(chunk, special, cfg.packing, model), device)
        loss = pretrain_loss(pos, neg) * len(chunk) / len(batch)
        loss.backward()
        total += loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return total


def _autocast(cfg: TrainConfig, device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and str(device).startswith("cuda"))
    return torch.autocast(device_type=str(device).split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)


def fit(model, train: TokenTriplets, val: TokenTriplets, special: dict[str, int], cfg: TrainConfig,
        steps: int, flops_per_token: float, run_dir: str | Path, sink, progress: bool = True,
        desc: str = "train", position: int | None = None) -> FitResult:
    """Train for `steps` optimizer steps, resuming from run_dir/checkpoint.pt when present.
    position: the terminal line of the progress bar when several jobs share a terminal."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    run_dir = Path(run_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    state = load_checkpoint(run_dir, model, optimizer)
    step, tokens_seen = state["step"], state["tokens_seen"]
    evals, buffer = eval_steps(steps, cfg.n_evals, cfg.eval_spacing), []
    val_loss, val_acc = state.get("val_loss", float("nan")), state.get("val_acc", float("nan"))
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not progress, mininterval=2,
               position=position)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        batch = train.subset(batch_order(len(train), cfg.batch_size, step, cfg.seed))
        loss = train_step(model, optimizer, batch, special, cfg, device)
        step += 1
        tokens_seen += int((batch.packed_tokens() if cfg.packing else batch.naive_tokens()).sum())
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss} at step {step}; the last good "
                                     f"checkpoint in {run_dir} is kept (try a lower train.lr)")
        buffer.append(({"train/loss": loss, "lr": optimizer.param_groups[0]["lr"]}, step))
        bar.update(1)
        if step in evals:
            val_loss, val_acc = evaluate(model, val, special, device, packing=cfg.packing)
            buffer.append(({"val/loss": val_loss, "val/acc": val_acc, "tokens_seen": tokens_seen,
                            "flops_seen": tokens_seen * flops_per_token}, step))
            # metrics first: a kill between the two re-runs these steps from the older
            # checkpoint, and the sink drops points already logged (tracking.SkipLogged);
            # the other order would lose them
            sink.log_many(buffer)
            buffer = []
            save_checkpoint(run_dir, model, optimizer, step=step, tokens_seen=tokens_seen,
                            val_loss=val_loss, val_acc=val_acc)
            bar.set_postfix(val_loss=f"{val_loss:.4f}", acc=f"{val_acc:.3f}")
    bar.close()
    return FitResult(val_loss, val_acc, step, tokens_seen, tokens_seen * flops_per_token)


def save_checkpoint(run_dir: Path, model, optimizer, **state) -> None:
    """Model, optimizer, RNG states and counters, written atomically (tmp file + rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "torch_rng": torch.get_rng_state(), "shape": _shape(model), **state}
    tmp = run_dir / f".{CHECKPOINT}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path, model, optimizer) -> dict:
    """Restore a checkpoint into model and optimizer; a fresh state when there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return {"step": 0, "tokens_seen": 0}
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if payload.get("shape") != _shape(model):
        raise ValueError(f"checkpoint {path} is for model shape {payload.get('shape')}, not "
                         f"{_shape(model)}; delete it or point the run elsewhere")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    return payload


def _shape(model) -> list[int]:
    c = model.config
    return [c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.intermediate_size]
