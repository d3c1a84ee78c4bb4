"""Entry point: `python -m sweeps.run -m model=1m,3m budget.tokens=2e6` (or +experiment=NAME).

Hydra composes conf/ over the schema in sweeps/schema.py and expands the grid; the
launcher (hydra/launcher=local|slurm|dryrun) starts one job per point, and each job
converts its config to dataclasses once and hands it to sweeps.jobs.run_job. A single
run (no -m) is checked first as a sweep's jobs are (sweeps.sweep_plan.plan_single): a bad
config or input is one paragraph (a JobError's message, exit status 1), not a traceback.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sweeps.schema import register

register()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from sweeps.jobs import run_job
    from sweeps.schema import to_job_config

    if HydraConfig.get().mode.name == "MULTIRUN":   # the launcher checked every job of the sweep
        return run_job(to_job_config(cfg), job_index=f"{HydraConfig.get().job.num + 1}")["val_loss"]
    import torch

    from sweeps.sweep_plan import JobError, plan_single

    if not HydraConfig.get().launcher._target_.endswith("LocalLauncher"):
        print(f"note: a single run (no -m) runs here; hydra/launcher={HydraConfig.get().runtime.choices.get('hydra/launcher')} "
              "applies to sweeps: add -m to submit it", file=sys.stderr, flush=True)

    try:
        job, plan = plan_single(lambda: to_job_config(cfg), gpu_here=torch.cuda.is_available())
    except JobError as err:   # its message alone, as a sweep's; Hydra would echo the overrides (and a URI's token)
        print(err, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    return run_job(job, job_index="1/1", plan=plan)["val_loss"]


if __name__ == "__main__":
    main()
