"""Final figures: the shaped pick against plain DPO, paired over the *same* test items."""

import numpy as np
import pandas as pd
import pytest

from prefsculpt.evals.compare import ItemMismatch, final_figures, mean_of_means
from prefsculpt.evals.stats import paired_bootstrap

ON, SYC = "cap/pref/implicit_acc", ["syc/planted/p_agree_diff"]


def _tables(ids, acc, agree, base_agree):
    return {"capability": {"preference": pd.DataFrame({"id": ids, "implicit_correct": acc})},
            "sycophancy": {"planted": pd.DataFrame({"id": ids, "p_agree": agree}),
                           "planted_base": pd.DataFrame({"id": ids, "p_agree": base_agree})}}


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    ids = [f"probe-test-{i}" for i in range(60)]
    base = rng.uniform(0.2, 0.4, 60)
    shaped = _tables(ids, rng.integers(0, 2, 60).astype(float), base + rng.normal(0.02, 0.05, 60), base)
    plain = _tables(ids, rng.integers(0, 2, 60).astype(float), base + rng.normal(0.15, 0.05, 60), base)
    # plain's rows in another order: the pairing must go by item id, never by position
    plain = {e: {t: df.iloc[::-1].reset_index(drop=True) for t, df in tabs.items()} for e, tabs in plain.items()}
    return ids, shaped, plain


def test_shaped_minus_plain_is_paired_over_the_same_test_items(pair):
    ids, shaped, plain = pair
    fin = final_figures(shaped, plain, ON, SYC, ratio=0.5, n_boot=500, seed=3)
    s = shaped["capability"]["preference"].set_index("id").loc[ids, "implicit_correct"].to_numpy()
    p = plain["capability"]["preference"].set_index("id").loc[ids, "implicit_correct"].to_numpy()
    want = paired_bootstrap(s, p, 500, 0.95, 3)
    got = fin.figures["on_target_diff"]
    assert got.n == 60 and got.mean == pytest.approx(want.mean) and (got.low, got.high) == pytest.approx((want.low, want.high))
    assert fin.figures["on_target"].mean == pytest.approx(s.mean()) and fin.figures["on_target_plain"].mean == pytest.approx(p.mean())
    m = fin.metrics()
    assert {"test/on_target", "test/on_target_lo", "test/on_target_hi", "test/on_target_plain", "test/on_target_diff_lo",
            "test/syc_vs_ratio_hi", "test/n/on_target_diff"} <= set(m)
    table = fin.table()
    assert set(table["metric"]) >= {ON, "syc/planted/p_agree"} and (table["n"] == 60).all()


def test_sycophancy_figures_are_increases_over_the_base_per_item(pair):
    ids, shaped, plain = pair
    fin = final_figures(shaped, plain, ON, SYC, ratio=0.5, n_boot=300)
    col = lambda t, name: t["sycophancy"][name].set_index("id").loc[ids, "p_agree"].to_numpy()  # noqa: E731
    s, p, b = col(shaped, "planted"), col(plain, "planted"), col(shaped, "planted_base")
    f = fin.figures
    assert f["syc_increase"].mean == pytest.approx((s - b).mean())
    assert f["syc_increase_plain"].mean == pytest.approx((p - b).mean())
    assert f["syc_increase_diff"].mean == pytest.approx((s - p).mean())
    assert f["syc_vs_ratio"].mean == pytest.approx(((s - b) - 0.5 * (p - b)).mean())
    assert f["syc_vs_ratio"].high < 0  # shaped clearly below half plain DPO's increase here


def test_different_items_are_refused_not_intersected(pair):
    ids, shaped, plain = pair
    plain["capability"]["preference"] = plain["capability"]["preference"].iloc[1:]  # one item short
    with pytest.raises(ItemMismatch, match="same test items"):
        final_figures(shaped, plain, ON, SYC, ratio=0.5, n_boot=50)
    other = {e: {t: df.assign(id=df["id"].str.replace("test", "select")) for t, df in tabs.items()}
             for e, tabs in pair[2].items()}
    with pytest.raises(ItemMismatch):
        final_figures(shaped, other, ON, SYC, ratio=0.5, n_boot=50)


def test_mean_of_means_covers_each_set():
    a, b = np.full(10, 1.0), np.full(30, 3.0)
    e = mean_of_means([a, b], 200, 0.95, 0)
    assert e.mean == pytest.approx(2.0) and e.low == pytest.approx(2.0) and e.n == 40
    assert np.isnan(mean_of_means([], 10, 0.95, 0).mean)


def test_a_pick_below_the_base_beyond_its_ci_is_called_a_reversal():
    from prefsculpt.stages.evaluate import overshoot

    fig = {"test/syc_increase": -0.455, "test/syc_increase_lo": -0.491, "test/syc_increase_hi": -0.416}
    why = overshoot(fig)
    assert why is not None and "-0.4550" in why and "reversed" in why
    # inside the CI of 0, or above it: "less of it", not a reversal
    assert overshoot(fig | {"test/syc_increase_hi": 0.01}) is None
    assert overshoot({"test/syc_increase": 0.02, "test/syc_increase_lo": 0.0, "test/syc_increase_hi": 0.04}) is None
    assert overshoot({}) is None  # no sycophancy set measured
