"""python -m analysis.report on bad input (issue 17, items 8 and 13): a bad, unreachable or
missing tracking store is refused in seconds with one message and nothing created;
duplicate run keys are kept once when they agree and refused when they differ; a report
that fails midway leaves its output folder exactly as it was."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_analysis_report import _jsonl_run

ROOT = Path(__file__).resolve().parents[1]


def _report(args, cwd, timeout=60):
    """The CLI in a subprocess without MLFLOW_TRACKING_URI: (rc, stdout, stderr, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def _one_clean_message(rc, out, err):
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    assert len((out + err).strip().splitlines()) == 1, out + err
    return err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unreachable_server_is_refused_in_seconds_without_the_password(tmp_path):
    port = _free_port()
    rc, out, err, seconds = _report(["--experiment", "x", "--tracking-uri", f"http://alice:T0KEN@127.0.0.1:{port}",
                                     "--out", str(tmp_path / "rep")], tmp_path)
    _one_clean_message(rc, out, err)
    assert seconds < 15
    assert f"'http://alice:***@127.0.0.1:{port}'" in err and "cannot reach" in err and "T0KEN" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_accepts_but_never_answers_is_refused():
    from analysis.records import RunsError, check_tracking_uri

    with socket.socket() as silent:                  # listens (connections succeed), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(RunsError, match=rf"cannot reach 127.0.0.1:{port} within 0.5 s \(no answer\)"):
            check_tracking_uri(f"http://127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t0 < 5


def test_bad_scheme_is_refused_naming_the_valid_ones(tmp_path):
    rc, out, err, _ = _report(["--experiment", "x", "--tracking-uri", "htp://localhost:5000"], tmp_path)
    _one_clean_message(rc, out, err)
    assert "'htp://localhost:5000'" in err and "scheme 'htp'" in err and "http(s)://HOST:PORT" in err
    assert "registry" not in err.lower()


@pytest.mark.parametrize("uri", ["sqlite:///does/not/exist.db", "sqlite:///missing.db", None])
def test_missing_sqlite_store_is_refused_and_not_created(tmp_path, uri):
    args = ["--experiment", "x"] + (["--tracking-uri", uri] if uri else [])  # None: MLflow's default, ./mlflow.db
    rc, out, err, _ = _report(args, tmp_path)
    _one_clean_message(rc, out, err)
    assert "does not exist" in err and "never creates a tracking store" in err
    assert ("exist.db" if uri and "exist" in uri else ".db") in err
    assert list(tmp_path.iterdir()) == []       # no database, no folder, no mlruns


def test_a_file_that_is_no_mlflow_store_is_refused_and_left_alone(tmp_path):
    from analysis.records import RunsError, check_tracking_uri

    (tmp_path / "notes.db").write_text("not a database\n")
    (tmp_path / "empty.db").touch()
    with pytest.raises(RunsError, match="cannot be read as an sqlite database"):
        check_tracking_uri(f"sqlite:///{tmp_path}/notes.db")
    with pytest.raises(RunsError, match="is not an MLflow tracking store"):
        check_tracking_uri(f"sqlite:///{tmp_path}/empty.db")
    assert (tmp_path / "notes.db").read_text() == "not a database\n" and (tmp_path / "empty.db").stat().st_size == 0
    with pytest.raises(RunsError, match="folder .*nostore.* does not exist"):
        check_tracking_uri(str(tmp_path / "nostore"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.db"]


def _runs(root: Path) -> Path:
    runs = root / "runs"
    for i, n in enumerate([1e4, 1e5, 1e6]):
        _jsonl_run(runs, f"k{i}", model=f"m{i}", n=n, loss=n ** -0.1, status="FINISHED")
    return runs


def _copy_run(runs: Path, key: str, to: str, loss: float | None = None) -> None:
    """A copy of run folder ``key`` under another name (same run_key), its loss changed if given."""
    (runs / to).mkdir()
    for f in (runs / key).iterdir():
        text = f.read_text()
        if loss is not None and f.name == "metrics.jsonl":
            lines = [json.loads(line) for line in text.splitlines()]
            for rec in lines:
                if rec.get("step") == 100:
                    rec["val/loss"] = loss
            text = "".join(json.dumps(rec) + "\n" for rec in lines)
        (runs / to / f.name).write_text(text)


def test_duplicate_run_keys_that_agree_are_kept_once_with_a_note(tmp_path, capsys):
    from analysis.report import main

    runs = _runs(tmp_path)
    _copy_run(runs, "k1", "k1-backup")
    assert main(["--runs-dir", str(runs), "--out", str(tmp_path / "rep"), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    assert "run key 'k1' appears in 2 finished runs" in err and f"kept {runs / 'k1'}" in err
    fits = json.loads((tmp_path / "rep" / "fits.json").read_text())
    assert [r["run_id"] for r in fits["runs"]] == ["k0", "k1", "k2"]
    assert "## Duplicate run keys" in (tmp_path / "rep" / "report.md").read_text()


def test_duplicate_run_keys_that_differ_are_refused_before_any_output(tmp_path, capsys):
    from analysis.report import main

    runs = _runs(tmp_path)
    _copy_run(runs, "k1", "k1-other", loss=0.123)
    jsonl = (runs / "k1-other" / "metrics.jsonl").read_text()
    assert "0.123" in jsonl, jsonl[:500]          # the copy's final loss really differs
    assert main(["--runs-dir", str(runs), "--out", str(tmp_path / "rep"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "run key 'k1' has 2 finished runs with different results" in err and "k1-other" in err
    assert not (tmp_path / "rep").exists()


def test_dedupe_keeps_the_first_mlflow_run_when_they_agree():
    import pandas as pd

    from analysis.records import RunsError, _dedupe

    row = {"run_key": "k", "loss": 0.5, "n_params": 1e6, "tokens": 1e7, "compute": 6e13}
    curve = pd.DataFrame()
    rows, _, _, notes = _dedupe([("MLflow run a", row, curve, curve), ("MLflow run b", dict(row), curve, curve),
                                 ("MLflow run c", {**row, "run_key": None}, curve, curve)])
    assert len(rows) == 2 and notes == ["run key 'k' appears in 2 finished runs (MLflow run a, MLflow run b) "
                                        "with the same result; kept MLflow run a (the first found; all agree "
                                        "on the result)"]
    with pytest.raises(RunsError, match="MLflow run a: loss 0.5, MLflow run b: loss 0.6"):
        _dedupe([("MLflow run a", row, curve, curve), ("MLflow run b", {**row, "loss": 0.6}, curve, curve)])


@pytest.mark.parametrize("error", [RuntimeError("plot broke"), OSError(28, "No space left on device")])
def test_a_report_failing_midway_leaves_the_output_folder_as_it_was(tmp_path, monkeypatch, capsys, error):
    from analysis import plots
    from analysis.report import main

    runs, out = _runs(tmp_path), tmp_path / "rep"
    args = ["--runs-dir", str(runs), "--out", str(out), "--bootstrap", "0"]
    assert main(args) == 0
    (out / "notes.txt").write_text("mine\n")
    (out / "isoflop.png").write_bytes(b"stale plot")     # a report's file this grid does not produce
    before = _listing(out)

    _jsonl_run(runs, "k3", model="m3", n=1e7, loss=1e7 ** -0.1, status="FINISHED")

    def broken(*a, **k):
        raise error

    with monkeypatch.context() as m:
        m.setattr(plots, "plot_residuals", broken)
        if isinstance(error, OSError):
            assert main(args) == 2
            assert "No space left on device" in capsys.readouterr().err
        else:
            with pytest.raises(RuntimeError, match="plot broke"):
                main(args)
    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "runs"]   # no temporary sibling left

    assert main(args) == 0                              # the next report replaces ours, keeps the rest
    after = _listing(out)
    assert after["notes.txt"] == b"mine\n" and "isoflop.png" not in after
    assert len(json.loads(after["fits.json"])["runs"]) == 4


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    from analysis.report import main

    (tmp_path / "rep").write_text("x")
    assert main(["--runs-dir", str(_runs(tmp_path)), "--out", str(tmp_path / "rep"), "--bootstrap", "0"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "rep").read_text() == "x"
