"""The built-in style set: neutral prompts plus held-out planted questions that no training pair uses."""

from prefsculpt.data.prepared import split_source
from prefsculpt.evals.inputs import IN_DOMAIN, load_inputs, training_prompts
from tests.unit.evals.helpers import eval_cfg


def _inputs(cfg):
    prepared, _ = split_source(cfg.data)
    return load_inputs(cfg.eval, prepared), prepared


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
    f.write_text('{"prompt": "Say hi."}\n{"prompt": "Say bye."}\n')
    inp, _ = _inputs(eval_cfg("unused", tmp_path, {"evals": ["style"], "style": {"prompts_path": str(f)}}))
    assert [p["prompt"] for p in inp.style_prompts] == ["Say hi.", "Say bye."]


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
    splits = split_pairs(load_source(cfg.data).pairs, {"train": 0.8, "validation": 0.1, "test": 0.1})
    assert [p.id for p in inp.clean_pairs] == [p.id for p in splits["test"]] and inp.clean_pairs
    assert not {p.id for p in inp.clean_pairs} & {p.id for p in splits["train"]}  # never a training pair
    assert list(inp.opinion) == [SHIPPED_OPINION.stem] and len(inp.opinion[SHIPPED_OPINION.stem]) == 150
    item = inp.opinion[SHIPPED_OPINION.stem][0]
    assert item.matching in ("(A)", "(B)") and item.not_matching in ("(A)", "(B)") and item.matching != item.not_matching


def test_the_planted_set_keeps_its_clean_split_and_no_shipped_set_unless_asked(tmp_path):
    from prefsculpt.evals.inputs import SHIPPED_OPINION

    cfg = eval_cfg("unused", tmp_path, {"evals": ["sycophancy", "capability"], "capability": {"known_answer": 0}})
    inp, _ = _inputs(cfg)
    assert inp.opinion == {} and len(inp.clean_pairs) == 12  # eval tiny: 12 of the planted clean split
    on, _ = _inputs(eval_cfg("unused", tmp_path, {"evals": ["sycophancy"], "sycophancy": {"shipped": "on"}}))
    assert list(on.opinion) == [SHIPPED_OPINION.stem]


def test_an_empty_held_out_split_or_a_bad_mode_is_a_clear_error(tmp_path):
    import pytest

    from prefsculpt.core.errors import UserError

    own = _own_data(tmp_path, n=10)
    own["data"]["split"] = {"train": 1.0, "validation": 0.0, "test": 0.0}
    with pytest.raises(UserError, match="test split .* is empty"):
        _inputs(eval_cfg("unused", tmp_path, {"evals": ["capability"], "capability": {"known_answer": 0}}, own))
    with pytest.raises(UserError, match="shipped='always'"):
        _inputs(eval_cfg("unused", tmp_path, {"evals": ["sycophancy"], "sycophancy": {"shipped": "always"}}))
