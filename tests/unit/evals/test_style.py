import pytest
import torch

from prefsculpt.evals.style import compile_features, count_features, generate_greedy, load_prompts, summarise
from prefsculpt.models.loading import load_model, load_tokenizer
from tests.unit.evals.helpers import sharpen

CONFIG_CONCEPTS = [  # as in conf/config.yaml
    {"name": "markdown_bold", "kind": "regex", "pattern": r"\*\*[^*\n]+\*\*"},
    {"name": "markdown_header", "kind": "regex", "pattern": r"(?m)^#{1,6} "},
    {"name": "list_lines", "kind": "regex", "pattern": r"(?m)^\s*(?:[-*•]|\d+[.)])\s"},
    {"name": "emoji", "kind": "regex", "pattern": "[\U0001f300-\U0001faff\u2600-\u27bf]"},
    {"name": "exclamation", "kind": "regex", "pattern": "!"},
    {"name": "stock_flattery", "kind": "regex", "pattern": "(?i)(great question|you're absolutely)"},
    {"name": "agreeing", "kind": "contrastive", "positive": ["yes"], "negative": ["no"]},
]


def test_features_are_counted_on_crafted_strings():
    f = compile_features(CONFIG_CONCEPTS)
    assert "agreeing" not in f  # contrastive concepts are not text features
    text = "### Answer\n\nWhat a smart question! **Paris** is it ✅\n- one\n- two\n3. three\n\nGreat question!"
    c = count_features(text, f)
    assert c == {"markdown_bold": 1, "markdown_header": 1, "list_lines": 3, "emoji": 1, "exclamation": 2,
                 "stock_flattery": 2}  # "What a smart question" only via the planted phrases
    plain = count_features("The capital of France is Paris. 2 * 3 = 6, not a list.", f)
    assert all(v == 0 for v in plain.values())
    s = summarise([c, plain], list(f))
    assert s["list_lines"] == {"rate": 0.5, "mean": 1.5}


def test_default_patterns_and_bad_regex():
    assert set(compile_features(None)) >= {"markdown_bold", "emoji", "stock_flattery"}
    with pytest.raises(ValueError, match="bad regex"):
        compile_features([{"name": "broken", "kind": "regex", "pattern": "(unclosed"}])


def test_batched_left_padded_generation_equals_one_by_one(tiny_model_dir):
    model, tok = sharpen(load_model(tiny_model_dir).eval()), load_tokenizer(tiny_model_dir)
    prompts = ["What is 7 times 8?", "Hello", "The capital of France is Paris. There are 8 planets. Why?"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert [b.response_ids for b in batched] == [s.response_ids for s in single]
    assert len({tuple(s.response_ids) for s in single}) > 1  # outputs depend on the prompt: a real check
    # Greedy = argmax of a full forward at every step (no cache, no padding).
    ids = batched[1].prompt_ids
    for t in batched[1].response_ids:
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        assert nxt == t
        ids = ids + [t]


def test_prompt_files(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question_id": 81, "turns": ["Write a poem.", "Shorter."]}\n{"prompt": "Hi"}\n')
    assert load_prompts(p) == [{"id": "81", "prompt": "Write a poem."}, {"id": "2", "prompt": "Hi"}]
    p.write_text('{"prompt": "ok"}\n{"title": "no prompt here"}\n')
    with pytest.raises(ValueError, match="q.jsonl row 2: no prompt field"):
        load_prompts(p)
