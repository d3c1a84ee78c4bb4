"""POLAR reward-model pre-training: the science (data, model, loss, training, scoring).

This package never imports Hydra; MLflow is used only behind `polar.tracking`.
Heavy modules are imported by the modules that need them, so `import polar` is fast.
"""

__all__ = ["config"]
