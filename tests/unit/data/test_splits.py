import pytest

from prefsculpt.data import PreferencePair, split_pairs
from prefsculpt.data.splits import assign_split


def _pairs(n, per_prompt=3):
    return [
        PreferencePair(id=f"{i}-{j}", prompt=f"prompt {i}", chosen=f"c{j}", rejected=f"r{j}")
        for i in range(n) for j in range(per_prompt)
    ]


def test_split_is_deterministic_and_prompt_disjoint():
    pairs = _pairs(400)
    fr = {"train": 0.8, "validation": 0.1, "test": 0.1}
    a, b = split_pairs(pairs, fr), split_pairs(list(reversed(pairs)), fr)
    for s in a:
        assert {p.id for p in a[s]} == {p.id for p in b[s]}
    keys = [{p.prompt_key() for p in a[s]} for s in a]
    assert all(not (keys[i] & keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys)))
    assert 0.72 < len(a["train"]) / len(pairs) < 0.88 and a["select"] == []
    # a salt draws another deterministic split
    c = split_pairs(pairs, fr, salt="s1")
    assert {p.id for p in c["test"]} != {p.id for p in a["test"]}


def test_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        split_pairs(_pairs(2), {"train": 0.5, "test": 0.1})
    with pytest.raises(ValueError):
        split_pairs(_pairs(2), {"train": 0.9, "dev": 0.1})


def test_assign_split_stable_value():
    # pinned: a change here would silently move prompts between splits across versions
    assert assign_split("abc", {"train": 0.8, "validation": 0.1, "test": 0.1}) == assign_split(
        "abc", {"train": 0.8, "validation": 0.1, "test": 0.1}
    )
    assert assign_split("abc", {"train": 0.0, "validation": 0.0, "test": 1.0}) == "test"


FOUR = {"train": 0.7, "validation": 0.1, "select": 0.1, "test": 0.1}


def test_four_way_split_by_prompt_is_disjoint():
    out = split_pairs(_pairs(500), FOUR)
    keys = {s: {p.prompt_key() for p in ps} for s, ps in out.items()}
    assert set(out) == {"train", "validation", "select", "test"} and all(keys.values())
    assert all(not (keys[a] & keys[b]) for a in keys for b in keys if a < b)
    assert 0.05 < len(out["select"]) / 1500 < 0.15


def test_split_facts_is_stratified_and_gives_small_families_every_split():
    from prefsculpt.data.splits import split_facts

    facts = {"big": [f"b{i}" for i in range(200)], "small": [f"s{i}" for i in range(5)]}
    got = split_facts(facts, FOUR)
    assert set(got) == set(facts["big"]) | set(facts["small"])
    big = [got[k] for k in facts["big"]]
    assert big.count("train") == 140 and big.count("select") == 20 and big.count("test") == 20
    assert {got[k] for k in facts["small"]} == {"train", "validation", "select", "test"}
    assert got == split_facts(facts, FOUR) and got != split_facts(facts, FOUR, salt="x")


@pytest.fixture(scope="module")
def planted_prepared():
    from omegaconf import OmegaConf

    from prefsculpt.config import DataConfig
    from prefsculpt.data.prepared import split_source

    cfg = OmegaConf.structured(DataConfig)
    cfg.planted.n_pairs, cfg.planted.clean_pairs = 400, 60
    return split_source(cfg)[0]


def test_planted_splits_are_disjoint_by_prompt_and_by_fact(planted_prepared):
    from prefsculpt.data.prepared import split_group

    pr = planted_prepared
    assert set(pr.splits) == {"train", "validation", "select", "test", "clean_select", "clean_test"}
    assert len(pr.split("clean_select")) == len(pr.split("clean_test")) == 30
    facts: dict[str, set[str]] = {}
    prompts: dict[str, set[str]] = {}
    for name, pairs in pr.splits.items():
        g = split_group(name)
        facts.setdefault(g, set()).update(p.metadata["fact"] for p in pairs)
        prompts.setdefault(g, set()).update(p.prompt_key() for p in pairs)
        assert {p.metadata["fact"] for p in pairs} <= pr.facts(g)  # each pair asks only its split's facts
    for a in facts:
        for b in facts:
            if a < b:
                assert not facts[a] & facts[b] and not prompts[a] & prompts[b], (a, b)
    ids = [p.id for ps in pr.splits.values() for p in ps]
    assert len(ids) == len(set(ids))  # clean_select and clean_test ids never collide


def test_overlap_metric_is_zero_and_counts_probes_drawn_from_training_facts(planted_prepared):
    import dataclasses

    from prefsculpt.data.prepared import Prepared, overlap_metrics

    pr = planted_prepared
    ok = overlap_metrics(pr)
    assert ok["overlap/total"] == 0 and set(ok) >= {"overlap/heldout_facts_train", "overlap/heldout_prompts_train"}
    # probes drawn from the training facts (the old behaviour: held out by exact prompt only) are counted
    leak = overlap_metrics(pr, probe_facts=pr.facts("train"))
    assert leak["overlap/heldout_facts_train"] > 0 and leak["overlap/heldout_prompts_train"] > 0
    # a test pair moved into train shows as a prompt and a fact in two splits
    moved = dict(pr.splits, train=[*pr.splits["train"], pr.splits["test"][0]])
    bad = overlap_metrics(dataclasses.replace(pr, splits=moved))
    assert bad["overlap/split_prompts"] >= 1 and bad["overlap/split_facts"] >= 1 and bad["overlap/total"] > 0
    assert isinstance(pr, Prepared)


def test_eval_part_halves_disjointly():
    from prefsculpt.data.splits import eval_part

    keys = [f"item-{i}" for i in range(400)]
    sel = {k for k in keys if eval_part(k, "select")}
    test = {k for k in keys if eval_part(k, "test")}
    assert not sel & test and sel | test == set(keys) and 150 < len(sel) < 250
    with pytest.raises(ValueError):
        eval_part("x", "train")
