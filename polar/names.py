"""The contract between what writes runs and what reads them (DESIGN.md, "Contracts").

Every MLflow metric, parameter and tag name is written here and nowhere else: the trainer
and the jobs log under these names, analysis reads them back, and the MLflow UI shows
them. A renamed metric breaks at import time, not in a plot.

- Metrics, with step = optimizer step: TRAIN_LOSS ... MFU, and the final VAL_LOSS_FINAL.
- Parameters: the fields of RunParams (their names are the parameter names).
- Tags: run key, kind (job, sweep, analysis), error reason, the process holding a run.
- The files a run folder holds beside its checkpoint, which analysis reads back.
- ScalingRecord: one finished run as analysis sees it; CURVE_COLUMNS its validation curve.

Pure data, no imports beyond the standard library: polar/, sweeps/ and analysis/ all
import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# ---------------------------------------------------------------- metrics
TRAIN_LOSS = "train/loss"
LR = "lr"                                   # the learning rate at the step
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
TOKENS_SEEN = "tokens_seen"                 # data terms: tokens of the triplets seen so far
FLOPS_SEEN = "flops_seen"                   # nominal training FLOPs of those tokens
FLOPS_EXECUTED = "flops_executed"           # FLOPs the training path ran (fewer with packing): for MFU
THROUGHPUT = "throughput/tokens_per_s"
MFU = "mfu"
VAL_LOSS_FINAL = "val/loss_final"
VAL_ACC_FINAL = "val/acc_final"
# a WSD decay branch's end (train.decay_at): its own point, with its own tokens and FLOPs,
# logged at the step where the branch left the run
DECAY_VAL_LOSS = "decay/val_loss"
DECAY_VAL_ACC = "decay/val_acc"
DECAY_TOKENS = "decay/tokens_seen"
DECAY_FLOPS = "decay/flops_seen"

# ---------------------------------------------------------------- tags
RUN_KEY = "run_key"                         # also a parameter: the hash of what changes the result
SWEEP_ID = "sweep_id"
GIT_SHA = "git_sha"
KIND_TAG = "polar.kind"
JOB, SWEEP, ANALYSIS = "job", "sweep", "analysis"       # its values
ERROR_TAG = "polar.error"                   # why a run ended FAILED, KILLED or waits SCHEDULED
CHECKPOINT_DIR_TAG = "checkpoint_dir"
HOST_TAG, PID_TAG, PID_START_TAG = "polar.host", "polar.pid", "polar.pid_start"
SLURM_JOB_TAG = "polar.slurm_job"           # JOBID, or ARRAYJOBID_TASKID for an array task
RUN_NAME_TAG = "mlflow.runName"             # MLflow's own
PARENT_RUN_TAG = "mlflow.parentRunId"       # MLflow's own: nests job runs under their sweep's run
FLOPS_CONVENTION = "6N+12LdS fwd+bwd (PaLM)"

# ---------------------------------------------------------------- files of a run folder (and artifacts)
METRICS_FILE = "metrics.jsonl"              # every metric point, params, tags and status records
CONFIG_FILE = "config.yaml"                 # the job's resolved config
OVERRIDES_FILE = "overrides.yaml"           # its Hydra overrides

# ---------------------------------------------------------------- analysis runs (polar.kind = analysis)
FIT_N, FIT_C = "fit_n", "fit_c"             # the L(N) fit and the compute frontier's L(C) fit
N_RUNS, N_FAILED = "n_runs", "n_failed"     # parameters: runs fitted, runs that failed
N_COUNT = "n_params_count"                  # parameter: what N counts in the fits (all | nonembed)


def fit_metric(fit: str, key: str) -> str:
    """An analysis run's metric: a fit's parameter or R^2, e.g. fit_n/b, fit_c/r2."""
    return f"{fit}/{key}"


@dataclass(frozen=True)
class RunParams:
    """A job run's parameters; each field's name is the MLflow parameter's name."""

    model: str
    n_params: int                           # all parameters, embeddings included
    n_params_nonembed: int
    flops_per_token: float                  # forward + backward, attention included (FLOPS_CONVENTION)
    tokens: float                           # planned, in data terms
    compute: float                          # planned training FLOPs of those tokens
    lr: float
    batch_size: int
    seq_len: float
    seed: int
    steps: int
    data_id: str
    run_key: str
    sweep_id: str
    git_sha: str
    flops_convention: str = FLOPS_CONVENTION
    stage: str = "pretrain"
    init_from: str | None = None            # where the backbone (or fine-tuned model) comes from
    backbone_tokens: float | None = None    # the backbone's own pre-training tokens

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


PARAM_NAMES = tuple(f.name for f in fields(RunParams))
# the parameters analysis carries beside each ScalingRecord (records, replicas, reports)
RECORD_EXTRAS = ("flops_per_token", "lr", "batch_size", "seq_len", "seed", "data_id", "run_key", "sweep_id")


@dataclass(frozen=True)
class ScalingRecord:
    """One finished run (or one WSD decay point): what the scaling-law fits consume."""

    run_id: str
    model: str
    n_params: float
    n_params_nonembed: float
    tokens: float
    compute: float
    loss: float


RECORD_COLUMNS = [f.name for f in fields(ScalingRecord)]
CURVE_COLUMNS = ["run_id", "step", TOKENS_SEEN, FLOPS_SEEN, "val_loss"]
