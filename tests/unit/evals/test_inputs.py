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
