"""`hydra/launcher=local`: Hydra's BasicLauncher (jobs one after another in this process),
after every job of the sweep has been composed and planned, so a bad job at the end of a
sweep fails it before the first job trains. Without a GPU, a job that derive.local_refusal
refuses (too much memory or time for this machine) fails the whole sweep up front.
"""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn

from hydra_plugins.polar_launchers.base import plan_jobs


class LocalLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweeps.launch import no_gpu_here

        assert self.config is not None and self.hydra_context is not None
        plan_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx, refuse_local=no_gpu_here())
        return super().launch(job_overrides, initial_job_idx)
