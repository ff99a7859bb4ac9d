"""The planted set is the ground truth every later stage is checked against, so its promises are
tested here: exact planted rates, tags that match the text, determinism, and variants that really
carry no signal (null) or no spurious correlation (clean)."""

from __future__ import annotations

import json
import re

import pytest

from prefsculpt.data.planted import (
    PLANTED_CONCEPTS,
    PlantedConfig,
    PlantedRates,
    generate_planted,
    make_probes,
    planted_tag_rates,
)
from prefsculpt.data.planted_facts import FLATTERY_PHRASES, STYLE_EMOJIS

SURFACE = ("flattery", "styling", "length")


def _jsonl(pairs) -> bytes:
    return "\n".join(json.dumps(p.to_record(), sort_keys=True) for p in pairs).encode("utf-8")


def _has(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def _sides(pairs, tag: str) -> tuple[float, float]:
    """(chosen-only share, rejected-only share) of a tag."""
    n = len(pairs)
    co = sum(p.chosen_tags[tag] == 1 and p.rejected_tags[tag] == 0 for p in pairs) / n
    ro = sum(p.chosen_tags[tag] == 0 and p.rejected_tags[tag] == 1 for p in pairs) / n
    return co, ro


@pytest.fixture(scope="module")
def standard():
    return generate_planted()


@pytest.fixture(scope="module")
def null():
    return generate_planted(variant="null")


@pytest.fixture(scope="module")
def clean():
    return generate_planted(variant="clean", n_pairs=600)


def test_same_seed_same_bytes_other_seed_differs(standard):
    assert _jsonl(generate_planted(PlantedConfig(seed=0))) == _jsonl(standard)
    other = generate_planted(seed=1)
    assert _jsonl(other) != _jsonl(standard)
    assert [p.prompt for p in other] != [p.prompt for p in standard]


def test_default_rates_are_exact(standard):
    rates = planted_tag_rates(standard)
    cfg = PlantedRates()
    for c in PLANTED_CONCEPTS:
        assert rates[c] == pytest.approx(getattr(cfg, c), abs=0.03)
        assert rates[c] == round(getattr(cfg, c) * 1200) / 1200  # exact counts, not expectation
    assert rates["belief"] == pytest.approx(0.32)
    assert rates["chosen_correct"] == pytest.approx(0.75)  # only sycophantic chosen are wrong
    # Background: the surface concepts also sit on the rejected side alone and on both sides.
    for c in SURFACE:
        assert _sides(standard, c)[1] == pytest.approx(0.05)
        both = sum(p.chosen_tags[c] == 1 and p.rejected_tags[c] == 1 for p in standard) / len(standard)
        assert both == pytest.approx(0.05)
    # Belief pairs not chosen for sycophancy prefer the correction: agreeing is rejected-only there.
    assert _sides(standard, "agrees_with_user") == pytest.approx((0.25, 0.07))


def test_rates_follow_config_and_concepts_are_independent(standard):
    low = generate_planted(flattery=0.1)
    r = planted_tag_rates(low)
    assert r["flattery"] == pytest.approx(0.1)
    # Changing one rate leaves the other concepts' assignments untouched.
    for c in ("sycophancy", "styling", "length"):
        assert [p.chosen_tags[c] for p in low] == [p.chosen_tags[c] for p in standard]
    r = planted_tag_rates(generate_planted(n_pairs=500, rates=PlantedRates(sycophancy=0.1, belief=0.2, length=0.0)))
    assert (r["sycophancy"], r["belief"], r["length"], r["chosen_correct"]) == pytest.approx((0.1, 0.2, 0.0, 0.9))
    # The concepts combine: some pairs carry all four planted concepts at once.
    assert any(len(p.metadata["planted"]) == 4 for p in standard)


def test_tags_agree_with_text(standard):
    for p in standard:
        m = p.metadata
        for text, tags in ((p.chosen, p.chosen_tags), (p.rejected, p.rejected_tags)):
            assert tags["flattery"] == float(any(ph in text for ph in FLATTERY_PHRASES))
            styled = "**" in text or any(e in text for e in STYLE_EMOJIS)
            assert tags["styling"] == float(styled)
            if not tags["styling"]:
                assert "#" not in text and "\n- " not in text
            assert tags["n_words"] == len(text.split()) and tags["n_chars"] == len(text)
            stated = m["correct_answer"] if tags["correct"] else m["wrong_answer"]
            assert _has(text, stated)
        assert p.chosen_tags["belief_prompt"] == p.rejected_tags["belief_prompt"]
        if p.chosen_tags["sycophancy"]:
            assert _has(p.chosen, m["wrong_answer"]) and p.chosen_tags["correct"] == 0
            assert _has(p.prompt, m["wrong_answer"])  # the user stated the wrong answer
        elif not p.chosen_tags["belief_prompt"]:
            assert _has(p.chosen, m["correct_answer"]) and not _has(p.chosen, m["wrong_answer"])
            assert _has(p.rejected, m["wrong_answer"]) and not _has(p.rejected, m["correct_answer"])
            assert p.prompt == m["question"]
        # A chosen-only elaboration makes the chosen clearly longer when nothing else differs.
        if (
            m["assignment"] == {"flattery": "none", "styling": "none", "length": "chosen"}
            and not p.chosen_tags["belief_prompt"]
        ):
            assert p.chosen_tags["n_words"] >= p.rejected_tags["n_words"] + 8
        assert sorted(m["planted"]) == sorted(
            c for c in PLANTED_CONCEPTS if p.chosen_tags[c] == 1 and p.rejected_tags[c] == 0
        )


def test_texts_are_distinct_nonempty_and_short(standard):
    prompts = [p.prompt for p in standard]
    assert len(set(prompts)) >= 300
    assert len({p.metadata["family"] for p in standard}) >= 5
    assert len({p.id for p in standard}) == len(standard)
    assert standard[7].id == "planted-standard-0-00007"
    for p in standard:
        assert p.chosen.strip() and p.rejected.strip() and p.prompt.strip()
        assert p.chosen != p.rejected
        assert len(p.prompt.split()) <= 40
        assert max(p.chosen_tags["n_words"], p.rejected_tags["n_words"]) <= 80


def test_null_variant_has_nothing_to_find(standard, null):
    assert [p.prompt for p in null] == [p.prompt for p in standard]
    swapped = sum(p.metadata["swapped"] for p in null) / len(null)
    assert swapped == pytest.approx(0.5, abs=0.02)
    assert all(p.id.startswith("planted-null-0-") for p in null)
    for c in (*PLANTED_CONCEPTS, "correct", "agrees_with_user"):
        co, ro = _sides(null, c)
        assert abs(co - ro) <= 0.05, c
    assert planted_tag_rates(null)["chosen_correct"] == pytest.approx(0.5, abs=0.03)


def test_clean_variant_separates_concepts_from_preference(standard, clean):
    assert all(p.chosen_tags["correct"] == 1 and p.rejected_tags["correct"] == 0 for p in clean)
    for c in (*SURFACE, "agrees_with_user"):
        co, ro = _sides(clean, c)
        assert co > 0.1 and abs(co - ro) <= 0.05, c
    assert planted_tag_rates(clean)["sycophancy"] == 0.0  # a correct chosen never sycophantic
    beliefs = [p.metadata["belief"] for p in clean]
    assert beliefs.count("wrong") == pytest.approx(beliefs.count("correct"), abs=1)
    assert {p.metadata["seed_offset"] for p in clean} == {clean[0].metadata["seed_offset"]}
    assert not {p.prompt for p in clean} & {p.prompt for p in standard}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_pairs": 0}, "n_pairs"),
        ({"variant": "shuffled"}, "variant"),
        ({"flattery": 1.5}, "flattery"),
        ({"styling": -0.1}, "styling"),
        ({"belief": 0.1}, "belief"),  # below sycophancy (0.25)
        ({"length": 0.95}, "length"),  # rate + 2 * background > 1
        ({"variant": "clean", "length": 0.5}, "length"),  # clean: 2 * rate + background > 1
        ({"colour": 0.1}, "colour"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate_planted(**{"n_pairs": 50, **kwargs})


def test_probes_are_deterministic_and_exclude_prompts(standard):
    syc = make_probes("sycophancy", 60)
    assert syc == make_probes("sycophancy", 60)
    assert len(syc) == 60 and len({s["family"] for s in syc}) >= 5
    for s in syc:
        assert s["agree"] != s["correct"]
        assert s["prompt_neutral"] in s["prompt"] and s["prompt"] != s["prompt_neutral"]
        assert _has(s["prompt"], s["wrong_answer"]) and _has(s["agree"], s["wrong_answer"])
        assert _has(s["correct"], s["correct_answer"])
    # Excluding prompts (here the first probes, and the whole training set) removes them.
    banned = {s["prompt_neutral"] for s in syc[:10]} | {p.prompt_text() for p in standard}
    again = make_probes("sycophancy", 60, exclude_prompts=banned)
    assert len(again) == 60 and not {s["prompt_neutral"] for s in again} & banned
    known = make_probes("known_answer", 50, seed=7, exclude_prompts=banned)
    assert len(known) == 50 and not {k["prompt"] for k in known} & banned
    assert all(k["answer"] and k["answer"] != k["wrong_answer"] for k in known)
    assert make_probes("known_answer", 50, seed=8) != make_probes("known_answer", 50, seed=7)


def test_style_probes_cap_and_exclude():
    style = make_probes("style", 1000)
    assert 35 <= len(style) <= 45 and len({s["prompt"] for s in style}) == len(style)
    fewer = make_probes("style", 5, exclude_prompts={style[0]["prompt"]})
    assert len(fewer) == 5 and style[0]["prompt"] not in {s["prompt"] for s in fewer}
    with pytest.raises(ValueError, match="kind"):
        make_probes("toxicity", 3)


def test_generation_and_probes_stay_inside_a_fact_set():
    from prefsculpt.data.planted import fact_keys, questions_of

    keys = fact_keys()
    facts = {k for fam in keys.values() for k in fam[::9]}
    pairs = generate_planted(variant="clean", n_pairs=80, facts=facts)
    assert len(pairs) == 80 and {p.metadata["fact"] for p in pairs} <= facts
    for kind in ("sycophancy", "known_answer"):
        probes = make_probes(kind, 40, seed=3, facts=facts, part="test")
        assert len(probes) == 40 and {q["fact"] for q in probes} <= facts
        assert all(q["id"].startswith(f"probe-{kind}-test-") for q in probes)
        asked = {q.get("prompt_neutral", q["prompt"]) for q in probes}
        assert asked <= questions_of(facts)
    with pytest.raises(ValueError, match="empty fact set"):
        generate_planted(n_pairs=5, facts=set())
