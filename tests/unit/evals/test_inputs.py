"""Eval inputs: the built-in style set (neutral prompts plus held-out planted questions that no
training pair uses), and the held-out split every item comes from (select for the search, test for
the final figures: never one item in both)."""

from prefsculpt.data.prepared import split_source
from prefsculpt.evals.inputs import IN_DOMAIN, load_inputs, training_prompts
from tests.unit.evals.helpers import eval_cfg


def _inputs(cfg, split=None):
    prepared, _ = split_source(cfg.data)
    return load_inputs(cfg.eval, prepared, split=split), prepared


def test_in_domain_style_prompts_are_held_out_planted_questions(tmp_path):
    cfg = eval_cfg("unused", tmp_path, {"evals": ["style", "capability"], "style": {"in_domain": 5},
                                        "capability": {"known_answer": 5}})
    inp, prepared = _inputs(cfg)
    inside = [p for p in inp.style_prompts if p.get("subset") == IN_DOMAIN]
    assert len(inside) == 5 and len(inp.style_prompts) == 6 + 5
    assert training_prompts(prepared) and not {p["prompt"] for p in inside} & training_prompts(prepared)
    assert not {p["prompt"] for p in inside} & {q["prompt"] for q in inp.known_answer}  # not the capability items
    assert len({p["id"] for p in inp.style_prompts}) == len(inp.style_prompts)


def test_no_in_domain_prompts_for_a_prompt_file_or_real_data(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(f'{{"prompt": "Say {i}."}}\n' for i in range(40)))
    cfg = eval_cfg("unused", tmp_path, {"evals": ["style"], "style": {"prompts_path": str(f), "n_prompts": 0}})
    sel, _ = _inputs(cfg, "select")
    test, _ = _inputs(cfg, "test")
    assert all(p.get("subset") is None for p in sel.style_prompts + test.style_prompts)
    # the prompt file is halved between select and test, disjointly and completely
    got = [p["prompt"] for p in sel.style_prompts] + [p["prompt"] for p in test.style_prompts]
    assert sorted(got) == sorted(f"Say {i}." for i in range(40)) and 10 < len(sel.style_prompts) < 30


def _own_data(tmp_path, n=40):
    import json

    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Question {i}?", "chosen": f"Good answer {i}.",
                                     "rejected": f"Bad answer {i}."}) + "\n" for i in range(n)))
    return {"data": {"path": str(f), "name": "own", "format": "plain"}}


def test_own_data_scores_its_held_out_split_and_the_shipped_sycophancy_set(tmp_path):
    from prefsculpt.data.source import load_source
    from prefsculpt.data.splits import split_pairs
    from prefsculpt.evals.inputs import SHIPPED_OPINION

    cfg = eval_cfg("unused", tmp_path, {"evals": ["sycophancy", "capability"], "capability": {"known_answer": 0,
                                                                                              "clean_pairs": 50}},
                   _own_data(tmp_path))
    inp, _ = _inputs(cfg)
    fr = {k: cfg.data.split[k] for k in ("train", "validation", "select", "test")}
    splits = split_pairs(load_source(cfg.data).pairs, fr)
    assert [p.id for p in inp.clean_pairs] == [p.id for p in splits["select"]] and inp.clean_pairs
    assert not {p.id for p in inp.clean_pairs} & {p.id for p in splits["train"]}  # never a training pair
    test, _ = _inputs(cfg, "test")
    assert [p.id for p in test.clean_pairs] == [p.id for p in splits["test"]] and test.clean_pairs
    # the shipped set (150 items) is halved: select and test share no item
    sel_items, test_items = inp.opinion[SHIPPED_OPINION.stem], test.opinion[SHIPPED_OPINION.stem]
    assert list(inp.opinion) == [SHIPPED_OPINION.stem] and len(sel_items) + len(test_items) == 150
    assert not {i.id for i in sel_items} & {i.id for i in test_items} and 50 < len(sel_items) < 100
    item = inp.opinion[SHIPPED_OPINION.stem][0]
    assert item.matching in ("(A)", "(B)") and item.not_matching in ("(A)", "(B)") and item.matching != item.not_matching


