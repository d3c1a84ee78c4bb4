"""Entry point: `python -m sweeps.run -m model=1m,3m budget.tokens=2e6` (or +experiment=NAME).

Hydra composes conf/ over the schema in sweeps/schema.py and expands the grid; the
launcher (hydra/launcher=local|slurm|dryrun) starts one job per point, and each job
converts its config to dataclasses once and hands it to sweeps.jobs.run_job.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sweeps.schema import register

register()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from sweeps.jobs import run_job
    from sweeps.schema import to_job_config

    hc = HydraConfig.get()
    index = f"{hc.job.num + 1}" if hc.mode.name == "MULTIRUN" else "1/1"
    return run_job(to_job_config(cfg), job_index=index)["val_loss"]


if __name__ == "__main__":
    main()
