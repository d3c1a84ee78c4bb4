"""POLAR reward-model pre-training: the science (data, model, loss, training, scoring).

This package never imports Hydra and knows no run lifecycle; MLflow is used only by the
metric sinks (`polar.sinks`); the names that runs carry are in `polar.names`.
Heavy modules are imported by the modules that need them, so `import polar` is fast.
"""

__all__ = ["config"]
