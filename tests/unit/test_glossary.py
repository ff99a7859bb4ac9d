"""The metric glossary: real keys resolve to the right entry and direction, suffixes are explained,
and the README's generated section is exactly what the glossary renders."""

from pathlib import Path

import pytest

from prefsculpt.core import glossary as G

README = Path(__file__).resolve().parents[2] / "README.md"

#: Keys the stages logged in real runs (prepare, sae, audit, train, evaluate, search, promote).
REAL_KEYS = [
    "rows_read", "train/n_pairs", "validation/tag_style_bold_chosen_gt_rejected", "test/truncated_prompt",
    "planted_rate/sycophancy", "sae/explained_variance", "sae/tokens_per_second", "named/emoji/separation",
    "cache/sae_hit", "time/collect_seconds", "n_significant", "top3_d_z", "calibration/share_reporting",
    "planted/flattery/rank", "planted/captured", "train/loss", "train/rewards/accuracies", "train/concept/score/namedstock_flattery",
    "train/pairs_per_s", "epoch", "syc/planted/p_agree_diff_lo", "syc/opinion/all/match_rate_base",
    "syc/are_you_sure/math/flip_rate", "style/emoji/rate_diff", "style/in_domain/bold/mean", "style/n_tokens/mean",
    "cap/pref/implicit_acc_hi", "cap/kl/mean_token", "shift/hyp_spearman", "shift/control_abs_shift_z",
    "time/sycophancy_s", "time/total_s", "search/off_target", "search/n_pareto", "search/n_complete",
    "promote/promoted", "syc/planted/shift_diff_lo", "syc/suggested/sa/p_sugg_neutral_base",
    "syc/are_you_sure/math/shift_diff", "shift/shaped_r2", "shift/unshaped_n", "shift/hyp_along_z", "shift/control_n",
]


def test_every_real_key_has_an_entry():
    assert G.unknown(REAL_KEYS) == []
    assert G.unknown(["no/such/metric", "search/off_target"]) == ["no/such/metric"]


@pytest.mark.parametrize(("key", "pattern", "direction"), [
    ("syc/opinion/all/match_rate", "syc/opinion/{file}/match_rate", G.LOWER),
    ("syc/opinion/all/match_rate_diff_lo", "syc/opinion/{file}/match_rate", G.LOWER),
    ("syc/opinion/all/match_rate_base", "syc/opinion/{file}/match_rate", G.INFO),  # the base: no better way
    ("cap/pref/implicit_acc", "cap/pref/implicit_acc", G.HIGHER),
    ("search/n_pareto", "search/n_pareto", G.INFO),  # the literal key, not search/n_{state}
    ("search/n_fail", "search/n_{state}", G.INFO),
    ("time/total_s", "time/total_s", G.INFO),
    ("time/capability_s", "time/{eval}_s", G.INFO),
    ("shift/control_abs_shift_z", "shift/control_abs_shift_z", G.LOWER),
])
def test_lookup_finds_the_entry_and_direction(key, pattern, direction):
    m = G.lookup(key)
    assert m is not None and m.entry.pattern == pattern and m.direction == direction


def test_suffixes_are_spelled_out():
    m = G.lookup("syc/planted/p_agree_diff_hi")
    assert m.suffixes == ("_diff", "_hi")
    assert m.meaning.endswith("(paired policy − base difference; upper CI bound)")
    assert G.lookup("style/emoji/rate").suffixes == ()


def test_placeholders_stand_for_one_segment():
    assert G.lookup("syc/opinion/a/b/p_match") is None  # {file} never spans a '/'


def test_entries_for_keeps_glossary_order_once():
    got = G.entries_for(["search/on_target", "search/off_target", "search/off_target_lo", "cap/kl/sum"])
    assert [e.pattern for e in got] == ["cap/kl/sum", "search/off_target", "search/on_target"]


def test_readme_section_is_generated_from_the_glossary():
    text = README.read_text()
    assert G.render_into(text) == text, "README glossary is stale: run python -m prefsculpt.core.glossary README.md"
    assert "| `search/off_target` | ↓ lower |" in text


def test_render_into_refuses_text_without_markers():
    with pytest.raises(ValueError, match="no generated glossary section"):
        G.render_into("# no markers here")
