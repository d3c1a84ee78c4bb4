"""The debug model's loss curve against a saved reference (as torchtitan checks its own).

The debug model (conf/model/debug.yaml) trains DEBUG_STEPS steps of DEBUG_TRAIN
(tests/fixtures.py) on the easy synthesized data set, on the CPU, in float32, on one
thread, from a fixed seed, through the real path (BPE tokenizer, synthesis, tokenization,
polar.trainer.fit); its train/loss at every step and its val/loss at every evaluation
must equal tests/assets/loss_curve_debug.json within RTOL/ATOL. Run to run, on one kind
of CPU, the numbers are bitwise equal; the tolerance only absorbs other BLAS kernels.

A change that moves these numbers (the model, the initialisation, the data, the loss,
the optimizer, the schedule: say the warmup fraction) fails this test until the
reference is regenerated on purpose:

    POLAR_UPDATE_REFERENCE=1 .venv/bin/python -m pytest tests/test_loss_curve.py

which rewrites the file and then fails, saying so (a run with the variable never
passes); review the diff of the JSON, commit it with the change, and run the test again.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import DEBUG_MODEL, DEBUG_STEPS, DEBUG_TRAIN, ListSink, easy_data_config, seeded_model

REFERENCE = Path(__file__).parent / "assets" / "loss_curve_debug.json"
UPDATE_ENV = "POLAR_UPDATE_REFERENCE"
REGENERATE = f"{UPDATE_ENV}=1 .venv/bin/python -m pytest tests/test_loss_curve.py"
RTOL, ATOL = 1e-4, 1e-5
CURVES = ("train/loss", "val/loss")


def settings() -> dict:
    """What the curve is a function of, written beside it so that a failure can say what changed."""
    return {"model": asdict(DEBUG_MODEL), "train": asdict(DEBUG_TRAIN), "steps": DEBUG_STEPS,
            "data": asdict(easy_data_config())}


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine()}


def train_debug_model(easy_data, run_dir: Path) -> dict[str, dict[str, float]]:
    """{curve: {step: value}} of one training of the debug model."""
    import torch

    from polar.trainer import fit

    train, val, special = easy_data
    torch.set_num_threads(DEBUG_TRAIN.threads)
    sink = ListSink()
    fit(seeded_model(special, DEBUG_MODEL, seed=DEBUG_TRAIN.seed), train, val, special, DEBUG_TRAIN,
        DEBUG_STEPS, 1.0, run_dir, sink, progress=False)
    return {name: {str(step): metrics[name] for metrics, step in sink.points if name in metrics}
            for name in CURVES}


def changed_settings(saved: dict) -> list[str]:
    """'section.field: saved -> now' for every setting that differs from the reference's."""
    now, out = settings(), []
    for section in sorted(set(now) | set(saved)):
        old, new = saved.get(section), now.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            out.append(f"{section}: {old!r} -> {new!r}")
    return out


def write_reference(curves: dict) -> None:
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    record = {"about": f"{__doc__.splitlines()[0]} Regenerate: {REGENERATE}",
              "settings": settings(), "written_with": versions(), **curves}
    REFERENCE.write_text(json.dumps(record, indent=1) + "\n")


def test_debug_model_reproduces_its_saved_loss_curve(easy_data, tmp_path):
    curves = train_debug_model(easy_data, tmp_path)
    assert list(curves["train/loss"]) == [str(s) for s in range(1, DEBUG_STEPS + 1)]
    # the curve is worth keeping: the debug model learns the easy data from chance (ln 2)
    assert list(curves["val/loss"].values())[-1] < math.log(2) - 0.2, curves["val/loss"]
    if os.environ.get(UPDATE_ENV) == "1":
        write_reference(curves)
        pytest.fail(f"{UPDATE_ENV}=1: rewrote {REFERENCE}; review and commit its diff, then run "
                    f"the test again without {UPDATE_ENV}")
    assert REFERENCE.exists(), f"no reference loss curve at {REFERENCE}; write it with {REGENERATE}"
    saved = json.loads(REFERENCE.read_text())
    why = (f"the debug model's loss curve moved. Settings changed since the reference was written: "
           f"{changed_settings(saved['settings']) or 'none'}; written with {saved['written_with']}, "
           f"now {versions()}. If the change is meant, regenerate it: {REGENERATE}")
    for name in CURVES:
        assert list(curves[name]) == list(saved[name]), f"{name} steps differ: {why}"
        np.testing.assert_allclose(list(curves[name].values()), list(saved[name].values()), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{name}: {why}")
