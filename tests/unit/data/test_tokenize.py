import pytest

from prefsculpt.data import PreferencePair, token_stats, tokenize_pairs


def test_mask_covers_exactly_the_response(tiny_tokenizer):
    pair = PreferencePair(id="x", prompt="What is 7 times 8?", chosen="56.", rejected="54, I think.")
    (t,) = tokenize_pairs([pair], tiny_tokenizer)
    ids, mask = t.sequence("chosen")
    assert len(ids) == len(mask) and sum(mask) == len(t.chosen_ids)
    assert t.chosen_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(t.chosen_ids[:-1]) == "56."
    prompt_text = tiny_tokenizer.decode(t.prompt_ids)
    assert prompt_text.endswith("<|im_start|>assistant\n") and "What is 7 times 8?" in prompt_text
    # chat prompts keep all turns
    chat = PreferencePair(id="y", prompt=({"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "Again"}), chosen="a", rejected="b")
    (tc,) = tokenize_pairs([chat], tiny_tokenizer)
    assert tiny_tokenizer.decode(tc.prompt_ids).count("<|im_start|>") == 4


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer):
    long_prompt = "one two three " * 40 + "What is 7 times 8?"
    pair = PreferencePair(id="x", prompt=long_prompt, chosen="56. " + "More words here. " * 30, rejected="54.")
    (t,) = tokenize_pairs([pair], tiny_tokenizer, max_prompt_tokens=20, max_response_tokens=8)
    assert len(t.prompt_ids) == 20 and t.prompt_truncated
    assert tiny_tokenizer.decode(t.prompt_ids).endswith("assistant\n")
    assert len(t.chosen_ids) == 8 and t.chosen_truncated and not t.rejected_truncated
    assert tiny_tokenizer.decode(t.chosen_ids).startswith("56.")
    st = token_stats([t])
    assert st["truncated_prompt"] == 1 and st["truncated_chosen"] == 1 and st["truncated_rejected"] == 0
    assert st["tokens_chosen_max"] == 8


def test_bad_limits(tiny_tokenizer):
    with pytest.raises(ValueError):
        tokenize_pairs([], tiny_tokenizer, max_prompt_tokens=0)
