"""Hydra callbacks that run in the submitting process, around a whole sweep.

MlflowSweep, before any job starts, resolves the tracking URI once and exports it (so
that every job logs to the same store whatever its working directory), then opens the
sweep's experiment and parent run (sweeps.runs.open_sweep); at the end it closes the
parent run (sweeps.runs.close_sweep), and an exit hook does the same if the sweep stops
early. Before each job runs, a tracking URI's credentials are hidden in the files Hydra
saved for it (`redact_files`). The run lifecycle itself lives in sweeps.runs.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.uri: str | None = None
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend == "off" or config.hydra.launcher.get("_target_", "").endswith("DryRunLauncher"):
            return
        from sweeps.runs import open_sweep, redact, resolved_uri, ui_link

        self.uri = resolved_uri(config.tracking.uri)
        if config.tracking.uri is None:
            os.environ["MLFLOW_TRACKING_URI"] = self.uri
        self.experiment_id, self.parent_run_id, sweep_id = open_sweep(config.experiment_name, self.uri)
        atexit.register(self._close)
        print(f"sweep {sweep_id}: MLflow experiment {config.experiment_name!r} (id {self.experiment_id}) "
              f"at {redact(self.uri)}; its runs in the UI: {ui_link(self.uri, self.experiment_id)}", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra has saved the job's config (.hydra/*.yaml) and the sweep's multirun.yaml by
        now: hide a tracking URI's credentials in them (sweeps.runs.redact)."""
        from pathlib import Path

        hc = config.hydra
        files = [Path(hc.sweep.dir) / "multirun.yaml"] if hc.mode.name == "MULTIRUN" else []
        if hc.output_subdir is not None:
            files += sorted((Path(hc.runtime.output_dir) / hc.output_subdir).glob("*.yaml"))
        redact_files(files)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.parent_run_id:
            from sweeps.runs import close_sweep

            run_id, self.parent_run_id = self.parent_run_id, None
            close_sweep(self.uri, self.experiment_id, run_id)


def redact_files(paths) -> None:
    """Rewrite each file that holds a URI's credentials with them hidden (atomically: a
    parallel job may do the same to a shared file)."""
    from polar.atomic import write_text_atomic
    from sweeps.runs import redact

    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if (hidden := redact(text)) != text:
            write_text_atomic(path, hidden)
