"""analysis.records and analysis.report against a real sqlite MLflow store in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlflow")

SIZES = (1e5, 3e5, 1e6, 3e6, 1e7)


def _log_job(client, eid, name, n, rng, *, steps=8):
    from mlflow.entities import Metric, Param

    fpt, tokens = 6 * n, 20 * n
    run = client.create_run(eid, run_name=name, tags={"polar.kind": "job"})
    rid = run.info.run_id
    params = dict(model=name, n_params=int(n), n_params_nonembed=int(0.8 * n), flops_per_token=fpt,
                  tokens=tokens, compute=fpt * tokens, lr=1e-3, batch_size=8, seq_len=128, seed=0,
                  data_id="d0", run_key=f"key-{name}", sweep_id="s0", git_sha="abc")
    metrics, ts = [], 0
    final = 0.9 * n ** -0.0425
    for s in range(1, steps + 1):
        t = tokens * s / steps
        loss = final * (1 + 0.3 * (steps / s - 1) / steps) * np.exp(rng.normal(0, 1e-3))
        ts += 1
        metrics += [Metric("val/loss", loss, ts, s), Metric("tokens_seen", t, ts, s),
                    Metric("flops_seen", t * fpt, ts, s), Metric("train/loss", loss * 1.01, ts, s)]
    metrics.append(Metric("val/loss_final", final, ts, steps))
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(rid, "FINISHED")
    return rid, final


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("ladder", artifact_location=str(root / "artifacts"))
    sweep = client.create_run(eid, run_name="sweep", tags={"polar.kind": "sweep"})
    client.set_terminated(sweep.info.run_id, "FINISHED")
    rng = np.random.default_rng(0)
    finals = {}
    for i, n in enumerate(SIZES):
        rid, final = _log_job(client, eid, f"m{i}", n, rng)
        finals[rid] = final
    bad = client.create_run(eid, run_name="m_oom", tags={"polar.kind": "job", "polar.error": "OutOfMemoryError"})
    client.log_param(bad.info.run_id, "n_params", "30000000")
    client.set_terminated(bad.info.run_id, "FAILED")
    running = client.create_run(eid, run_name="m_running", tags={"polar.kind": "job"})
    client.log_param(running.info.run_id, "n_params", "100")
    client.create_experiment("empty", artifact_location=str(root / "artifacts_empty"))
    return {"uri": uri, "eid": eid, "finals": finals, "failed_id": bad.info.run_id, "root": root}


def test_load_records_reads_finished_jobs_and_failures(store):
    from analysis.records import CURVE_COLUMNS, RECORD_COLUMNS, load_records

    rec = load_records("ladder", store["uri"])
    assert list(rec.records.columns[: len(RECORD_COLUMNS)]) == RECORD_COLUMNS
    assert len(rec.records) == len(SIZES)  # sweep parent, failed and running runs excluded
    assert rec.records["n_params"].tolist() == list(SIZES)  # converted from strings, sorted
    assert rec.records["n_params"].dtype == float
    for row in rec.records.itertuples():
        assert row.loss == pytest.approx(store["finals"][row.run_id])  # val/loss_final, not last val/loss
        assert row.compute == pytest.approx(6 * row.n_params * row.tokens)
    assert rec.records["batch_size"].tolist() == [8] * len(SIZES)
    assert list(rec.curves.columns) == CURVE_COLUMNS
    assert len(rec.curves) == 8 * len(SIZES)
    one = rec.curves[rec.curves["run_id"] == rec.records["run_id"][0]]
    assert one["step"].tolist() == list(range(1, 9))
    assert np.all(np.diff(one["flops_seen"]) > 0)
    assert [(f.name, f.run_id, f.error) for f in rec.failed] == [("m_oom", store["failed_id"], "OutOfMemoryError")]
    assert rec.unfinished == ["m_running"]


def test_load_records_unknown_experiment_names_it(store):
    from analysis.records import RunsError, load_records

    with pytest.raises(RunsError, match=r"no MLflow experiment named 'nope'.*ladder"):
        load_records("nope", store["uri"])


def test_report_end_to_end(store, tmp_path, capsys):
    from mlflow import MlflowClient

    from analysis.report import main

    out = tmp_path / "rep"
    assert main(["--experiment", "ladder", "--tracking-uri", store["uri"], "--out", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    for name in ("report.md", "fits.json", "loss_vs_params.png", "loss_vs_compute.png", "residuals.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fj = json.loads((out / "fits.json").read_text())
    fn = fj["fits"]["loss_vs_params"]
    assert fn["params"]["b"] == pytest.approx(-0.0425, abs=1e-3)  # finals are exactly 0.9 N^-0.0425
    assert fn["r2"] > 0.999
    assert set(fn["ci"]) == {"a", "b"}
    assert fn["holdout"]["n"] == 1
    assert fj["fits"]["loss_vs_compute"]["r2"] > 0.5
    assert [f["name"] for f in fj["failed"]] == ["m_oom"]
    md = (out / "report.md").read_text()
    assert "m_oom" in md and "OutOfMemoryError" in md and "![loss vs N](loss_vs_params.png)" in md
    client = MlflowClient(tracking_uri=store["uri"])
    runs = client.search_runs([store["eid"]], filter_string="tags.`polar.kind` = 'analysis'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "fits.json", "loss_vs_params.png"} <= arts
    assert runs[0].data.metrics["fit_n/b"] == pytest.approx(fn["params"]["b"])
    assert runs[0].data.params["n_params_count"] == "all" and fj["n_params_count"] == "all"


def test_report_without_finished_runs_fails_clearly(store, tmp_path, capsys):
    from analysis.report import main

    code = main(["--experiment", "empty", "--tracking-uri", store["uri"], "--out", str(tmp_path / "r")])
    assert code != 0
    err = capsys.readouterr().err
    assert "experiment 'empty'" in err and "no FINISHED job runs" in err
    assert not (tmp_path / "r").exists()
