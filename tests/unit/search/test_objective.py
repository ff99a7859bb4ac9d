"""The search objective reads METHOD's sycophancy: the belief − neutral shift, not the raw p(agree)."""

import pytest

from prefsculpt.search.config import ObjectivesConfig
from prefsculpt.search.objective import objectives_from_metrics


def default_run_metrics() -> dict[str, float]:
    """Plain DPO on the default run: p(agree) +0.272, but neutral agreement +0.203 too."""
    return {"syc/planted/p_agree_diff": 0.272, "syc/planted/p_agree_neutral_diff": 0.203,
            "syc/planted/shift_diff": 0.069, "syc/planted/shift_diff_lo": -0.012, "syc/planted/shift_diff_hi": 0.140,
            "style/emoji/rate_diff": -0.1, "style/bold/rate_diff": 0.3, "cap/pref/implicit_acc": 0.81}


def test_syc_increase_is_the_belief_minus_neutral_shift():
    got = objectives_from_metrics(default_run_metrics(), ObjectivesConfig())
    assert got["syc_increase"] == pytest.approx(0.069)  # not 0.272
    assert got["style_drift"] == pytest.approx(0.2)
    assert got["off_target"] == pytest.approx(0.069 + 0.5 * 0.2)
    assert got["on_target"] == 0.81


def test_real_sets_with_a_neutral_twin_count_by_their_shift():
    oc = ObjectivesConfig(sycophancy_metrics=["syc/planted/shift_diff", "syc/suggested/sa/shift_diff",
                                              "syc/are_you_sure/ays/shift_diff"], style_weight=0.0)
    m = default_run_metrics() | {"syc/suggested/sa/shift_diff": 0.031, "syc/suggested/sa/p_sugg_diff": 0.2,
                                 "syc/are_you_sure/ays/shift_diff": 0.02}
    assert objectives_from_metrics(m, oc)["syc_increase"] == pytest.approx((0.069 + 0.031 + 0.02) / 3)


def test_an_old_raw_p_agree_config_still_scores_but_warns(caplog):
    oc = ObjectivesConfig(sycophancy_metrics=["syc/planted/p_agree_diff"])
    got = objectives_from_metrics(default_run_metrics(), oc)
    assert got["syc_increase"] == pytest.approx(0.272)
    assert "belief − neutral" in caplog.text


def test_off_target_counts_a_policy_below_the_base_as_drift_not_as_a_win():
    """suppress asks for less of the concept, not its opposite: −0.3 (contrarian) is as far off as
    +0.3, and farther than +0.02; the signed increase stays what the gates and reports read."""
    below = default_run_metrics() | {"syc/planted/shift_diff": -0.3}
    near = default_run_metrics() | {"syc/planted/shift_diff": 0.02}
    oc = ObjectivesConfig(style_weight=0.0)
    got_below, got_near = objectives_from_metrics(below, oc), objectives_from_metrics(near, oc)
    assert got_below["syc_increase"] == pytest.approx(-0.3) and got_below["off_target"] == pytest.approx(0.3)
    assert got_near["off_target"] < got_below["off_target"]
    # two sets: the mean of their absolute changes, not the absolute mean (they must not cancel)
    two = ObjectivesConfig(sycophancy_metrics=["syc/planted/shift_diff", "syc/o/p_match_diff"], style_weight=0.0)
    both = objectives_from_metrics(below | {"syc/o/p_match_diff": 0.3}, two)
    assert both["syc_increase"] == pytest.approx(0.0) and both["off_target"] == pytest.approx(0.3)
    # the old signed objective on request
    signed = ObjectivesConfig(style_weight=0.0, sycophancy_drift=False)
    assert objectives_from_metrics(below, signed)["off_target"] == pytest.approx(-0.3)
