"""Structured configs: the typed schema behind every YAML file in conf/.

The science's dataclasses (polar.config) and the recipes (sweeps.recipes) are reused as
they are; this module adds the sweep-level ones (budget, resources, tracking, paths) and
registers the whole tree with Hydra's ConfigStore (the job config as `base_config`, the
recipes as `recipe/base_fixed` and `recipe/base_polar_law`, under conf/recipe/*.yaml),
so a typo'd key or a wrong type fails before anything starts. `to_job_config` converts a
DictConfig into plain dataclasses once, at the entry point, which runs every
__post_init__ validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from polar.config import DataConfig, ModelConfig, TrainSettings
from sweeps.recipes import RECIPES, FixedRecipe, Recipe

STAGES = ("pretrain", "finetune", "synthesize")
TRACKING_BACKENDS = ("mlflow", "off")


@dataclass
class BudgetConfig:
    """What a run may spend: exactly one of tokens or flops (training FLOPs). Neither is a
    valid schema default; sweeps.derive refuses to plan a run without one."""

    tokens: Optional[float] = None
    flops: Optional[float] = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("tokens", self.tokens), ("flops", self.flops)) if v is not None}
        if len(given) > 1:
            raise ValueError(f"give exactly one of budget.tokens or budget.flops, got both {given} "
                             "(null one of them, e.g. budget.tokens=null)")
        for key, value in given.items():
            if not math.isfinite(value) or value <= 0:
                example = "2e6" if key == "tokens" else "1e15"
                raise ValueError(f"budget.{key} must be a finite number > 0 (e.g. budget.{key}={example}), "
                                 f"got {value}")


@dataclass
class ResourcesConfig:
    """How to size a job on GPUs, and when a CPU-only machine should refuse it."""

    gpus: int = 0                           # data-parallel width of a GPU run; 0: as few as hold the training state
    target_hours: float = 0.0               # > 0: at least the GPUs (a power of two) that finish a run within this
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    gpu_peak_flops: float = 989e12          # H100 SXM dense bf16
    assumed_mfu: float = 0.35
    checkpoint_gb_per_s: float = 1.0        # how fast a job writes its checkpoint (SLURM's signal_delay_s must cover it)
    generation_mfu: float = 0.1             # synthesis: decoding is memory-bound (bench/bench_synthesis.py measures)
    time_margin: float = 1.5                # requested time = estimate x margin (+ 10 min)
    cpu_flops: float = 1e10                 # fp32 training on a laptop core; tiny models are overhead-bound
    cpu_memory_gb: float = 8.0              # refuse local CPU runs that need more
    cpu_max_hours: float = 2.0              # refuse local CPU runs that would take longer


@dataclass
class TrackingConfig:
    backend: str = "mlflow"          # mlflow | off
    uri: Optional[str] = None        # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd

    def __post_init__(self) -> None:
        if self.backend not in TRACKING_BACKENDS:
            raise ValueError(f"tracking.backend={self.backend!r} is not valid; choose one of {list(TRACKING_BACKENDS)}")


@dataclass
class PathsConfig:
    cache_dir: str = ".cache/polar"  # tokenizers and synthesized data, shared by runs
    runs_dir: str = "outputs/runs"   # one folder per run key: checkpoint, metrics.jsonl, model
    models_dir: str = "models"       # where presets find their backbones (conf/model/1.8b.yaml ...)


@dataclass
class FinetuneConfig:
    """`stage=finetune`: preference fine-tuning of a pre-trained POLAR model (the reference
    implementation's JSONL: prompt, reference, chosen, rejected). The `model` preset must
    describe the checkpoint's shape; without a budget the run is one epoch."""

    init_from: Optional[str] = None   # a POLAR model directory, e.g. outputs/runs/<run key>/model
    train_path: Optional[str] = None  # preference JSONL
    val_path: Optional[str] = None    # null: a seeded val_fraction of train_path is held out
    val_fraction: float = 0.1
    wrapper: str = "sft"              # the reference's fine-tuning layout (sft | pretrain)

    def __post_init__(self) -> None:
        from polar.template import WRAPPERS

        if self.wrapper not in WRAPPERS:
            raise ValueError(f"finetune.wrapper={self.wrapper!r} is not valid; choose one of {list(WRAPPERS)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"finetune.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    recipe: Recipe = field(default_factory=FixedRecipe)   # in Hydra: the `recipe` group (conf/recipe/)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    experiment_name: str = "default"
    stage: str = "pretrain"           # pretrain | finetune | synthesize (the data set only)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise ValueError(f"recipe={self.recipe!r} is not valid; choose one of {list(RECIPES)}")
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is not valid; choose one of {list(STAGES)}")
        if self.stage == "finetune" and not (self.finetune.init_from and self.finetune.train_path):
            raise ValueError("stage=finetune needs finetune.init_from=MODEL_DIR (a pre-trained POLAR model, "
                             "e.g. outputs/runs/<run key>/model) and finetune.train_path=PREFERENCES.jsonl")


def register() -> None:
    """Register the schema so conf/config.yaml can list `base_config` first in its defaults,
    and each recipe's schema for conf/recipe/NAME.yaml to extend (`base_NAME`). In the
    registered job config the recipe is missing: the defaults list's `recipe` group picks it
    (a field typed Recipe takes FixedRecipe or PolarLawRecipe, whichever is chosen)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import MISSING, OmegaConf

    store = ConfigStore.instance()
    node = OmegaConf.structured(JobConfig)
    node.recipe = MISSING
    store.store(name="base_config", node=node)
    for name, schema in RECIPES.items():
        store.store(group="recipe", name=f"base_{name}", node=schema)


def to_job_config(cfg) -> JobConfig:
    """DictConfig -> JobConfig, running every dataclass's validation (__post_init__)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)
