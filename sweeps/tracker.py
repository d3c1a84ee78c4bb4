"""The job's tracking: its MLflow run (found by run key, created, resumed, ended) and a
JSONL copy of every metric beside its checkpoints.

MLflow is imported lazily; with tracking.backend=off only the JSONL file is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sweeps.schema import JobConfig

ENV_EXPERIMENT_ID = "POLAR_MLFLOW_EXPERIMENT_ID"
ENV_PARENT_RUN_ID = "POLAR_PARENT_RUN_ID"
ENV_SWEEP_ID = "POLAR_SWEEP_ID"
RUN_ID_FILE = "mlflow_run_id"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """The job's MLflow run (or none with tracking=off) plus a JSONL copy of every metric."""

    def __init__(self, job: JobConfig, run_id: str | None, finished: bool, final_loss: float | None,
                 run_dir: Path):
        from polar.tracking import JsonlSink, MLflowSink, NullSink, TeeSink

        self.job, self.run_id, self.finished, self.final_loss = job, run_id, finished, final_loss
        remote = MLflowSink(run_id, job.tracking.uri) if run_id else NullSink()
        self.sink = TeeSink(JsonlSink(run_dir / "metrics.jsonl"), remote)
        self.run_dir = run_dir

    @classmethod
    def open(cls, job: JobConfig, key: str, name: str, run_dir: Path) -> "Tracker":
        if job.tracking.backend == "off":
            return cls(job, None, False, None, run_dir)
        from polar.tracking import create_run, ensure_experiment, find_run

        exp_id = os.environ.get(ENV_EXPERIMENT_ID) or ensure_experiment(job.experiment_name, job.tracking.uri)
        run = find_run(exp_id, key, job.tracking.uri)
        if run is not None and run.info.status == "FINISHED":
            return cls(job, run.info.run_id, True, run.data.metrics.get("val/loss_final"), run_dir)
        if run is not None and (run_dir / RUN_ID_FILE).exists():
            run_id = (run_dir / RUN_ID_FILE).read_text().strip()   # resume into the same run
        else:
            tags = {"run_key": key, "polar.kind": "job", "sweep_id": os.environ.get(ENV_SWEEP_ID, "none"),
                    "git_sha": git_sha()}
            if os.environ.get(ENV_PARENT_RUN_ID):
                tags["mlflow.parentRunId"] = os.environ[ENV_PARENT_RUN_ID]
            run_id = create_run(exp_id, name, tags, job.tracking.uri)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_ID_FILE).write_text(run_id)
        return cls(job, run_id, False, None, run_dir)

    def start(self, params: dict) -> None:
        from polar.tracking import JsonlSink

        if self.run_id:
            from mlflow import MlflowClient
            client = MlflowClient(self.job.tracking.uri)
            existing = client.get_run(self.run_id).data.params
            new = {k: v for k, v in params.items() if k not in existing}
            if new:
                self.sink.sinks[1].log_params(new)
            client.update_run(self.run_id, status="RUNNING")
        JsonlSink(self.run_dir / "metrics.jsonl").log_params(params)

    def complete(self, result, model_dir: Path, log_model: bool) -> None:
        self.sink.log_many([({"val/loss_final": result.val_loss, "val/acc_final": result.val_acc}, result.steps)])
        self.sink.set_tags({"checkpoint_dir": str(self.run_dir.resolve())})
        if self.run_id and log_model:
            from mlflow import MlflowClient
            MlflowClient(self.job.tracking.uri).log_artifacts(self.run_id, str(model_dir), "model")
        self.sink.finish("FINISHED")

    def fail(self, err: BaseException) -> None:
        message = f"{type(err).__name__}: {err}"[:4000]
        try:
            self.sink.set_tags({"polar.error": message})
            self.sink.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except Exception as log_err:   # never hide the original error behind a logging one
            print(f"could not mark the run as failed: {log_err}", file=sys.stderr)
