"""POLAR's Hydra launchers: dryrun (print the job table), local (validate, then run here)
and slurm (one submitit job array per resource shape).

Hydra discovers them by scanning the `hydra_plugins` namespace package, which imports
every module here: keep module-level imports light (no torch, submitit or mlflow).
Their schemas are registered in config.py (polar_local, polar_dryrun, polar_slurm); the YAML
that selects them, conf/hydra/launcher/{dryrun,local,slurm}.yaml, extends those schemas.
"""
