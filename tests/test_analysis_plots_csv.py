"""analysis.plots writes readable PNGs; analysis.records.read_csv completes and checks columns."""

import numpy as np
import pandas as pd
import pytest

from analysis import fit as F
from analysis.frontier import isoflop_minima
from analysis.records import RunsError, read_csv

PNG = b"\x89PNG\r\n\x1a\n"


def _isoflop_records():
    rows = []
    for c, n_opt in ((1e15, 1e6), (1e16, 3e6), (1e17, 1e7)):
        for n in n_opt * np.geomspace(0.1, 10, 5):
            rows.append({"n_params": n, "compute": c, "loss": 1.0 + 0.05 * np.log(n / n_opt) ** 2 - 0.1 * np.log10(c / 1e15)})
    return pd.DataFrame(rows)


def test_isoflop_and_residual_plots(tmp_path):
    from analysis.plots import plot_isoflops, plot_residuals

    rec = _isoflop_records()
    minima = isoflop_minima(rec)
    assert minima["ok"].all() and minima["n_opt"].tolist() == pytest.approx([1e6, 3e6, 1e7], rel=1e-6)
    p = plot_isoflops(rec, minima, tmp_path / "iso.png")
    assert open(p, "rb").read(8) == PNG
    x = np.geomspace(1e5, 1e8, 8)
    res = F.fit("power", {"x": x}, 0.9 * x ** -0.04 * (1 + 0.01 * np.sin(np.arange(8))))
    p = plot_residuals({"L(N)": (x, res, "parameters N")}, tmp_path / "res.png")
    assert (tmp_path / "res.png").stat().st_size > 5000


def test_plots_do_not_touch_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    from analysis.plots import plot_isoflops

    before = plt.get_fignums()
    rec = _isoflop_records()
    plot_isoflops(rec, isoflop_minima(rec), tmp_path / "iso.png")
    assert plt.get_fignums() == before


def test_read_csv_derives_tokens_and_compute(tmp_path):
    p = tmp_path / "a.csv"
    pd.DataFrame({"n_params": [1e6, 2e6], "compute": [6e12, 2.4e13], "loss": [0.5, 0.4]}).to_csv(p, index=False)
    df = read_csv(p)
    assert df["tokens"].tolist() == pytest.approx([1e6, 2e6])
    p2 = tmp_path / "b.csv"
    pd.DataFrame({"n_params": [1e6], "tokens": [1e7], "loss": [0.5]}).to_csv(p2, index=False)
    assert read_csv(p2)["compute"].tolist() == pytest.approx([6e13])


def test_read_csv_errors_name_the_columns(tmp_path):
    p = tmp_path / "c.csv"
    pd.DataFrame({"tokens": [1e6], "loss": [0.5]}).to_csv(p, index=False)
    with pytest.raises(RunsError, match=r"needs a size or compute column.*columns present: \['tokens', 'loss'\]"):
        read_csv(p)
    with pytest.raises(RunsError, match="does not exist"):
        read_csv(tmp_path / "missing.csv")
