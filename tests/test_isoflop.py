"""IsoFLOP (Approach 2): parabola minima per budget, N_opt = k C^a with an honest interval,
unusable budgets flagged and left out, and the report's figure and lines. Synthetic
records only (no training): losses are parabolas in ln N around a known N_opt(C)."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.frontier import bootstrap_n_opt, fit_n_opt, frontier_sizes, isoflop_minima
from analysis.records import CURVE_COLUMNS, Records
from analysis.report import analyse, write_report

K, A = 3.0, 0.45                      # the truth: N_opt = K C^A
BUDGETS = (1e11, 1e12, 1e13)
PNG = b"\x89PNG\r\n\x1a\n"


def n_opt(c):
    return K * c ** A


def _rows(budgets=BUDGETS, *, noise=0.0, seed=0, spread=(0.1, 10), sizes=5, concave=()):
    """Loss = 1 + 0.02 ln(1e13 / C) + 0.04 (ln N - ln N_opt(C))^2 (x (1 + noise)); a
    budget in ``concave`` gets the parabola upside down."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for i, n in enumerate(n_opt(c) * np.geomspace(*spread, sizes)):
            sign = -1 if c in concave else 1
            loss = 1 + 0.02 * np.log(1e13 / c) + sign * 0.04 * np.log(n / n_opt(c)) ** 2
            rows.append({"run_id": f"c{c:.0e}-{i}", "model": f"n{i}", "n_params": n, "n_params_nonembed": n,
                         "tokens": c / (6 * n), "compute": c, "loss": loss * (1 + noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_parabola_minima_and_exponent_recovered_exactly_without_noise():
    m = isoflop_minima(_rows())
    assert m["ok"].all() and (m["reason"] == "").all()
    assert m["n_opt"].tolist() == pytest.approx([n_opt(c) for c in BUDGETS], rel=1e-6)
    assert m["curvature"].tolist() == pytest.approx([0.04] * 3, rel=1e-6)
    f = fit_n_opt(m)
    assert f["a"] == pytest.approx(A, rel=1e-6) and f["k"] == pytest.approx(K, rel=1e-4)
    assert f["n_budgets"] == 3 and f["dof"] == 1


def test_exponent_interval_covers_the_truth_with_noisy_losses():
    m = isoflop_minima(_rows(noise=0.002, seed=3))
    f = fit_n_opt(m)
    lo, hi = f["a_ci"]
    assert lo < A < hi
    assert 0 < hi - lo < 1.0, "an interval so wide says nothing"
    b = bootstrap_n_opt(_rows(noise=0.002, seed=3), k=200, seed=0)
    assert b is not None and b["k"] >= 100
    assert b["a_ci"][0] < A < b["a_ci"][1]


def test_t_interval_has_its_coverage_with_three_budgets():
    """Scatter of the minima about the line, normal in ln N_opt: the 95% t interval
    (1 degree of freedom) covers the truth about 95% of the time; a normal (z)
    interval with the same standard error would cover it only about 70% of the time."""
    rng = np.random.default_rng(1)
    cs = np.array(BUDGETS)
    hits = 0
    trials = 400
    for _ in range(trials):
        m = pd.DataFrame({"compute": cs, "n_opt": n_opt(cs) * np.exp(rng.normal(0, 0.2, 3)), "ok": True})
        lo, hi = fit_n_opt(m)["a_ci"]
        hits += lo < A < hi
    assert 0.91 <= hits / trials <= 0.99


def test_downward_and_out_of_range_budgets_are_flagged_and_left_out():
    budgets = BUDGETS + (1e14, 1e15)
    rows = _rows(budgets, concave=(1e14,))
    out_of_range = rows["compute"] == 1e15          # sizes tried all above this budget's optimum
    rows.loc[out_of_range, "n_params"] *= 30
    rows.loc[out_of_range, "loss"] = [1 + 0.04 * np.log(n / n_opt(1e15)) ** 2 for n in rows.loc[out_of_range, "n_params"]]
    m = isoflop_minima(rows).sort_values("compute").reset_index(drop=True)
    assert m["compute"].tolist() == pytest.approx(list(budgets))
    assert m["ok"].tolist() == [True, True, True, False, False]
    assert "opens downwards" in m.loc[3, "reason"] and np.isnan(m.loc[3, "n_opt"])
    assert "outside the sizes tried" in m.loc[4, "reason"]
    assert m.loc[4, "n_opt"] == pytest.approx(n_opt(1e15), rel=1e-6)   # the vertex, shown but not used
    f = fit_n_opt(m)
    assert f["n_budgets"] == 3 and f["compute"] == pytest.approx(list(BUDGETS))
    assert f["a"] == pytest.approx(A, rel=1e-6)


def test_two_budgets_give_an_exponent_without_an_interval_and_one_gives_none():
    f = fit_n_opt(isoflop_minima(_rows(BUDGETS[:2])))
    assert f["a"] == pytest.approx(A, rel=1e-6) and f["a_ci"] is None and "no degree of freedom" in f["interval"]
    assert fit_n_opt(isoflop_minima(_rows(BUDGETS[:1]))) is None
    assert bootstrap_n_opt(_rows(sizes=3, noise=0.01)) is None     # 3 sizes a budget: no residuals to resample


def test_frontier_sizes_name_the_run_holding_each_point():
    records = pd.DataFrame({"run_id": ["a", "b"], "n_params": [1e5, 4e5]})
    front = pd.DataFrame({"compute": [1e10, 1e11, 1e12], "loss": [0.5, 0.4, 0.3], "run_id": ["a", "b", "zz"]})
    s = frontier_sizes(front, records)
    assert s["n_params"].tolist() == [1e5, 4e5] and s["compute"].tolist() == [1e10, 1e11]


def _records(rows: pd.DataFrame) -> Records:
    curves = []
    for r in rows.itertuples():
        f = np.geomspace(r.compute / 30, r.compute, 6)
        frac = np.linspace(0.2, 1, 6)
        curves.append(pd.DataFrame({"run_id": r.run_id, "step": range(6), "tokens_seen": f / (6 * r.n_params),
                                    "flops_seen": f, "val_loss": r.loss / frac ** 0.1}))
    return Records(rows, pd.concat(curves, ignore_index=True)[CURVE_COLUMNS], experiment="iso")


def test_report_writes_the_isoflop_figure_and_the_n_opt_lines(tmp_path):
    rows = _rows(BUDGETS + (1e14,), noise=0.001, seed=2, concave=(1e14,))
    rec = _records(rows)
    an = analyse(rec, bootstrap_k=50)
    files = write_report(rec, an, tmp_path)
    assert (tmp_path / "isoflop.png") in files and (tmp_path / "isoflop.png").read_bytes()[:8] == PNG
    assert (tmp_path / "isoflop.png").stat().st_size > 20000            # two panels, curves, markers
    fj = json.loads((tmp_path / "fits.json").read_text())
    f = fj["fits"]["n_opt_vs_compute"]
    assert f["n"] == 3 and f["params"]["b"] == pytest.approx(A, abs=0.05)
    assert f["ci"]["b"][0] < A < f["ci"]["b"][1] and "Student t" in f["ci_method"]
    assert "bootstrap_runs" in f and "frontier_approach_1" in f
    bad = [m for m in fj["isoflop_minima"] if not m["ok"]]
    assert len(bad) == 1 and bad[0]["compute"] == pytest.approx(1e14) and "opens downwards" in bad[0]["reason"]
    md = (tmp_path / "report.md").read_text()
    assert "## IsoFLOP minima (Approach 2)" in md and "![isoflop](isoflop.png)" in md
    assert f"C^{f['params']['b']:.4f}** over 3 budgets" in md
    assert f"95% interval {f['ci']['b'][0]:.3f} to {f['ci']['b'][1]:.3f}" in md
    assert "| no: parabola opens downwards (no minimum) |" in md
    assert "Approach 1 beside it" in md and "The frontier's loss law (above): L ∝ C^" in md
