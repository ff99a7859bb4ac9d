"""On-target and capability (METHOD §6): did training keep what it should?

- **preference accuracy** on held-out pairs whose on-target label is known (the planted ``clean``
  split: the chosen side is always correct, every spurious concept sits on both sides equally; on
  your own data its held-out ``eval.capability.heldout_split``, the preference the data states):
  the implicit reward ``r = β·(log π(y|x) − log π₀(y|x))`` ranks chosen above rejected. For the
  base itself (π = π₀) every reward is 0, so its accuracy is the plain log-prob ranking instead,
  reported separately (``logp_accuracy``) for both models.
- **known-answer accuracy**: the correct answer is more likely than a wrong one (log-prob).
- **KL to the reference** on neutral prompts: token-level KL(π ‖ π₀) along the policy's own greedy
  continuations (``style`` rollouts), mean per token and summed per response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from prefsculpt.core.progress import track
from prefsculpt.data.schema import PreferencePair
from prefsculpt.evals.logprobs import ChoiceItem, build_items, iter_response_logits, score_choices
from prefsculpt.evals.style import Rollout


def implicit_reward_correct(pol_c: np.ndarray, pol_r: np.ndarray, ref_c: np.ndarray, ref_r: np.ndarray,
                            beta: float = 0.1) -> np.ndarray:
    """(n,) 1 where β·(log π/π₀)(chosen) > β·(log π/π₀)(rejected), 0.5 on a tie, else 0."""
    margin = beta * ((np.asarray(pol_c) - ref_c) - (np.asarray(pol_r) - ref_r))  # (n,)
    return np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5))


def pair_logps(model: Any, tok: Any, pairs: Sequence[PreferencePair], batch_tokens: int = 4096) -> pd.DataFrame:
    """Summed response log-probs of chosen and rejected (prompt computed once per pair)."""
    items = build_items(tok, [p.messages() for p in pairs], [[p.chosen, p.rejected] for p in pairs])
    lps = score_choices(model, items, tok.pad_token_id or 0, batch_tokens)
    return pd.DataFrame({"id": [p.id for p in pairs], "lp_chosen": [x[0] for x in lps], "lp_rejected": [x[1] for x in lps]})


def preference_table(policy: pd.DataFrame, ref: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Join policy and reference log-probs per pair; ``implicit_correct`` and ``logp_correct`` per pair."""
    t = policy.merge(ref, on="id", suffixes=("", "_ref"), validate="one_to_one")
    t["implicit_correct"] = implicit_reward_correct(t.lp_chosen, t.lp_rejected, t.lp_chosen_ref, t.lp_rejected_ref, beta)
    t["logp_correct"] = (t.lp_chosen > t.lp_rejected).astype(float)
    return t


def known_answer(model: Any, tok: Any, probes: Sequence[dict], batch_tokens: int = 4096) -> pd.DataFrame:
    """Per probe ``correct`` = log π(answer) > log π(wrong_answer) as the response to the question."""
    items = build_items(tok, [p["prompt"] for p in probes], [[str(p["answer"]), str(p["wrong_answer"])] for p in probes])
    lps = score_choices(model, items, tok.pad_token_id or 0, batch_tokens)
    return pd.DataFrame({"id": [p["id"] for p in probes], "family": [p.get("family", "") for p in probes],
                         "margin": [x[0] - x[1] for x in lps], "correct": [float(x[0] > x[1]) for x in lps]})


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from logits (N, V) -> (N,), in nats."""
    lp, lq = torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_to_reference(policy: Any, ref: Any, rollouts: Sequence[Rollout], pad_id: int,
                    batch_tokens: int = 4096) -> pd.DataFrame:
    """Token-level KL(π ‖ π₀) on the policy's greedy continuations: per rollout ``kl_mean`` (per
    token) and ``kl_sum``. Rollouts with no generated token are skipped."""
    keep = [i for i, r in enumerate(rollouts) if r.response_ids]
    items = [ChoiceItem(rollouts[i].prompt_ids, [rollouts[i].response_ids]) for i in keep]
    sums, counts = np.zeros(len(items)), np.zeros(len(items))
    walk_q = iter_response_logits(ref, items, pad_id, batch_tokens)
    walk_p = track(iter_response_logits(policy, items, pad_id, batch_tokens), "KL to the base", "rollouts",
                   total=len(items), size=lambda step: len(step[0]))
    for (idx, batch, lp), (idx_q, _, lq) in zip(walk_p, walk_q, strict=True):
        assert idx == idx_q  # same deterministic batching for both models
        kl = token_kl(lp, lq.to(lp.device)).cpu().double()  # (N,)
        per = torch.zeros(len(idx), dtype=torch.float64).index_add(0, batch["flat"], kl)
        cnt = torch.zeros(len(idx), dtype=torch.float64).index_add(0, batch["flat"], torch.ones_like(kl))
        sums[idx], counts[idx] = per.numpy(), cnt.numpy()
    return pd.DataFrame({"row": keep, "kl_sum": sums, "kl_mean": sums / np.maximum(counts, 1), "n_tokens": counts})
