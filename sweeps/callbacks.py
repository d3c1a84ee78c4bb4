"""Hydra callbacks that run in the submitting process, around a whole sweep.

MlflowSweep, before any job starts:
- resolves the tracking URI once (tracking.uri, else $MLFLOW_TRACKING_URI, else
  MLflow's default sqlite:///mlflow.db made absolute) and exports it, so that every job
  logs to the same store whatever its working directory;
- creates the sweep's MLflow experiment (parallel jobs creating one experiment can race
  in MLflow and log into Default) and a parent run tagged polar.kind=sweep, sweep_id and
  git_sha, whose children the jobs' runs become (tag mlflow.parentRunId);
- ends as FAILED the runs of this experiment whose process on this host is gone
  (SIGKILL, OOM), with the reason in tag polar.error;
and hands the ids to the jobs through the environment (inherited by local jobs and by
sbatch). At the end the parent run is FINISHED, or FAILED naming the failed jobs; if the
sweep stops early (a job raised), an exit hook ends it the same way.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sweeps.runs import ENV_EXPERIMENT_ID, ENV_PARENT_RUN_ID, ENV_SWEEP_ID, git_sha, quiet_http_retries


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.uri: str | None = None
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend == "off" or config.hydra.launcher.get("_target_", "").endswith("DryRunLauncher"):
            return
        from polar.tracking import create_run, ensure_experiment, mark_dead_runs, process_tags

        quiet_http_retries()
        self.uri = resolved_uri(config.tracking.uri)
        if config.tracking.uri is None:
            os.environ["MLFLOW_TRACKING_URI"] = self.uri
        sweep_id = f"{config.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            exp_id = ensure_experiment(config.experiment_name, self.uri)
        except Exception as err:
            raise RuntimeError(f"MLflow at {self.uri} cannot be reached or refused the experiment "
                               f"{config.experiment_name!r} ({type(err).__name__}: {str(err)[:300]}); start the "
                               "tracking server (see the README) or run with tracking=off") from err
        dead = mark_dead_runs(exp_id, self.uri)
        if dead:
            print(f"marked FAILED (their process is gone): {', '.join(dead)}", flush=True)
        self.parent_run_id = create_run(
            exp_id, f"sweep-{sweep_id}",
            {"polar.kind": "sweep", "sweep_id": sweep_id, "git_sha": git_sha(), **process_tags()}, self.uri)
        self.experiment_id = exp_id
        os.environ.update({ENV_EXPERIMENT_ID: exp_id, ENV_PARENT_RUN_ID: self.parent_run_id,
                           ENV_SWEEP_ID: sweep_id})
        atexit.register(self._close)
        print(f"sweep {sweep_id}: MLflow experiment {config.experiment_name!r} (id {exp_id}) at {self.uri}",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        """End the parent run: FAILED with the failed jobs' names if any child failed."""
        if not self.parent_run_id:
            return
        from mlflow import MlflowClient

        from polar.tracking import ERROR_TAG

        run_id, self.parent_run_id = self.parent_run_id, None
        try:
            client = MlflowClient(self.uri)
            children = client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                          max_results=10000)
            bad = [r.info.run_name for r in children if r.info.status in ("FAILED", "KILLED")]
            if bad:
                client.set_tag(run_id, ERROR_TAG, f"{len(bad)} of {len(children)} jobs failed: {', '.join(bad)}")
            client.set_terminated(run_id, "FAILED" if bad else "FINISHED")
        except Exception as err:   # noqa: BLE001 - the jobs' results matter more than the parent's status
            print(f"could not end the sweep's parent run {run_id}: {err}", flush=True)


def resolved_uri(uri: str | None) -> str:
    """The tracking URI a job would use, with a relative sqlite path made absolute."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + os.path.abspath(uri[len(prefix):])
    return uri
