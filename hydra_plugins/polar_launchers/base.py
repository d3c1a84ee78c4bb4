"""What POLAR's launchers share: keep Hydra's context, check the whole sweep first, and
launch apps that are not POLAR sweeps as plain Hydra jobs.

`plan_jobs` composes, converts and plans every job of a batch before a launcher starts
or submits any (sweeps.sweep_plan.plan_sweep), and on a bad sweep marks the MLflow
parent run that sweeps.callbacks created as FAILED before raising.

A POLAR sweep is an app whose config is composed over sweeps.schema.JobConfig, as
sweeps.run's is (`is_polar_sweep`). Any other Hydra app (Hydra's own launcher test
suite runs its example apps through these launchers) has no plan: its jobs are only
composed, every one before the first starts (`compose_jobs`), and then run as Hydra's
own launchers run them (local: one after the other in this process; slurm: one job
array with the launcher's resources; dryrun: nothing).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from hydra.core.utils import filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def tracking_uri(config: DictConfig) -> Optional[str]:
    tracking = config.get("tracking")
    return tracking.get("uri") if tracking is not None else None


def is_polar_sweep(config: DictConfig) -> bool:
    """Whether the app's config is composed over sweeps.schema.JobConfig (sweeps.run's is)."""
    from sweeps.schema import JobConfig

    kind = OmegaConf.get_type(config)
    return isinstance(kind, type) and issubclass(kind, JobConfig)


def plan_jobs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int, refuse_local: bool = False, gpu_here: bool = False, dry: bool = False):
    """sweeps.sweep_plan.plan_sweep with Hydra's composition; a SweepError also fails the
    MLflow parent run."""
    from hydra.core.utils import setup_globals

    from sweeps.runs import terminate_parent_run
    from sweeps.sweep_plan import SweepError, compose_with_hydra, plan_sweep

    setup_globals()
    try:
        return plan_sweep(job_overrides, compose_with_hydra(hydra_context, config), initial_job_idx,
                          refuse_local=refuse_local, gpu_here=gpu_here, dry=dry)
    except SweepError as err:
        terminate_parent_run(str(err), tracking_uri(config))
        raise


def sweep_config(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str], idx: int) -> DictConfig:
    """One job's config as Hydra's launchers compose it (its job id and number = idx), in
    the sweep folder of the whole sweep (a ${now:...} in it resolved once, here)."""
    from sweeps.sweep_plan import shown

    log.info(f"\t#{idx} : {shown(filter_overrides(overrides))}")
    cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
        cfg.hydra.sweep.dir = str(config.hydra.sweep.dir)
    return cfg


def compose_jobs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int):
    """The jobs of an app that is not a POLAR sweep, each composed (sweeps.sweep_plan.PlainJob),
    or one SweepError naming every job that does not compose, before any job starts."""
    from hydra.core.utils import setup_globals

    from sweeps.sweep_plan import PlainJob, check_every_job

    setup_globals()
    return check_every_job(
        job_overrides, lambda idx, ovs: PlainJob(idx, ovs, sweep_config(hydra_context, config, ovs, idx)),
        initial_job_idx)


class PlanningLauncher(Launcher):
    """A Launcher that keeps setup()'s arguments (as Hydra's own launchers do)."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
