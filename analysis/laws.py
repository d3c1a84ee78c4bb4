"""The functional forms of scaling laws and their parameters (pure math, numpy only).

Owns three laws and nothing else:

- ``power``:      L = a X^b                              params a, b
- ``saturating``: L = E + A X^-alpha                     params E, A, alpha
- ``chinchilla``: L(N, D) = E + A N^-alpha + B D^-beta   params E, A, B, alpha, beta

Each law is also written in log space as a log-sum-exp of terms that are *linear* in a
vector ``theta`` of fitting coordinates (Hoffmann et al. 2022; Besiroglu et al. 2024):

    log L = LSE_k( theta . z_k(x) )

e.g. chinchilla: theta = (e, a, b, alpha, beta) with E = e^e, A = e^a, B = e^b and the
terms a - alpha log N, b - beta log D, e. ``Law.design`` returns the z_k as matrices, so
the fitter (analysis/fit.py) evaluates every law and its gradient the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "Law",
    "LAWS",
    "get_law",
    "power",
    "saturating",
    "chinchilla",
    "chinchilla_optimal",
    "log_sum_exp_terms",
]


# ---------------------------------------------------------------- plain predictions

def power(x, a: float, b: float):
    """L = a x^b (POLAR's form; b < 0 for a falling loss)."""
    return a * np.power(np.asarray(x, dtype=float), b)


def saturating(x, E: float, A: float, alpha: float):
    """L = E + A x^-alpha (irreducible loss E)."""
    return E + A * np.power(np.asarray(x, dtype=float), -alpha)


def chinchilla(n, d, E: float, A: float, B: float, alpha: float, beta: float):
    """L(N, D) = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022, Approach 3)."""
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    return E + A * np.power(n, -alpha) + B * np.power(d, -beta)


def chinchilla_optimal(compute, A: float, B: float, alpha: float, beta: float, **_ignored):
    """Compute-optimal (N_opt, D_opt) of a FLOP budget C under C = 6 N D.

    G = (alpha A / (beta B))^(1/(alpha+beta)),
    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G.
    Extra keyword arguments (e.g. E) are ignored so a params dict can be splatted.
    """
    c6 = np.asarray(compute, dtype=float) / 6.0
    s = alpha + beta
    if not s > 0:
        raise ValueError(f"alpha + beta must be > 0 for an optimal allocation, got {s!r}")
    g = (alpha * A / (beta * B)) ** (1.0 / s)
    return g * c6 ** (beta / s), c6 ** (alpha / s) / g


# ---------------------------------------------------------------- log-space form

def log_sum_exp_terms(terms: Sequence[np.ndarray]):
    """Stable log(sum_k exp(t_k)) of same-shaped arrays; also returns softmax weights."""
    if len(terms) == 1:
        return terms[0], [np.ones_like(terms[0])]
    m = terms[0].copy()
    for t in terms[1:]:
        np.maximum(m, t, out=m)
    exps = [np.exp(t - m) for t in terms]
    total = exps[0].copy()
    for e in exps[1:]:
        total += e
    lse = m + np.log(total)
    return lse, [e / total for e in exps]


def _design_power(inputs: Mapping[str, np.ndarray]):
    lx = np.log(inputs["x"])
    one = np.ones_like(lx)
    return [np.stack([one, lx], axis=1)]


def _design_saturating(inputs):
    lx = np.log(inputs["x"])
    one, zero = np.ones_like(lx), np.zeros_like(lx)
    return [np.stack([zero, one, -lx], axis=1), np.stack([one, zero, zero], axis=1)]


def _design_chinchilla(inputs):
    ln, ld = np.log(inputs["n"]), np.log(inputs["d"])
    one, z = np.ones_like(ln), np.zeros_like(ln)
    return [
        np.stack([z, one, z, -ln, z], axis=1),
        np.stack([z, z, one, z, -ld], axis=1),
        np.stack([one, z, z, z, z], axis=1),
    ]


@dataclass(frozen=True)
class Law:
    """A scaling law: its parameters, its inputs and its log-space linear-term design.

    ``inputs`` names the arrays the law needs (``x`` for one-axis laws, ``n`` and ``d``
    for chinchilla). ``to_params``/``to_theta`` map between fitting coordinates and the
    reported parameters (amplitudes are exponentiated in theta).
    """

    name: str
    param_names: tuple[str, ...]
    theta_names: tuple[str, ...]
    inputs: tuple[str, ...]
    exp_coords: tuple[int, ...]  # theta indices that hold the log of a parameter
    design: Callable[[Mapping[str, np.ndarray]], list]
    formula: str

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def to_params(self, theta) -> dict[str, float]:
        th = np.asarray(theta, dtype=float)
        vals = [float(np.exp(v)) if i in self.exp_coords else float(v) for i, v in enumerate(th)]
        return dict(zip(self.param_names, vals))

    def to_theta(self, params: Mapping[str, float]) -> np.ndarray:
        out = []
        for i, name in enumerate(self.param_names):
            v = float(params[name])
            if i in self.exp_coords:
                if not v > 0:
                    raise ValueError(f"{self.name}: parameter {name} must be > 0, got {v!r}")
                v = np.log(v)
            out.append(v)
        return np.array(out)

    def predict(self, params: Mapping[str, float], **inputs) -> np.ndarray:
        """Loss predicted at the given inputs (x=..., or n=..., d=... for chinchilla)."""
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise ValueError(f"{self.name} needs inputs {list(self.inputs)}, missing {missing}")
        p = {k: float(params[k]) for k in self.param_names}
        if self.name == "power":
            return power(inputs["x"], **p)
        if self.name == "saturating":
            return saturating(inputs["x"], **p)
        return chinchilla(inputs["n"], inputs["d"], **p)

    def log_predict(self, theta, designs) -> np.ndarray:
        """log L for a batch of theta (S, P) at the design's points -> (S, n)."""
        th = np.atleast_2d(np.asarray(theta, dtype=float))
        lse, _ = log_sum_exp_terms([th @ z.T for z in designs])
        return lse


_POWER = Law("power", ("a", "b"), ("log_a", "b"), ("x",), (0,), _design_power, "L = a X^b")
_SATURATING = Law(
    "saturating", ("E", "A", "alpha"), ("e", "a", "alpha"), ("x",), (0, 1),
    _design_saturating, "L = E + A X^-alpha",
)
_CHINCHILLA = Law(
    "chinchilla", ("E", "A", "B", "alpha", "beta"), ("e", "a", "b", "alpha", "beta"),
    ("n", "d"), (0, 1, 2), _design_chinchilla, "L = E + A N^-alpha + B D^-beta",
)

LAWS: dict[str, Law] = {law.name: law for law in (_POWER, _SATURATING, _CHINCHILLA)}


def get_law(name: str) -> Law:
    """The law called ``name``; the error lists the valid names."""
    try:
        return LAWS[name]
    except KeyError:
        raise ValueError(f"unknown law {name!r}; valid: {', '.join(LAWS)}") from None
