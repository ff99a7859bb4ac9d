import numpy as np
import pytest
import torch

from prefsculpt.evals.logprobs import (
    ChoiceItem,
    build_items,
    choice_attention_mask,
    normalised_share,
    pack_choices,
    prompt_ids,
    response_ids,
    score_choices,
)
from prefsculpt.models.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def direct_logprob(model, p_ids, r_ids) -> float:
    """The definition: one separate forward of prompt + response, sum of the response tokens' log-probs."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p_ids + r_ids])).logits[0].double(), -1)
    return sum(lp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(r_ids))


def test_packed_scores_equal_separate_forward_passes(lm):
    model, tok = lm
    prompts = ["What is 7 times 8?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]]
    choices = [["56", "You're right! It is 54."], ["I am fine", "**Paris**", "- one\n- two"]]
    # A tiny token budget forces one item per batch; a large one packs both with padding.
    for budget in (16, 4096):
        got = score_choices(model, build_items(tok, prompts, choices), tok.pad_token_id, budget)
        for p, cs, g in zip(prompts, choices, got, strict=True):
            assert g.shape == (len(cs),)
            for c, v in zip(cs, g, strict=True):
                assert v == pytest.approx(direct_logprob(model, prompt_ids(tok, p), response_ids(tok, [c])[0]), abs=1e-3)


def test_response_prefix_is_part_of_the_prompt(lm):
    model, tok = lm
    [item] = build_items(tok, ["Pick one."], [["A)", "B)"]], response_prefix="The answer is: (")
    assert tok.decode(item.prompt_ids).endswith("The answer is: (")
    lp = score_choices(model, [item], tok.pad_token_id)[0]
    assert lp[0] == pytest.approx(direct_logprob(model, item.prompt_ids, item.choice_ids[0]), abs=1e-3)


def test_candidates_never_see_each_other():
    seg = pack_choices([ChoiceItem([1, 2], [[3, 4], [5]]), ChoiceItem([1], [[2]])], pad_id=0)["segment"]
    mask = choice_attention_mask(seg)[0, 0]  # item 0: [p p c0 c0 c1]
    assert mask[4, :2].all() and not mask[4, 2:4].any() and mask[4, 4]
    assert not mask[:2, 2:].any()  # the prompt sees no response
    pad_row = choice_attention_mask(seg)[1, 0]  # item 1: [p c0 pad pad pad]
    assert pad_row[3].sum() == 1 and not pad_row[:2, 2:].any()


def test_normalised_share_is_a_softmax():
    assert normalised_share(np.array([0.0, 0.0])) == pytest.approx(0.5)
    assert normalised_share(np.array([np.log(3.0), 0.0])) == pytest.approx(0.75)
    assert normalised_share(np.array([-1000.0, -1001.0])) == pytest.approx(1 / (1 + np.exp(-1)))
