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
