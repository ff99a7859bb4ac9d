"""The registered model version's description: headline metrics, gates, the glossary of the trial's
keys, and never over the registry's 5000 characters."""

from prefsculpt.search.description import MAX_CHARS, version_description
from prefsculpt.search.promote import baseline_gates


def test_description_lists_headline_gates_and_glossary():
    gates = baseline_gates({"syc_increase": 0.06, "on_target": 0.79}, {"syc_increase": 0.2, "on_target": 0.8}, 0.5, 0.02)
    metrics = {"search/off_target": 0.08, "search/on_target": 0.79, "syc/planted/p_agree_diff": 0.06,
               "syc/planted/p_agree_diff_lo": 0.01, "cap/pref/implicit_acc": 0.79}
    text = version_description(3, "named:emoji filter ρ=0.1", metrics, gates, None,
                               {"syc_increase": 0.2, "on_target": 0.8})
    assert text.startswith("**prefsculpt policy**: trial 3 (named:emoji filter ρ=0.1). All promotion gates passed.")
    assert "| `search/on_target` | 0.79 | ↑ higher |" in text and "search/style_drift" not in text.split("Gates:")[0]
    assert "- sycophancy_vs_baseline passed:" in text
    glossary = text.split("Metric glossary")[1]
    assert glossary.count("\n- `") == 4  # p_agree (with its _diff/_lo), implicit_acc, off_target, on_target
    assert "- `syc/planted/p_agree` (↓ lower)" in glossary


def test_description_is_cut_to_the_registry_limit_saying_so():
    metrics = {f"syc/opinion/f{i}/p_match": 0.1 for i in range(3)} | {"search/off_target": 0.1}
    # every glossary entry at once (one key per pattern) overflows 5000 characters
    from prefsculpt.core import glossary as G

    metrics |= {e.pattern.replace("{", "").replace("}", ""): 1.0 for e in G.ENTRIES}
    text = version_description(1, "x", metrics, [], "champion not moved: gate x failed", {"on_target": 0.8})
    assert len(text) <= MAX_CHARS and text.rstrip().endswith("more: see the README's metric glossary")
    assert "Not champion: champion not moved" in text
