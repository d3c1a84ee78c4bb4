"""Schema of `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml sets its values).

Extends hydra-submitit-launcher's SlurmQueueConf: every key of submitit_slurm keeps its
meaning, except that the per-job resources (nodes, gpus_per_node, tasks_per_node, mem_gb,
timeout_min) default to null = "from each job's plan" (sweeps.derive), so that a sweep
mixing sizes is submitted as one job array per resource shape. A value overrides the
plan for every job; gpus_per_node=0 requests no GPUs (a CPU cluster without GRES).
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in
# sys.modules, and dataclasses cannot resolve string annotations then.
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class PolarSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.polar_launchers.slurm.PolarSlurmLauncher"

    # per-job resources: null = from the job's plan, a value = the same for every job
    nodes: Optional[int] = None                 # type: ignore[assignment]
    gpus_per_node: Optional[int] = None         # 0 = no GPU request (CPU jobs)
    tasks_per_node: Optional[int] = None        # type: ignore[assignment]  (null: one task per GPU)
    mem_gb: Optional[int] = None                # per node; 0 = all of the node's memory
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


ConfigStore.instance().store(group="hydra/launcher", name="polar_slurm", node=PolarSlurmConf,
                             provider="polar_launchers")
