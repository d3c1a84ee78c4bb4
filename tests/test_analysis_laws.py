"""analysis.laws: the functional forms, their log-space designs and the optimal allocation."""

import numpy as np
import pytest

from analysis.laws import LAWS, chinchilla, chinchilla_optimal, get_law, power, saturating

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def test_plain_forms():
    assert power(1e6, 0.9, -0.0425) == pytest.approx(0.9 * 1e6 ** -0.0425)
    assert saturating(100.0, 1.0, 2.0, 0.5) == pytest.approx(1.2)
    assert chinchilla(1e4, 1e6, 1.0, 100.0, 1000.0, 0.5, 0.5) == pytest.approx(3.0)


@pytest.mark.parametrize("name, params, inputs", [
    ("power", {"a": 0.9, "b": -0.05}, {"x": np.geomspace(1e5, 1e9, 7)}),
    ("saturating", {"E": 0.4, "A": 20.0, "alpha": 0.3}, {"x": np.geomspace(1e5, 1e9, 7)}),
    ("chinchilla", HOFFMANN, {"n": np.geomspace(1e7, 1e10, 7), "d": np.geomspace(1e9, 1e12, 7)}),
])
def test_log_space_design_matches_predict(name, params, inputs):
    law = get_law(name)
    theta = law.to_theta(params)
    assert law.to_params(theta) == pytest.approx(params)
    logp = law.log_predict(theta, law.design(inputs))[0]
    assert np.exp(logp) == pytest.approx(law.predict(params, **inputs), rel=1e-12)


def test_chinchilla_optimal_is_the_constrained_minimum():
    c = 5.76e23  # Chinchilla's budget
    n_opt, d_opt = chinchilla_optimal(c, **HOFFMANN)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    ns = np.geomspace(n_opt / 10, n_opt * 10, 20001)
    losses = chinchilla(ns, c / (6 * ns), **HOFFMANN)
    assert ns[np.argmin(losses)] == pytest.approx(n_opt, rel=1e-3)
    # Hoffmann et al.'s Approach 3 puts N_opt for Gopher's budget near 40B
    assert 2e10 < n_opt < 8e10


def test_unknown_law_and_bad_params_name_the_problem():
    with pytest.raises(ValueError, match="unknown law 'linear'; valid: power, saturating, chinchilla"):
        get_law("linear")
    with pytest.raises(ValueError, match="parameter A must be > 0, got -1"):
        LAWS["saturating"].to_theta({"E": 1.0, "A": -1.0, "alpha": 0.3})
    with pytest.raises(ValueError, match=r"needs inputs \['n', 'd'\], missing \['d'\]"):
        LAWS["chinchilla"].predict(HOFFMANN, n=[1e9])
