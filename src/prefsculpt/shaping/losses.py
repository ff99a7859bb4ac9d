"""The concept-shaped DPO loss (METHOD §5), as pure functions.

    L_i = − w_i · log σ( β·Δθ_i + Σ_u λ_u · ΔA_{u,i} )

Δθ is the DPO log-ratio margin, ΔA_u = A_u(x, y⁺) − A_u(x, y⁻) a concept's cached score difference,
λ_u signed (> 0 suppresses u: the concept already "explains" part of the preference, so the policy
needs to learn less of it; < 0 amplifies), w_i a per-pair weight (data filtering). With every λ = 0
and w = 1 this is TRL's ``sigmoid`` loss (``trl/trainer/dpo_trainer.py``, ``_compute_loss``), which
tests/unit/train/test_equivalence_trl.py checks to 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def concept_offsets(concept_terms: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """Each concept's contribution λ_u·ΔA_u to the margin, (B, U). concept_terms: ΔA (B, U); lambdas (U,)."""
    return concept_terms * lambdas.to(concept_terms.dtype)


def shaped_dpo_loss(
    delta_theta: torch.Tensor,
    beta: float,
    concept_terms: torch.Tensor | None = None,
    lambdas: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over the batch of −w·log σ(β·Δθ + Σ_u λ_u·ΔA_u).

    delta_theta: (B,) policy-minus-reference log-ratio margin Δθ. concept_terms: (B, U) ΔA per concept
    (None or U = 0: plain DPO). lambdas: (U,) signed strengths. weights: (B,) per-pair weights (None = 1).
    The mean is over all B pairs (as TRL), so a weight of 0 removes a pair's gradient without
    renormalising the others. Returns (loss, parts) with detached diagnostics:
    ``margin`` (B,) β·Δθ, ``offsets`` (B, U) λ_u·ΔA_u, ``logits`` (B,) the shaped margin, ``per_pair`` (B,).
    """
    margin = beta * delta_theta  # (B,)
    if concept_terms is not None and concept_terms.numel() > 0:
        if lambdas is None or lambdas.shape != concept_terms.shape[1:]:
            raise ValueError(f"lambdas must have shape ({concept_terms.shape[1]},), got {None if lambdas is None else tuple(lambdas.shape)}")
        offsets = concept_offsets(concept_terms.to(margin.dtype), lambdas)  # (B, U)
        logits = margin + offsets.sum(dim=1)
    else:
        offsets = margin.new_zeros(margin.shape[0], 0)
        logits = margin
    per_pair = -F.logsigmoid(logits)  # (B,)
    if weights is not None:
        per_pair = per_pair * weights.to(per_pair.dtype)
    loss = per_pair.mean()
    parts = {
        "margin": margin.detach(),
        "offsets": offsets.detach(),
        "logits": logits.detach(),
        "per_pair": per_pair.detach(),
    }
    return loss, parts


def filter_weights(delta_a: torch.Tensor, signed_strength: float, mode: str, share: float) -> torch.Tensor:
    """Per-pair weights of the ``filter`` intervention, (n,) from ΔA_u (n,).

    drop: w = 0 for the top ``share`` of pairs by sign(λ)·ΔA_u (suppress drops the pairs whose chosen
    side carries the concept most; amplify those whose rejected side does), ⌊share·n⌉ of them, but only
    pairs with sign(λ)·ΔA_u > 0: a pair that does not teach the concept that way is never dropped for it.
    weight: w = σ(−λ·ΔA_u) (METHOD §5: σ(−κ·ΔA_u) with κ = the signed strength).
    """
    if mode == "drop":
        n = delta_a.shape[0]
        k = int(round(share * n))
        w = torch.ones(n, dtype=torch.float32)
        if k > 0:
            key = delta_a.double() * (1.0 if signed_strength >= 0 else -1.0)
            # Stable tie-break by index so the same data always drops the same pairs.
            order = [i for i in sorted(range(n), key=lambda i: (-float(key[i]), i)) if float(key[i]) > 0]
            w[order[:k]] = 0.0
        return w
    if mode == "weight":
        return torch.sigmoid(-signed_strength * delta_a.float())
    raise ValueError(f"filter mode must be 'drop' or 'weight', got {mode!r}")
