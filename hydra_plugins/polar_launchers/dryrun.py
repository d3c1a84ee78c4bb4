"""`hydra/launcher=dryrun`: plan every job of the sweep, print the job table, start nothing.

No training, no MLflow (sweeps.callbacks skips a launcher whose _target_ ends with
DryRunLauncher), no SLURM: it works on any laptop. An invalid job fails the dry run
exactly as it would fail a real launch, listing every bad job. Below the table: the job
arrays that hydra/launcher=slurm would submit (the same shapes, sweeps.sweep_plan.job_shape)
and the jobs that hydra/launcher=local would refuse. Schema: config.py PolarDryRunConf.
An app that is not a POLAR sweep (base.is_polar_sweep) has no plan: its jobs are only
composed, and listed.
"""

from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.polar_launchers.base import PlanningLauncher, compose_jobs, is_polar_sweep, plan_jobs


class DryRunLauncher(PlanningLauncher):
    def __init__(self, show_slurm_arrays: bool = True, gpus_per_node: int | None = None) -> None:
        super().__init__()
        self.show_slurm_arrays = show_slurm_arrays
        self.gpus_per_node = gpus_per_node

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweeps.sweep_plan import job_table, print_flush, shown

        assert self.config is not None and self.hydra_context is not None
        if not is_polar_sweep(self.config):
            jobs = compose_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
            print_flush(f"Dry run: {len(jobs)} job{'s' * (len(jobs) != 1)} composed (not a POLAR sweep, so no "
                        "plan), nothing started:\n" + "\n".join(f"  #{j.idx} {shown(j.overrides)}" for j in jobs))
        else:
            jobs = plan_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx, dry=True)
            print_flush(f"Dry run: {len(jobs)} job{'s' * (len(jobs) != 1)} planned, nothing started.\n")
            print_flush(job_table(jobs))
            print_flush(self.notes(jobs))
        return [JobReturn(overrides=list(j.overrides), status=JobStatus.COMPLETED, _return_value=None,
                          task_name="dryrun") for j in jobs]

    def notes(self, jobs) -> str:
        from sweeps.data_sets import needed, unit_table
        from sweeps.derive import local_refusal
        from sweeps.stages import stage_of
        from sweeps.sweep_plan import group_by_shape, job_shape

        lines = [""]
        if self.show_slurm_arrays:
            groups = group_by_shape(jobs, lambda j: job_shape(j, gpus_per_node=self.gpus_per_node))
            lines.append(f"hydra/launcher=slurm would submit {len(groups)} job array"
                         f"{'s' * (len(groups) != 1)} (one per resource shape):")
            lines += [f"  {shape.describe()}: jobs {' '.join(f'#{j.idx}' for j in group)}"
                      for shape, group in groups.items()]
        data_sets = needed(jobs)
        if data_sets:
            lines.append(unit_table(data_sets, jobs[0].job.resources))
        missing = [(j, m) for j in jobs for m in stage_of(j.job).missing(j.job)]
        if missing:
            lines.append("not on disk yet (every other launcher refuses these jobs until they are):")
            lines += [f"  #{j.idx}: {m}" for j, m in missing]
        refused = [j for j in jobs if local_refusal(j.plan, j.job.resources)]
        if refused:
            lines.append(f"hydra/launcher=local would refuse {len(refused)} of them on a machine without a GPU: "
                         + " ".join(f"#{j.idx} ({j.plan.model})" for j in refused))
        return "\n".join(lines)
