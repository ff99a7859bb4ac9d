import numpy as np
import pytest
import torch

from prefsculpt.evals.capability import (
    implicit_reward_correct,
    kl_to_reference,
    known_answer,
    preference_table,
    token_kl,
)
from prefsculpt.evals.style import generate_greedy
from prefsculpt.models.loading import load_model, load_tokenizer
from tests.unit.evals.helpers import direct_logprob, sharpen


def test_implicit_reward_ranks_by_policy_over_reference():
    # chosen gained 2 nats over the reference, rejected lost 1: correct; the reverse: wrong; equal: tie
    got = implicit_reward_correct(np.array([-8.0, -12.0, -5.0]), np.array([-11.0, -9.0, -5.0]),
                                  np.array([-10.0, -10.0, -5.0]), np.array([-10.0, -10.0, -5.0]))
    assert got.tolist() == [1.0, 0.0, 0.5]
    # A response the policy simply finds likelier is not enough: only the change against π₀ counts.
    assert implicit_reward_correct(np.array([-1.0]), np.array([-9.0]), np.array([-0.5]), np.array([-9.0]))[0] == 0.0


def test_preference_table_joins_on_ids():
    import pandas as pd

    pol = pd.DataFrame({"id": ["a", "b"], "lp_chosen": [-1.0, -5.0], "lp_rejected": [-3.0, -4.0]})
    ref = pd.DataFrame({"id": ["b", "a"], "lp_chosen": [-5.0, -2.0], "lp_rejected": [-4.0, -2.0]})
    t = preference_table(pol, ref, beta=0.1).set_index("id")
    assert t.loc["a", "implicit_correct"] == 1.0 and t.loc["b", "implicit_correct"] == 0.5
    assert t.loc["a", "logp_correct"] == 1.0 and t.loc["b", "logp_correct"] == 0.0


def test_token_kl_matches_definition():
    p, q = torch.randn(4, 11), torch.randn(4, 11)
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    assert torch.allclose(token_kl(p, q), (lp.exp() * (lp - lq)).sum(-1), atol=1e-6)
    assert torch.allclose(token_kl(p, p), torch.zeros(4), atol=1e-6)
    assert (token_kl(p, q) > 0).all()


def test_kl_to_reference_zero_for_itself_positive_otherwise(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ref = load_model(tiny_model_dir).eval()
    pol = sharpen(load_model(tiny_model_dir).eval(), std=0.05)
    rolls = generate_greedy(pol, tok, ["What is 7 times 8?", "Hello"], max_new_tokens=5)
    same = kl_to_reference(ref, ref, rolls, tok.pad_token_id)
    assert np.allclose(same.kl_mean, 0, atol=1e-6) and (same.n_tokens == [len(r.response_ids) for r in rolls]).all()
    diff = kl_to_reference(pol, ref, rolls, tok.pad_token_id, batch_tokens=8)
    # Per token by hand for the first rollout.
    r = rolls[0]
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    with torch.no_grad():
        lp, lq = pol(ids).logits[0].float(), ref(ids).logits[0].float()
    pos = range(len(r.prompt_ids) - 1, len(r.prompt_ids) - 1 + len(r.response_ids))
    want = token_kl(lp[list(pos)], lq[list(pos)]).mean().item()
    assert diff.kl_mean[0] == pytest.approx(want, rel=1e-3) and (diff.kl_mean > 0).all()


def test_known_answer_margin_equals_a_direct_forward_pass(tiny_model_dir):
    """margin = log π(answer | question) − log π(wrong | question), each by one plain forward pass."""
    from prefsculpt.data.planted import make_probes

    model, tok = sharpen(load_model(tiny_model_dir).eval(), std=0.08), load_tokenizer(tiny_model_dir)
    probes = make_probes("known_answer", 5, seed=2)
    df = known_answer(model, tok, probes)
    assert list(df.id) == [p["id"] for p in probes]
    for p, r in zip(probes, df.itertuples(), strict=True):
        want = direct_logprob(model, tok, p["prompt"], str(p["answer"])) - direct_logprob(model, tok, p["prompt"],
                                                                                          str(p["wrong_answer"]))
        assert r.margin == pytest.approx(want, abs=1e-3)
        assert r.correct == float(want > 0)


def test_pair_logps_and_implicit_accuracy_from_direct_forward_passes(tiny_model_dir):
    """Preference accuracy end to end against hand values: each side's log-prob under policy and
    reference by one plain forward pass, the implicit reward's verdict by its definition."""
    from prefsculpt.data.schema import PreferencePair
    from prefsculpt.evals.capability import pair_logps

    tok = load_tokenizer(tiny_model_dir)
    ref = load_model(tiny_model_dir).eval()
    pol = sharpen(load_model(tiny_model_dir).eval(), std=0.08)
    pairs = [PreferencePair("a", "What is 7 times 8?", "56", "54"),
             PreferencePair("b", ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}),
                            "Hello!", "**Hello** there")]
    tp, tr = pair_logps(pol, tok, pairs), pair_logps(ref, tok, pairs)
    t = preference_table(tp, tr, beta=0.1).set_index("id")
    for p in pairs:
        c, r = (direct_logprob(pol, tok, p.messages(), x) for x in (p.chosen, p.rejected))
        c0, r0 = (direct_logprob(ref, tok, p.messages(), x) for x in (p.chosen, p.rejected))
        assert t.loc[p.id, "lp_chosen"] == pytest.approx(c, abs=1e-3)
        assert t.loc[p.id, "lp_rejected_ref"] == pytest.approx(r0, abs=1e-3)
        margin = (c - c0) - (r - r0)
        assert t.loc[p.id, "implicit_correct"] == (1.0 if margin > 0 else 0.0 if margin < 0 else 0.5)
        assert t.loc[p.id, "logp_correct"] == float(c > r)
