"""analysis.fit: recovery of known parameters, uncertainty, held-out logic, bad input."""

import numpy as np
import pandas as pd
import pytest

from analysis import fit as F
from analysis.laws import chinchilla, power, saturating


def _noisy(y, sigma, seed):
    return y * np.exp(np.random.default_rng(seed).normal(0, sigma, np.shape(y)))


def test_power_recovers_known_parameters():
    x = np.geomspace(1e5, 1e9, 15)
    y = _noisy(power(x, 0.9, -0.0425), 0.002, 0)
    res = F.fit("power", {"x": x}, y)
    assert res.params["a"] == pytest.approx(0.9, rel=0.02)
    assert res.params["b"] == pytest.approx(-0.0425, rel=0.03)
    assert res.r2 > 0.99 and res.r2_log > 0.99 and res.mape < 0.5
    assert res.n == 15 and res.objective > 0


def test_saturating_recovers_known_parameters():
    x = np.geomspace(1e5, 1e10, 20)
    y = _noisy(saturating(x, 0.5, 30.0, 0.3), 0.002, 1)
    res = F.fit("saturating", {"x": x}, y)
    assert res.params["E"] == pytest.approx(0.5, rel=0.03)
    assert res.params["A"] == pytest.approx(30.0, rel=0.15)
    assert res.params["alpha"] == pytest.approx(0.3, rel=0.05)


def test_chinchilla_recovers_known_parameters():
    n = np.repeat(np.geomspace(1e7, 1e10, 8), 6)
    d = np.tile(np.geomspace(1e9, 1e12, 6), 8)
    y = _noisy(chinchilla(n, d, 1.69, 406.4, 410.7, 0.34, 0.28), 0.002, 2)
    res = F.fit("chinchilla", {"n": n, "d": d}, y)
    assert res.n_starts == 4500
    truth = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    for k, tol in dict(E=0.02, alpha=0.03, beta=0.03, A=0.25, B=0.25).items():
        assert res.params[k] == pytest.approx(truth[k], rel=tol), k


def _exhaustive(law, inputs, y):
    """Every start of the default grid run to convergence, then polished (the reference)."""
    law = F.get_law(law)
    arrs, y = F.validate_inputs(law, inputs, y)
    M, designs, logy = F._problem(law, arrs, y)
    x0 = np.linalg.solve(M, F.default_grid(law, arrs, y).T).T
    _, f, _ = F._multistart(x0, designs, logy, 1e-3, 1000, 4, exhaustive=True)
    return f


CHINCHILLA_LAWS = [  # E, A, B, alpha, beta; noise; seed; design
    ((1.69, 406.4, 410.7, 0.34, 0.28), 0.002, 2, "grid"),
    ((1.8172, 477.83, 2143.4, 0.34731, 0.36717), 0.005, 3, "random"),
    ((2.5, 2000.0, 300.0, 0.45, 0.22), 0.002, 4, "grid"),
    ((0.8, 150.0, 9000.0, 0.25, 0.5), 0.01, 5, "random"),
]


@pytest.mark.parametrize("truth, sigma, seed, design", CHINCHILLA_LAWS)
def test_screened_chinchilla_fit_matches_the_exhaustive_grid(truth, sigma, seed, design):
    rng = np.random.default_rng(seed)
    if design == "grid":
        n, d = np.repeat(np.geomspace(1e7, 1e10, 8), 6), np.tile(np.geomspace(1e9, 1e12, 6), 8)
    else:
        n, d = np.exp(rng.uniform(np.log(1e7), np.log(1e10), (2, 60)) + [[0], [np.log(100)]])
    y = _noisy(chinchilla(n, d, *truth), sigma, seed)
    res = F.fit("chinchilla", {"n": n, "d": d}, y)
    assert res.n_starts == 4500
    assert res.objective <= _exhaustive("chinchilla", {"n": n, "d": d}, y) * (1 + 1e-9)
    tol = dict(E=0.05, alpha=0.08, beta=0.08, A=0.5, B=0.5)
    for k, v in zip(("E", "A", "B", "alpha", "beta"), truth):
        assert res.params[k] == pytest.approx(v, rel=tol[k]), k


