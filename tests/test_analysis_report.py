"""analysis.report on an IsoFLOP grid (no MLflow): Approach 2 and 3 reach the report."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.laws import chinchilla, chinchilla_optimal
from analysis.records import CURVE_COLUMNS, Records
from analysis.report import ReportError, analyse, write_report

TRUTH = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _grid_records():
    rng = np.random.default_rng(0)
    rows, curves = [], []
    for c in (1e18, 1e19, 1e20):
        n_opt, _ = chinchilla_optimal(c, **TRUTH)
        for i, n in enumerate(n_opt * np.geomspace(0.1, 10, 5)):
            d = c / (6 * n)
            rid = f"c{c:.0e}-{i}"
            loss = float(chinchilla(n, d, **TRUTH) * np.exp(rng.normal(0, 0.002)))
            rows.append({"run_id": rid, "model": rid, "n_params": n, "n_params_nonembed": n, "tokens": d,
                         "compute": c, "loss": loss})
            f = np.geomspace(c / 20, c, 6)
            curves.append(pd.DataFrame({"run_id": rid, "step": range(6), "tokens_seen": f / (6 * n), "flops_seen": f,
                                        "val_loss": chinchilla(n, f / (6 * n), **TRUTH)}))
    return Records(pd.DataFrame(rows), pd.concat(curves, ignore_index=True)[CURVE_COLUMNS], experiment="iso")


def test_isoflop_grid_report(tmp_path):
    rec = _grid_records()
    an = analyse(rec, bootstrap_k=50)
    assert an["isoflop"]["ok"].all() and len(an["isoflop"]) == 3
    true_opt = [chinchilla_optimal(c, **TRUTH)[0] for c in (1e18, 1e19, 1e20)]
    assert an["isoflop"]["n_opt"].tolist() == pytest.approx(true_opt, rel=0.3)
    chin = an["chinchilla"]["fit"]
    assert chin.params["E"] == pytest.approx(1.69, rel=0.05)
    files = write_report(rec, an, tmp_path)
    assert {f.name for f in files} >= {"report.md", "fits.json", "isoflop.png", "loss_vs_compute.png"}
    fj = json.loads((tmp_path / "fits.json").read_text())
    assert set(fj["fits"]) >= {"loss_vs_params", "loss_vs_compute", "n_opt_vs_compute", "chinchilla"}
    assert fj["fits"]["n_opt_vs_compute"]["params"]["b"] == pytest.approx(0.28 / 0.62, rel=0.2)  # beta/(alpha+beta)
    md = (tmp_path / "report.md").read_text()
    assert "## IsoFLOP minima" in md and "Chinchilla law (Approach 3)" in md and "![isoflop](isoflop.png)" in md
    assert "**Note:** The sizes' points come from runs of" in md     # each size's best run has its own budget


def test_mixed_budget_note_names_the_budgets():
    from analysis.report import mixed_budget_note

    one = pd.DataFrame({"n_params": [1e4, 1e5], "tokens": [3.6e6, 3.6e6]})
    assert mixed_budget_note(one) is None
    two = pd.DataFrame({"n_params": [1e4, 1e5, 1e6], "tokens": [3.6e6, 3.6e6, 1.8e6]})
    assert "2 token budgets (1.8e+06, 3.6e+06)" in mixed_budget_note(two)


def test_one_size_is_not_enough():
    rec = Records(pd.DataFrame({"run_id": ["a"], "model": ["m"], "n_params": [1e6], "n_params_nonembed": [1e6],
                                "tokens": [1e7], "compute": [6e13], "loss": [0.5]}),
                  pd.DataFrame(columns=CURVE_COLUMNS), experiment="one")
    with pytest.raises(ReportError, match=r"only 1 model size\(s\) \(\[1000000.0\]\); a fit of L = a N\^b needs at least 2"):
        analyse(rec)


def _jsonl_run(root, key, *, model, n, loss, status, experiment="exp"):
    """A run folder as a job writes it: config.yaml and metrics.jsonl (via JsonlSink)."""
    from polar.names import ERROR_TAG
    from polar.sinks import JsonlSink

    run_dir = root / key
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"experiment_name: {experiment}\n")
    sink = JsonlSink(run_dir / "metrics.jsonl")
    sink.log_params({"model": model, "n_params": n, "n_params_nonembed": n / 2, "tokens": 1e6,
                     "compute": 6e6 * n, "run_key": key})
    sink.set_tags({"mlflow.runName": f"polar-{model}"})
    for step, frac in ((10, 0.3), (100, 1.0)):
        sink.log_many([({"val/loss": loss / frac ** 0.1, "tokens_seen": frac * 1e6,
                         "flops_seen": frac * 6e6 * n}, step)])
    if status == "FAILED":
        sink.set_tags({ERROR_TAG: "loss is NaN at step 100"})
    if status is not None:   # None: killed before it could write its end
        sink.finish(status)


def test_report_from_jsonl_files_without_mlflow(tmp_path, capsys):
    from analysis.report import main

    runs = tmp_path / "runs"
    for i, n in enumerate([1e4, 1e5, 1e6]):
        _jsonl_run(runs, f"k{i}", model=f"m{i}", n=n, loss=n ** -0.1, status="FINISHED")
    _jsonl_run(runs, "bad", model="m9", n=1e7, loss=0.1, status="FAILED")
    _jsonl_run(runs, "dead", model="m8", n=1e7, loss=0.1, status=None)
    _jsonl_run(runs, "other", model="m7", n=1e8, loss=0.01, status="FINISHED", experiment="other")

    from analysis.records import load_jsonl_records

    rec = load_jsonl_records(runs, "exp")
    assert rec.records["model"].tolist() == ["m0", "m1", "m2"]
    assert [(f.name, f.error) for f in rec.failed] == [("polar-m9", "loss is NaN at step 100")]
    assert rec.unfinished == ["polar-m8"]
    assert len(rec.curves) == 6 and set(rec.curves["run_id"]) == {"k0", "k1", "k2"}

    assert main(["--runs-dir", str(runs), "--experiment", "exp", "--out", str(tmp_path / "rep"),
                 "--bootstrap", "0"]) == 0
    fits = json.loads((tmp_path / "rep" / "fits.json").read_text())
    assert fits["fits"]["loss_vs_params"]["params"]["b"] == pytest.approx(-0.1, abs=1e-3)
    assert "polar-m9" in (tmp_path / "rep" / "report.md").read_text()


def test_report_names_a_missing_runs_dir(tmp_path, capsys):
    from analysis.report import main

    assert main(["--runs-dir", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_seeds_are_averaged_into_one_point_per_configuration():
    from analysis.report import average_seeds

    rows, curves = [], []
    for n, base in ((1e4, 0.4), (1e5, 0.3)):
        for seed, noise in ((0, -0.02), (1, 0.02), (2, 0.0)):
            rid = f"n{n:g}-s{seed}"
            rows.append({"run_id": rid, "model": f"m{n:g}", "n_params": n, "tokens": 1e6, "compute": 6e6 * n,
                         "lr": 1e-3, "loss": base + noise, "seed": seed})
            steps = [10, 20] if seed < 2 else [10, 20, 30]     # seed 2 ran one eval further
            curves += [{"run_id": rid, "step": s, "tokens_seen": s * 1e3, "flops_seen": s * 6e3 * n,
                        "val_loss": base + noise + 1 / s} for s in steps]
    rows.append({"run_id": "other-lr", "model": "m10000", "n_params": 1e4, "tokens": 1e6, "compute": 6e10,
                 "lr": 3e-3, "loss": 0.5, "seed": 0})             # another lr: not a replica
    records, mean_curves = average_seeds(pd.DataFrame(rows), pd.DataFrame(curves, columns=CURVE_COLUMNS))
    assert len(records) == 3
    mean = records.set_index("run_id")
    assert mean.loc["n10000-s0", "loss"] == pytest.approx(0.4) and mean.loc["n10000-s0", "n_seeds"] == 3
    assert mean.loc["n10000-s0", "loss_std"] == pytest.approx(0.02)
    assert mean.loc["other-lr", "n_seeds"] == 1 and mean.loc["other-lr", "loss"] == 0.5
    c = mean_curves[mean_curves["run_id"] == "n100000-s0"]
    assert c["step"].tolist() == [10, 20]                       # steps every replica logged
    assert c["val_loss"].tolist() == pytest.approx([0.3 + 0.1, 0.3 + 0.05])
    an = analyse(Records(pd.DataFrame(rows), pd.DataFrame(curves, columns=CURVE_COLUMNS), experiment="s"),
                 bootstrap_k=0)
    assert an["sizes"]["loss"].tolist() == pytest.approx([0.4, 0.3])     # the better of the two lrs at 1e4


def test_the_median_of_the_seeds_is_not_moved_by_one_seed_that_missed_a_jump():
    from analysis.report import average_seeds

    rows = [{"run_id": f"s{i}", "model": "m", "n_params": 5e4, "tokens": 1e6, "compute": 3e11, "lr": 1e-3,
             "loss": loss, "seed": i} for i, loss in enumerate((0.194, 0.197, 0.272))]
    curves = pd.DataFrame([{"run_id": f"s{i}", "step": 10, "tokens_seen": 1e4, "flops_seen": 3e9, "val_loss": v}
                           for i, v in enumerate((0.3, 0.31, 0.5))], columns=CURVE_COLUMNS)
    mean, _ = average_seeds(pd.DataFrame(rows), curves)
    median, median_curves = average_seeds(pd.DataFrame(rows), curves, "median")
    assert mean["loss"].item() == pytest.approx(0.221) and median["loss"].item() == pytest.approx(0.197)
    assert median_curves["val_loss"].tolist() == pytest.approx([0.31])
    with pytest.raises(ReportError, match=r"--seeds must be one of \['mean', 'median'\], got 'min'"):
        average_seeds(pd.DataFrame(rows), curves, "min")


def _embedding_heavy_records(nonembed=True):
    """Five sizes whose loss is an exact power law in the non-embedding parameters, while a
    1024 x width embedding table is most of the smallest models (as in the CPU presets)."""
    width = np.array([8, 16, 24, 32, 64])
    core = np.array([1712, 6752, 20928, 50496, 236288], float)
    rows = {"run_id": [f"r{w}" for w in width], "model": [f"w{w}" for w in width], "n_params": core + 1024 * width,
            "tokens": 5e6, "compute": 6 * core * 5e6, "loss": 2.0 * core ** -0.2}
    if nonembed:
        rows["n_params_nonembed"] = core
    return Records(pd.DataFrame(rows), pd.DataFrame(columns=CURVE_COLUMNS), experiment="emb")


def test_params_nonembed_fits_the_non_embedding_count(tmp_path):
    rec = _embedding_heavy_records()
    every = analyse(rec, bootstrap_k=0)
    core = analyse(rec, bootstrap_k=0, params="nonembed")
    assert core["size_fit"].params["b"] == pytest.approx(-0.2, abs=1e-4) and core["size_fit"].r2 > 0.9999
    assert every["size_fit"].r2 < 0.995                      # embeddings bend the law in all parameters
    assert core["sizes"]["n_params"].tolist() == pytest.approx([1712, 6752, 20928, 50496, 236288])
    write_report(rec, core, tmp_path)
    fj = json.loads((tmp_path / "fits.json").read_text())
    assert fj["fits"]["loss_vs_params"]["x"] == "n_params_nonembed" and fj["n_params_count"] == "nonembed"
    assert [r["n_params"] for r in fj["size_points"]] == pytest.approx([1712, 6752, 20928, 50496, 236288])
    assert fj["runs"][0]["n_params"] == 1712 + 1024 * 8          # the runs table keeps both counts
    md = (tmp_path / "report.md").read_text()
    assert "N counts the non-embedding parameters in every fit" in md
    assert "N counts the non-embedding parameters)" in md


def test_params_nonembed_without_the_count_is_refused():
    from analysis.records import RunsError

    with pytest.raises(RunsError, match=r"5 run\(s\) have no n_params_nonembed .*use the count 'all'"):
        analyse(_embedding_heavy_records(nonembed=False), bootstrap_k=0, params="nonembed")
    with pytest.raises(RunsError, match=r"must be one of \['all', 'nonembed'\], got 'core'"):
        analyse(_embedding_heavy_records(), bootstrap_k=0, params="core")