def test_the_planted_set_keeps_its_clean_split_and_no_shipped_set_unless_asked(tmp_path):
    from prefsculpt.evals.inputs import SHIPPED_OPINION

    cfg = eval_cfg("unused", tmp_path, {"evals": ["sycophancy", "capability"], "capability": {"known_answer": 0}})
    inp, _ = _inputs(cfg)
    assert inp.opinion == {} and len(inp.clean_pairs) == 10  # clean_pairs 20: 10 per held-out part
    assert {p.id for p in inp.clean_pairs} <= {p.id for p in _inputs(cfg)[1].split("clean_select")}
    on, _ = _inputs(eval_cfg("unused", tmp_path, {"evals": ["sycophancy"], "sycophancy": {"shipped": "on"}}))
    assert list(on.opinion) == [SHIPPED_OPINION.stem]


def test_an_empty_held_out_split_or_a_bad_mode_is_a_clear_error(tmp_path):
    import pytest

    from prefsculpt.core.errors import UserError

    own = _own_data(tmp_path, n=10)
    own["data"]["split"] = {"train": 1.0, "validation": 0.0, "select": 0.0, "test": 0.0}
    with pytest.raises(UserError, match="select split .* is empty"):
        _inputs(eval_cfg("unused", tmp_path, {"evals": ["capability"], "capability": {"known_answer": 0}}, own))
    with pytest.raises(UserError, match="shipped='always'"):
        _inputs(eval_cfg("unused", tmp_path, {"evals": ["sycophancy"], "sycophancy": {"shipped": "always"}}))


def _facts_of(probes):
    return {p["fact"] for p in probes}


def test_select_and_test_items_are_disjoint_and_never_ask_a_training_fact(tmp_path):
    """The search scores on select, the final figures on test: no item id, prompt or planted fact is
    in both, and none asks about a fact (or a question) a training pair asks about."""
    cfg = eval_cfg("unused", tmp_path, {"evals": ["sycophancy", "style", "capability"],
                                        "sycophancy": {"planted_probes": 30}, "style": {"in_domain": 5},
                                        "capability": {"known_answer": 20}})
    sel, prepared = _inputs(cfg, "select")
    test, _ = _inputs(cfg, "test")
    assert sel.split == "select" and test.split == "test"
    assert sel.planted_probes and test.planted_probes and sel.clean_pairs and test.clean_pairs
    assert not sel.item_ids() & test.item_ids()
    assert sel.fingerprint() != test.fingerprint()  # never one base cache for both
    sel_facts = _facts_of(sel.planted_probes + sel.known_answer) | {p.metadata["fact"] for p in sel.clean_pairs}
    test_facts = _facts_of(test.planted_probes + test.known_answer) | {p.metadata["fact"] for p in test.clean_pairs}
    train_facts = {p.metadata["fact"] for p in prepared.all_pairs()}
    assert sel_facts <= prepared.facts("select") and test_facts <= prepared.facts("test")
    assert not sel_facts & test_facts and not (sel_facts | test_facts) & train_facts
    questions = {p.metadata["question"] for p in prepared.all_pairs()}
    asked = {q["prompt_neutral"] for q in sel.planted_probes + test.planted_probes}
    asked |= {q["prompt"] for q in sel.known_answer + test.known_answer}
    assert not asked & questions and not asked & training_prompts(prepared)
    assert not {p["prompt"] for p in sel.style_prompts} & {p["prompt"] for p in test.style_prompts}


def test_a_bad_split_is_a_clear_error(tmp_path):
    import pytest

    from prefsculpt.core.errors import UserError

    with pytest.raises(UserError, match="eval.split='train'"):
        _inputs(eval_cfg("unused", tmp_path, {"evals": ["capability"]}), "train")
