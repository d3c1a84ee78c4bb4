"""analysis.frontier: lower envelope of curves and IsoFLOP parabola minima."""

import numpy as np
import pandas as pd
import pytest

from analysis.frontier import envelope, group_budgets, isoflop_minima, pareto_frontier


def _curves():
    # run "small" is better at low compute, "big" overtakes it at C = 1e4
    c = np.geomspace(1e2, 1e6, 9)
    small = pd.DataFrame({"run_id": "small", "step": range(9), "tokens_seen": c, "flops_seen": c,
                          "val_loss": 2.0 * c ** -0.05})
    cb = np.geomspace(1e3, 1e6, 7)
    big = pd.DataFrame({"run_id": "big", "step": range(7), "tokens_seen": cb, "flops_seen": cb,
                        "val_loss": 4.0 * cb ** -0.125})
    zero = pd.DataFrame({"run_id": "big", "step": [-1], "tokens_seen": [0.0], "flops_seen": [0.0], "val_loss": [9.0]})
    return pd.concat([small, big, zero], ignore_index=True)


def test_pareto_frontier_is_monotone_and_switches_runs():
    f = pareto_frontier(_curves())
    assert np.all(np.diff(f["compute"]) > 0) and np.all(np.diff(f["loss"]) < 0)
    assert f["run_id"].iloc[0] == "small" and f["run_id"].iloc[-1] == "big"
    assert (f["compute"] > 0).all()
    # big wins beyond the crossing 2 c^-0.05 = 4 c^-0.125 -> c = 2^(1/0.075) ~ 1e4
    cross = 2 ** (1 / 0.075)
    assert set(f[f["compute"] > cross * 1.01]["run_id"]) == {"big"}
    assert set(f[f["compute"] < cross / 1.01]["run_id"]) == {"small"}


def test_envelope_takes_the_minimum_of_interpolated_curves():
    e = envelope(_curves(), n_points=13, c_min=1e2)
    assert len(e) == 13 and e["compute"].iloc[0] == pytest.approx(1e2) and e["compute"].iloc[-1] == pytest.approx(1e6)
    expect = np.minimum(2.0 * e["compute"] ** -0.05,
                        np.where(e["compute"] >= 1e3, 4.0 * e["compute"] ** -0.125, np.inf))
    assert e["loss"].to_numpy() == pytest.approx(expect.to_numpy(), rel=1e-9)  # exact power laws interpolate exactly


def test_group_budgets_tolerates_small_differences():
    assert group_budgets([1e15, 1.02e15, 1e16, 0.99e16, 1e17]).tolist() == [0, 0, 1, 1, 2]


def test_isoflop_minima_find_the_parabola_vertex():
    rows = []
    for c, u_opt in ((1e18, np.log(1e8)), (1e19, np.log(3e8))):
        for u in u_opt + np.linspace(-1.5, 1.5, 5):
            rows.append({"n_params": np.exp(u), "compute": c * (1 + 0.01 * len(rows) % 2), "loss": 2 + 0.1 * (u - u_opt) ** 2})
    rows.append({"n_params": 1e9, "compute": 1e21, "loss": 2.0})  # a budget with one size: skipped
    m = isoflop_minima(pd.DataFrame(rows))
    assert len(m) == 2 and m["ok"].all()
    assert m["n_opt"].tolist() == pytest.approx([1e8, 3e8], rel=1e-6)
    assert m["loss_opt"].tolist() == pytest.approx([2.0, 2.0])


def test_isoflop_concave_budget_is_not_ok():
    n = np.geomspace(1e6, 1e8, 4)
    m = isoflop_minima(pd.DataFrame({"n_params": n, "compute": 1e15, "loss": 2 - 0.01 * np.log(n) ** 2}))
    assert len(m) == 1 and not m["ok"].iloc[0]


def test_envelope_never_rises_when_a_good_run_ends_early():
    """A small run that ends at C = 1e3 with a low loss holds the frontier until a bigger
    run (covering more compute, worse at first) gets below it."""
    cs = np.geomspace(1e2, 1e3, 5)
    small = pd.DataFrame({"run_id": "small", "step": range(5), "tokens_seen": cs, "flops_seen": cs,
                          "val_loss": np.geomspace(0.6, 0.3, 5)})
    cb = np.geomspace(1e2, 1e5, 7)
    big = pd.DataFrame({"run_id": "big", "step": range(7), "tokens_seen": cb, "flops_seen": cb,
                        "val_loss": np.geomspace(0.69, 0.1, 7)})
    e = envelope(pd.concat([small, big], ignore_index=True), n_points=16, c_min=1e2)
    assert np.all(np.diff(e["loss"]) <= 0)
    just_after = e[(e["compute"] > 1.05e3) & (e["loss"] >= 0.3 - 1e-12)]
    assert len(just_after) and set(just_after["run_id"]) == {"small"} and just_after["loss"].max() == pytest.approx(0.3)
    assert e["run_id"].iloc[-1] == "big" and e["loss"].iloc[-1] == pytest.approx(0.1)
