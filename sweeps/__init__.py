"""Config -> jobs: Hydra entry point, structured configs, pure derivation, one job's life."""
