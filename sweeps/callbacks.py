"""Hydra callbacks that run in the submitting process, around a whole sweep.

MlflowSweep creates the sweep's MLflow experiment and a parent run once, before any
job starts (parallel jobs creating one experiment can race in MLflow), and hands their
ids to the jobs through the environment (inherited by local jobs and by sbatch).
"""

from __future__ import annotations

import os
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sweeps.tracker import ENV_EXPERIMENT_ID, ENV_PARENT_RUN_ID, ENV_SWEEP_ID, git_sha


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend == "off" or config.hydra.launcher.get("_target_", "").endswith("DryRunLauncher"):
            return
        from polar.tracking import create_run, ensure_experiment

        self.uri = config.tracking.uri
        sweep_id = f"{config.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_id = ensure_experiment(config.experiment_name, self.uri)
        self.parent_run_id = create_run(exp_id, f"sweep-{sweep_id}",
                                        {"polar.kind": "sweep", "sweep_id": sweep_id, "git_sha": git_sha()},
                                        self.uri)
        os.environ.update({ENV_EXPERIMENT_ID: exp_id, ENV_PARENT_RUN_ID: self.parent_run_id,
                           ENV_SWEEP_ID: sweep_id})
        print(f"sweep {sweep_id}: MLflow experiment {config.experiment_name!r} (id {exp_id})", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id:
            from mlflow import MlflowClient
            MlflowClient(self.uri).set_terminated(self.parent_run_id, "FINISHED")
