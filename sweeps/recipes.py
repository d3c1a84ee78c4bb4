"""Recipes: how a model size and a token budget become a run's batch size and learning rate.

A recipe is a named, typed value with one pure method, `batch_and_lr(n_params, width,
tokens)`, as Marin's ScalingRecipe and OLMo-core's configurators are: `FixedRecipe` (one
LR and batch for every size, the LR optionally width-scaled) and `PolarLawRecipe`
(POLAR's fitted laws in N, the backbone's pre-training tokens Dp and the reward model's
tokens Drm). sweeps/schema.py registers them as the `recipe` config group
(conf/recipe/{fixed,polar_law}.yaml); sweeps/derive.py asks the job's recipe and fits the
answer to the GPUs. No I/O, no Hydra: every function here is a function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional


def polar_lr(n_params: float, backbone_tokens: float, rm_tokens: float) -> float:
    """POLAR's fitted LR law (arXiv 2507.05197): N in millions of parameters, the backbone's
    pre-training tokens Dp and the reward model's tokens Drm in billions."""
    return 2.306e-4 * (n_params / 1e6) ** 0.01125 * (backbone_tokens / 1e9) ** -0.66587 \
        * (rm_tokens / 1e9) ** 0.33916


def polar_batch_size(n_params: float, rm_tokens: float) -> float:
    """POLAR's fitted batch-size law (in sequences); N in millions, tokens in billions."""
    return 31.9032 * (n_params / 1e6) ** 0.06944 * (rm_tokens / 1e9) ** 0.52997


@dataclass
class Recipe:
    """What every recipe answers. `name` is what `recipe=NAME` selects and what the run key
    records; `exact_batch` says whether the batch is the user's own number (a batch that
    does not split over the GPUs is an error) or a law's value (rounded up to split)."""

    name: ClassVar[str] = ""
    exact_batch: ClassVar[bool] = True
    needs_backbone: ClassVar[bool] = False   # fitted on pre-trained backbones: refused for random weights

    def batch_and_lr(self, n_params: int, width: int, tokens: float) -> tuple[int, float]:
        """(batch size in triplets, peak learning rate) of a run of a model with n_params
        parameters and hidden size `width`, trained on `tokens` planned tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not say its batch size and LR")


@dataclass
class FixedRecipe(Recipe):
    """`recipe=fixed`: the same batch for every size, and the same LR, or with lr_width_ref > 0
    an LR scaled as lr_width_ref / width (muP-style: lr at width lr_width_ref)."""

    name: ClassVar[str] = "fixed"

    lr: float = 3e-3
    batch_size: int = 32             # triplets per optimizer step
    lr_width_ref: int = 0            # > 0: lr x lr_width_ref / hidden_size

    def __post_init__(self) -> None:
        for key in ("lr", "batch_size"):
            if getattr(self, key) is None or getattr(self, key) <= 0:
                raise ValueError(f"recipe.{key} must be > 0, got {getattr(self, key)!r}")
        if self.lr_width_ref < 0:
            raise ValueError(f"recipe.lr_width_ref must be >= 0 (0: no width scaling), got {self.lr_width_ref}")

    def batch_and_lr(self, n_params: int, width: int, tokens: float) -> tuple[int, float]:
        lr = self.lr * self.lr_width_ref / width if self.lr_width_ref > 0 else self.lr
        return self.batch_size, lr


@dataclass
class PolarLawRecipe(Recipe):
    """`recipe=polar_law`: POLAR's laws fitted on reward models fine-tuned from pre-trained
    InternLM2.5 backbones: LR = f(N, Dp, Drm), batch = g(N, Drm). They assume a backbone
    pre-trained on backbone_tokens (Dp) tokens; a randomly initialised model has no Dp, and
    the law says nothing about it."""

    name: ClassVar[str] = "polar_law"
    exact_batch: ClassVar[bool] = False
    needs_backbone: ClassVar[bool] = True

    backbone_tokens: Optional[float] = None   # Dp: the backbone's own pre-training tokens, e.g. 2.5e12

    def __post_init__(self) -> None:
        if self.backbone_tokens is None or self.backbone_tokens <= 0:
            raise ValueError(
                f"recipe=polar_law needs recipe.backbone_tokens > 0, got {self.backbone_tokens!r}: POLAR's LR law "
                "assumes a backbone pre-trained on Dp tokens (e.g. recipe.backbone_tokens=2.5e12 for InternLM2.5 "
                "1.8B) and does not apply to a randomly initialised model; for one, use recipe=fixed "
                "(recipe.lr, recipe.batch_size)")

    def batch_and_lr(self, n_params: int, width: int, tokens: float) -> tuple[int, float]:
        return max(1, round(polar_batch_size(n_params, tokens))), polar_lr(n_params, self.backbone_tokens, tokens)


RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (FixedRecipe, PolarLawRecipe)}
