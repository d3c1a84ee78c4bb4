"""python -m analysis.fit: JSON shape, readable table, bad input with named problems."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.fit import main
from analysis.laws import power

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def csv(tmp_path):
    n = np.geomspace(1e5, 1e8, 10)
    loss = power(n, 0.9, -0.0425) * np.exp(np.random.default_rng(0).normal(0, 0.003, n.size))
    path = tmp_path / "runs.csv"
    pd.DataFrame({"n_params": n, "compute": 120 * n * n, "loss": loss}).to_csv(path, index=False)
    return path


def test_json_is_exactly_one_object_on_stdout(csv):
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.fit", "--csv", str(csv), "--law", "power", "--json",
         "--bootstrap", "50", "--seed", "1", "--holdout-above", "2e7"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # fails on anything but one JSON document
    assert set(out) == {"law", "x", "params", "objective", "r2", "r2_log", "mape", "n", "seconds", "ci", "holdout"}
    assert out["law"] == "power" and out["x"] == "n_params" and out["n"] == 10
    assert set(out["params"]) == {"a", "b"} and out["params"]["b"] == pytest.approx(-0.0425, abs=0.003)
    assert set(out["ci"]) == {"a", "b"} and all(len(v) == 2 and v[0] <= v[1] for v in out["ci"].values())
    assert set(out["holdout"]) == {"n", "mape", "max_ape", "coverage"} and out["holdout"]["n"] == 3


def test_json_without_options_has_base_keys_and_compute_axis(csv, capsys):
    assert main(["--csv", str(csv), "--law", "power", "--x", "compute", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"law", "x", "params", "objective", "r2", "r2_log", "mape", "n", "seconds"}
    assert out["x"] == "compute"
    assert out["params"]["b"] == pytest.approx(-0.0425 / 2, abs=0.002)  # C ~ N^2 here


def test_chinchilla_from_compute_only_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = np.repeat(np.geomspace(1e7, 1e10, 6), 5)
    d = np.tile(np.geomspace(1e9, 1e12, 5), 6)
    loss = (1.69 + 406.4 * n ** -0.34 + 410.7 * d ** -0.28) * np.exp(rng.normal(0, 0.002, n.size))
    path = tmp_path / "c.csv"
    pd.DataFrame({"n_params": n, "compute": 6 * n * d, "loss": loss}).to_csv(path, index=False)  # no tokens
    assert main(["--csv", str(path), "--law", "chinchilla", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert out["params"]["E"] == pytest.approx(1.69, rel=0.03)


def test_table_output(csv, capsys):
    assert main(["--csv", str(csv), "--law", "saturating", "--bootstrap", "20"]) == 0
    text = capsys.readouterr().out
    assert "law        saturating" in text and "95% CI" in text and "R^2" in text
    assert not text.lstrip().startswith("{")


@pytest.mark.parametrize("frame, args, message", [
    ({"n_params": [1e5, 1e6], "loss": [0.5, 0.4]}, ["--x", "compute"],
     r"needs columns \['compute', 'loss'\]; missing \['compute'\]"),
    ({"n_params": [1e5, 1e6], "val": [0.5, 0.4]}, [], "has no 'loss' column"),
    ({"n_params": [1e5, 1e6, 1e7], "loss": [0.5, -0.4, 0.3]}, [], r"'loss' must be > 0 .*got -0.4 at rows \[1\]"),
    ({"n_params": [1e5, 1e6, 1e7], "loss": [0.5, "x", 0.3]}, [],
     r"column 'loss' has non-numeric values \['x'\] at rows \[1\]; every value must be a number"),
    ({"n_params": [1e5, 1e6, 1e7], "loss": [0.5, None, 0.3]}, [], r"column 'loss' has NaN or infinite values at rows \[1\]"),
    ({"n_params": [1e5, 0, 1e7], "loss": [0.5, 0.4, 0.3]}, [], r"column 'n_params' must be > 0 .*got 0.0 at rows \[1\]"),
    ({"n_params": [1e5, 1e6, 1e7], "tokens": [1e6, -1, 1e6], "loss": [0.5, 0.4, 0.3]}, ["--x", "compute"],
     r"column 'compute' must be > 0"),
    ({"n_params": [1e5], "loss": [0.5]}, [], "only 1 points were given; need at least 2"),
    ({"n_params": [1e5, 1e6, 1e7], "loss": [0.5, 0.4, 0.3]}, ["--holdout-above", "1e9"],
     "leaves no rows to test"),
])
def test_bad_input_exits_nonzero_with_message(tmp_path, capsys, frame, args, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(frame).to_csv(path, index=False)
    assert main(["--csv", str(path), "--law", "power", *args, "--json"]) == 2
    cap = capsys.readouterr()
    assert pytest.importorskip("re").search(message, cap.err), cap.err
    assert set(json.loads(cap.out)) == {"error"}


def test_missing_file(tmp_path, capsys):
    assert main(["--csv", str(tmp_path / "nope.csv"), "--law", "power"]) == 2
    assert "nope.csv' does not exist" in capsys.readouterr().err