def _small_random_law(seed):
    """12 to 30 random (N, D) points of a random well-scaled law with 1% to 5% noise."""
    rng = np.random.default_rng(seed)
    e, alpha, beta = rng.uniform(0.5, 3), rng.uniform(0.1, 0.7), rng.uniform(0.1, 0.7)
    sigma, m = rng.choice([0.01, 0.03, 0.05]), rng.choice([12, 20, 30])
    n, d = np.exp(rng.uniform(np.log(1e7), np.log(1e10), m)), np.exp(rng.uniform(np.log(1e9), np.log(1e12), m))
    a = e * rng.uniform(0.1, 3) * np.exp(alpha * np.mean(np.log(n)))
    b = e * rng.uniform(0.1, 3) * np.exp(beta * np.mean(np.log(d)))
    y = chinchilla(n, d, e, a, b, alpha, beta) * np.exp(rng.normal(0, sigma, m))
    return {"n": n, "d": d}, y


@pytest.mark.parametrize("seed", [3, 79, 120])
def test_screened_fit_finds_the_basin_the_best_starts_miss(seed):
    # seeds where the starts with the lowest initial objective (79, 120) or only the best
    # 256 screened starts (3) end in a worse optimum than the exhaustive grid
    inputs, y = _small_random_law(seed)
    assert F.fit("chinchilla", inputs, y).objective <= _exhaustive("chinchilla", inputs, y) * (1 + 1e-9)


def test_screened_saturating_fit_matches_the_exhaustive_grid():
    x = np.geomspace(1e5, 1e10, 20)
    for seed, truth in enumerate([(0.5, 30.0, 0.3), (1.2, 8.0, 0.15), (0.1, 300.0, 0.45)]):
        y = _noisy(saturating(x, *truth), 0.003, seed)
        res = F.fit("saturating", {"x": x}, y)
        assert res.objective <= _exhaustive("saturating", {"x": x}, y) * (1 + 1e-9)


def test_batched_lbfgs_solves_independent_quadratics():
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.1, 100, (50, 3))
    target = rng.normal(0, 5, (50, 3))

    def fun(x, rows):
        r = x - target[rows]
        return 0.5 * np.sum(scales[rows] * r * r, axis=1), scales[rows] * r

    x, f, g, conv, _ = F.batched_lbfgs(fun, np.zeros((50, 3)))
    assert conv.all()
    assert np.allclose(x, target, atol=1e-6)


def test_objective_gradient_matches_finite_differences():
    n = np.geomspace(1e7, 1e10, 10)
    d = np.geomspace(1e9, 1e12, 10)[::-1]
    y = chinchilla(n, d, 1.7, 400, 400, 0.3, 0.3) * 1.01
    law = F.get_law("chinchilla")
    designs, logy = law.design({"n": n, "d": d}), np.log(y)
    theta = np.array([[0.5, 6.0, 6.0, 0.3, 0.3], [0.2, 5.0, 7.0, 0.4, 0.2]])
    w = np.random.default_rng(0).integers(0, 3, (2, 10)).astype(float)
    f, g = F.objective_and_grad(theta, designs, logy, 0.01, w)
    assert f == pytest.approx(np.sum(w * F.huber(law.log_predict(theta, designs) - logy, 0.01), axis=1))
    eps = 1e-6
    for j in range(5):
        e = np.zeros(5)
        e[j] = eps
        fp, _ = F.objective_and_grad(theta + e, designs, logy, 0.01, w)
        fm, _ = F.objective_and_grad(theta - e, designs, logy, 0.01, w)
        assert g[:, j] == pytest.approx((fp - fm) / (2 * eps), rel=1e-4, abs=1e-9)


def test_bootstrap_is_seeded_and_covers_truth():
    x = np.geomspace(1e5, 1e9, 20)
    y = _noisy(power(x, 0.9, -0.0425), 0.005, 3)
    res = F.fit("power", {"x": x}, y)
    b1 = F.bootstrap(res, {"x": x}, y, k=200, seed=7)
    b2 = F.bootstrap(res, {"x": x}, y, k=200, seed=7)
    b3 = F.bootstrap(res, {"x": x}, y, k=200, seed=8)
    assert b1.ci == b2.ci and b1.ci != b3.ci
    lo, hi = b1.ci["b"]
    assert lo < -0.0425 < hi and lo < res.params["b"] < hi
    assert b1.boot_thetas.shape[1] == 2 and len(b1.boot_thetas) >= 100


def test_prediction_interval_covers_new_draws_at_nominal_rate():
    x = np.geomspace(1e5, 1e9, 60)
    y = _noisy(power(x, 0.9, -0.0425), 0.01, 4)
    res = F.bootstrap(F.fit("power", {"x": x}, y), {"x": x}, y, k=300, seed=0)
    xt = np.geomspace(1e5, 1e9, 500)
    yt = _noisy(power(xt, 0.9, -0.0425), 0.01, 5)
    pred, lo, hi = F.prediction_interval(res, x=xt, level=0.9)
    cover = np.mean((yt >= lo) & (yt <= hi))
    assert 0.8 < cover < 0.97
    assert np.all(lo < pred) and np.all(pred < hi)
    band_lo, band_hi = F.confidence_band(res, x=xt)
    assert np.all(band_hi - band_lo < hi - lo)  # the curve is known better than single runs


