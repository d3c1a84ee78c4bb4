"""What POLAR's launchers share: keep Hydra's context, and plan the whole sweep first.

`PlanningLauncher.plan_jobs` composes, converts and plans every job of a batch before a
launcher starts or submits any (sweeps.launch.plan_sweep), and on a bad sweep marks the
MLflow parent run that sweeps.callbacks created as FAILED before raising.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


def tracking_uri(config: DictConfig) -> Optional[str]:
    tracking = config.get("tracking")
    return tracking.get("uri") if tracking is not None else None


def plan_jobs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int, refuse_local: bool = False):
    """sweeps.launch.plan_sweep with Hydra's composition; a SweepError also fails the MLflow parent run."""
    from hydra.core.utils import setup_globals

    from sweeps.launch import SweepError, compose_with_hydra, plan_sweep
    from sweeps.runs import terminate_parent_run

    setup_globals()
    try:
        return plan_sweep(job_overrides, compose_with_hydra(hydra_context, config), initial_job_idx,
                          refuse_local=refuse_local)
    except SweepError as err:
        terminate_parent_run(str(err), tracking_uri(config))
        raise


class PlanningLauncher(Launcher):
    """A Launcher that keeps setup()'s arguments (as Hydra's own launchers do)."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
