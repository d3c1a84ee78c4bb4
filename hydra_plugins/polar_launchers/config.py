"""Schemas of POLAR's launchers, registered in Hydra's ConfigStore (group hydra/launcher):
`polar_local`, `polar_dryrun` and `polar_slurm`. conf/hydra/launcher/{local,dryrun,slurm}.yaml
extend them (their defaults list) and set the values; behaviour lives beside, in
local.py, dryrun.py and slurm.py.

PolarSlurmConf extends hydra-submitit-launcher's SlurmQueueConf: every key of
submitit_slurm keeps its meaning, except that the per-job resources (nodes,
gpus_per_node, tasks_per_node, mem_gb, timeout_min, cpus_per_task) default to null =
"from each job's plan" (sweeps.derive, sweeps.sweep_plan.shape_of), so that a sweep
mixing sizes is submitted as one job array per resource shape. A value overrides the
plan for every job; gpus_per_node=0 requests no GPUs (a CPU cluster without GRES).
A job that trains on the CPU (train.device=cpu, as train=cpu sets) never asks for GPUs.
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in
# sys.modules, and dataclasses cannot resolve string annotations then.
from dataclasses import dataclass
from typing import Optional, Union

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class PolarLocalConf:
    _target_: str = "hydra_plugins.polar_launchers.local.LocalLauncher"
    # jobs at once: a positive integer, or "auto" (as many as the cores and memory allow
    # when every job pins train.threads); checked by sweeps.sweep_plan.check_n_jobs
    n_jobs: Union[int, str] = "auto"


@dataclass
class PolarDryRunConf:
    _target_: str = "hydra_plugins.polar_launchers.dryrun.DryRunLauncher"
    show_slurm_arrays: bool = True               # also list the job arrays hydra/launcher=slurm would submit
    gpus_per_node: Optional[int] = None          # as hydra.launcher.gpus_per_node of slurm (0: a CPU cluster)


@dataclass
class PolarSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.polar_launchers.slurm.PolarSlurmLauncher"

    # per-job resources: null = from the job's plan, a value = the same for every job
    nodes: Optional[int] = None                 # type: ignore[assignment]
    gpus_per_node: Optional[int] = None         # 0 = no GPU request (a CPU cluster); CPU jobs never ask
    tasks_per_node: Optional[int] = None        # type: ignore[assignment]  (null: one task per GPU)
    mem_gb: Optional[int] = None                # per node; 0 = all of the node's memory
    cpus_per_task: Optional[int] = None         # null: train.threads for CPU jobs, else SLURM's default
    timeout_min: Optional[int] = None           # type: ignore[assignment]
    # cap on the time limit: longer runs reach it, are requeued and resume (max_num_timeout)
    max_timeout_min: Optional[int] = None

    # a timed-out or preempted job checkpoints, is requeued and resumes (needs > 0)
    max_num_timeout: int = 3

    # before anything is submitted: SLURM must answer within this many seconds ...
    check_timeout_s: float = 15.0
    # ... and `sbatch --test-only` must accept every resource shape of the sweep
    test_only: bool = True
    # how often the waiting sweep looks for results (s) and asks sacct for states (s, at most)
    poll_s: float = 2.0
    state_poll_s: float = 30.0
    # seconds to wait for the result file of a job that SLURM says has ended without one
    result_grace_s: float = 3.0
    # wait for the jobs and fail the sweep when one fails (false: submit and return)
    wait: bool = True


for _name, _node in (("polar_local", PolarLocalConf), ("polar_dryrun", PolarDryRunConf),
                     ("polar_slurm", PolarSlurmConf)):
    ConfigStore.instance().store(group="hydra/launcher", name=_name, node=_node, provider="polar_launchers")