def _power_frame(shift_above=None, shift=1.0, seed=6):
    n = np.geomspace(1e5, 1e9, 16)
    loss = _noisy(power(n, 0.9, -0.0425), 0.003, seed)
    if shift_above is not None:
        loss = np.where(n > shift_above, loss * shift, loss)
    return pd.DataFrame({"n_params": n, "tokens": 20 * n, "compute": 120 * n * n, "loss": loss})


def test_holdout_predicts_larger_models():
    df = _power_frame()
    h = F.holdout(df, "power", 1e8, k=200, seed=0)
    assert h["n"] == int((df["n_params"] > 1e8).sum()) == 4 and h["n_train"] == 12
    assert h["mape"] < 1.5 and h["max_ape"] >= h["mape"]
    assert h["coverage"] >= 0.75


def test_holdout_reports_misses():
    df = _power_frame(shift_above=1e8, shift=1.5)
    h = F.holdout(df, "power", 1e8, k=100, seed=0)
    assert h["coverage"] == 0.0
    assert h["mape"] == pytest.approx(100 / 3, rel=0.1)  # predicted L vs 1.5 L: 1/3 off


def test_holdout_bad_split_names_the_problem():
    df = _power_frame()
    with pytest.raises(F.FitError, match="leaves no rows to test: the largest n_params is 1e\\+09"):
        F.holdout(df, "power", 1e10)
    with pytest.raises(F.FitError, match="leaves 1 training rows; law 'power' needs at least 2"):
        F.holdout(df, "power", 1e5)


@pytest.mark.parametrize("inputs, loss, message", [
    ({"x": [1e5, 1e6]}, [0.5], "input 'x' has 2 values but loss has 1"),
    ({"x": [1e5]}, [0.5], r"law 'power' has 2 parameters \['a', 'b'\] but only 1 points were given"),
    ({"x": [1e5, 1e6, 1e7]}, [0.5, 0.0, 0.4], r"'loss' must be > 0 .*got 0.0 at rows \[1\]"),
    ({"x": [1e5, -1e6, 1e7]}, [0.5, 0.45, 0.4], r"'x' must be > 0 .*got -1000000.0 at rows \[1\]"),
    ({"x": [1e5, 1e6, 1e7]}, [0.5, float("nan"), 0.4], r"'loss' has NaN or infinite values at rows \[1\]"),
    ({"n": [1e5, 1e6]}, [0.5, 0.4], r"law 'power' needs inputs \['x'\]; missing \['x'\]"),
])
def test_bad_input_is_named(inputs, loss, message):
    with pytest.raises(F.FitError, match=message):
        F.fit("power", inputs, loss)


def test_too_few_points_for_chinchilla():
    with pytest.raises(F.FitError, match="law 'chinchilla' has 5 parameters .* only 4 points"):
        F.fit("chinchilla", {"n": [1e6] * 4, "d": [1e8] * 4}, [3.0, 2.9, 2.8, 2.7])


def test_chinchilla_refuses_collinear_n_and_d():
    n = np.geomspace(1e6, 1e9, 8)
    with pytest.raises(F.FitError, match=r"cannot separate N from D: log N and log D are collinear \(correlation 1.0000"):
        F.fit("chinchilla", {"n": n, "d": 20 * n}, power(n, 0.9, -0.04))


def test_one_size_cannot_determine_an_exponent():
    with pytest.raises(F.FitError, match=r"needs at least 2 distinct values of 'n'.*got 1 \(\[1000000.0\]\)"):
        F.fit("chinchilla", {"n": [1e6] * 6, "d": np.geomspace(1e8, 1e10, 6)}, np.linspace(3, 2.5, 6))
    with pytest.raises(F.FitError, match="law 'saturating' needs at least 3 distinct values of 'x'"):
        F.fit("saturating", {"x": [1e5, 1e5, 1e6, 1e6]}, [0.6, 0.61, 0.5, 0.52])


def test_non_convergence_is_an_error_not_numbers():
    x = np.geomspace(1e5, 1e10, 20)
    y = _noisy(saturating(x, 0.5, 30.0, 0.3), 0.002, 1)
    with pytest.raises(F.FitError, match="saturating fit did not converge within maxiter=1"):
        F.fit("saturating", {"x": x}, y, maxiter=1)
