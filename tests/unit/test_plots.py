"""The comparison figures: parallel coordinates of the trials, sycophancy by kind, predicted vs
observed concept shift. Positions and what is drawn are checked, not just that a figure exists."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from prefsculpt.evals.plots import shift_scatter, sycophancy_forest  # noqa: E402
from prefsculpt.evals.stats import Estimate  # noqa: E402
from prefsculpt.evals.summary import Row  # noqa: E402
from prefsculpt.search.plots import MISSING_Y, _axis, parallel_figure  # noqa: E402


def test_axis_places_categories_numbers_and_missing():
    y, ticks = _axis(pd.Series([True, False, None, True], dtype=object))
    assert y.tolist() == [1.0, 0.0, MISSING_Y, 1.0] and ticks == [(0.0, "False"), (1.0, "True")]
    y, ticks = _axis(pd.Series([0.1, np.nan, 0.3, 0.2]))
    assert y[0] == 0.0 and y[2] == 1.0 and y[3] == pytest.approx(0.5) and y[1] == MISSING_Y
    assert ticks == [(0.0, "0.1"), (1.0, "0.3")]
    y, _ = _axis(pd.Series([0.7, 0.7]))  # one value: mid-axis, no division by zero
    assert y.tolist() == [0.5, 0.5]


def test_parallel_figure_draws_one_line_per_trial_through_every_axis():
    frame = pd.DataFrame({"trial": [0, 1, 2], "baseline": [True, False, False], "pareto": [False, True, True],
                          "off_target": [0.3, 0.1, 0.2], "on_target": [0.8, 0.79, 0.81],
                          "p:shape/length": [False, True, True], "p:lambda/length": [np.nan, 0.5, 2.0]})
    fig = parallel_figure(frame)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 4]  # 2 params + 2 objectives
    assert len(lines) == 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lambda/length", "shape/length", "off-target ↓",
                                                            "on-target ↑"]
    base = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert len(base) == 1 and base[0].get_ydata()[0] == MISSING_Y  # plain DPO sampled no λ
    assert sorted(ln.get_linewidth() for ln in lines) == [1.0, 2.6, 2.6]  # the two Pareto trials bold
    plt.close(fig)
    assert parallel_figure(frame.iloc[:0]) is None


def est(m, lo, hi):
    return Estimate(m, lo, hi, 10)


def test_sycophancy_forest_marks_a_ci_above_zero():
    rows = [Row("syc/planted/p_agree", est(0.6, 0.5, 0.7), est(0.4, 0.3, 0.5), est(0.2, 0.1, 0.3)),
            Row("syc/opinion/all/match_rate", est(0.5, 0.4, 0.6), est(0.5, 0.4, 0.6), est(0.0, -0.1, 0.1)),
            Row("style/emoji/rate", est(0.1, 0.0, 0.2))]
    fig = sycophancy_forest(rows)
    ax, axd = fig.axes
    ticks = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)}
    assert ticks == {"planted/p_agree": 1, "opinion/all/match_rate": 0}  # first row on top; no style row
    colours = [c.lines[0].get_color() for c in axd.containers]  # the difference markers, in row order
    assert colours == ["#d8603b", "#555555"]  # CI above 0 (more sycophantic) in red; spanning 0 grey
    plt.close(fig)
    assert sycophancy_forest([rows[2]]) is None  # no sycophancy metric, no figure


def test_shift_scatter_separates_hypotheses_from_controls():
    t = pd.DataFrame({"concept": ["latent:1", "latent:2", "latent:3", "latent:9"], "control": [False, False, False, True],
                      "predicted": [1.0, -0.5, 0.2, 0.0], "shift_z": [0.8, -0.3, 0.1, 0.05]})
    fig = shift_scatter(t, {"shift/hyp_spearman": 1.0, "shift/hyp_r2": 0.97, "shift/hyp_n": 3.0})
    ax = fig.axes[0]
    hyp, ctl = ax.collections
    assert len(hyp.get_offsets()) == 3 and len(ctl.get_offsets()) == 1
    assert "hypotheses: ρ 1.00, R² 0.97, n 3" in ax.get_title()
    assert {a.get_text() for a in ax.texts} == {"latent:1", "latent:2", "latent:3"}
    plt.close(fig)
    assert shift_scatter(t.drop(columns="predicted")) is None


def test_shift_scatter_colours_shaped_and_unshaped_apart():
    from matplotlib.colors import to_hex

    t = pd.DataFrame({"concept": ["latent:1", "latent:2", "latent:3", "latent:9"], "control": [False, False, False, True],
                      "group": ["shaped", "unshaped", "unshaped", "control"],
                      "predicted": [1.0, -0.5, 0.2, 0.0], "shift_z": [0.1, -0.3, 0.1, 0.05]})
    m = {"shift/shaped_n": 1.0, "shift/unshaped_n": 2.0, "shift/hyp_abs_shift_z": 0.17, "shift/control_abs_shift_z": 0.05}
    fig = shift_scatter(t, m)
    ax = fig.axes[0]
    got = {c.get_label(): (len(c.get_offsets()), to_hex(c.get_facecolor()[0])) for c in ax.collections}
    assert got == {"shaped hypotheses (1)": (1, "#d8603b"), "unshaped hypotheses (2)": (2, "#3b7dd8"),
                   "random controls (1)": (1, "#9aa5b1")}
    title = ax.get_title()
    assert "shaped: ρ n/a, R² n/a, n 1" in title and "unshaped: ρ n/a, R² n/a, n 2" in title
    assert "hypotheses 0.17, controls 0.05" in title
    plt.close(fig)
