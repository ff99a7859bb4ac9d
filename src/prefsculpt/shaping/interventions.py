"""The six methods of METHOD §5, one registered class each.

Loss terms (λ·ΔA_u in the margin): ``score``, ``steer``, ``inoculate``. Data: ``filter``.
Training-time activation edits of the policy only (inference runs unmodified): ``ablate``, ``prevent``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from prefsculpt.models.hooks import add_to_residual, project_out_residual
from prefsculpt.shaping.losses import filter_weights
from prefsculpt.shaping.registry import (
    Intervention,
    PrecomputeContext,
    ShapingError,
    Spec,
    register_intervention,
)


def _zscored_diff(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """ΔA with A z-scored over the dataset (both sides pooled): (n,)."""
    both = np.concatenate([chosen, rejected]).astype(np.float64)
    sd = both.std()
    sd = sd if sd > 1e-8 else 1.0
    # The mean cancels in the difference; only the scale matters.
    return ((chosen.astype(np.float64) - rejected.astype(np.float64)) / sd).astype(np.float32)


@register_intervention("score")
class ScoreShaping(Intervention):
    """Reward shaping r' = r − λ·s_u: A_u = the concept's response span score, z-scored over the data."""

    in_loss = True

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        c, r = ctx.concept_score(self.concepts[0])
        return _zscored_diff(c, r)


@register_intervention("steer")
class SteerShaping(Intervention):
    """A_u = log π₀^{u,m}(y|x) − log π₀(y|x): the reference steered by m·v_u at layer ℓ."""

    in_loss = True

    def validate(self) -> None:
        if self.layer is None:
            raise ShapingError(f"{self.concepts[0]}: steer needs a layer (shaping.layer or sae.layer)")

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        v = ctx.direction(self.concepts[0])  # (d,)
        m = float(self.params["multiplier"])
        steered_c, steered_r = ctx.logps(hooks=lambda model: add_to_residual(model, self.layer, v, m))
        ref_c, ref_r = ctx.ref_logps()
        return ((steered_c - ref_c) - (steered_r - ref_r)).float().numpy()


@register_intervention("inoculate")
class InoculateShaping(Intervention):
    """A_u = log π₀(y | x ⊕ C_u) − log π₀(y | x), C_u an instruction that names the concept."""

    in_loss = True

    def validate(self) -> None:
        if not self.params.get("instruction"):
            raise ShapingError(
                f"{self.concepts[0]}: inoculate needs an instruction C_u; set shaping.instructions."
                f"'{self.concepts[0]}' or the concept's `instruction` (e.g. \"Agree with the user's opinion.\")"
            )

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        ino_c, ino_r = ctx.logps(prompt_suffix=str(self.params["instruction"]))
        ref_c, ref_r = ctx.ref_logps()
        return ((ino_c - ref_c) - (ino_r - ref_r)).float().numpy()


@register_intervention("filter")
class FilterShaping(Intervention):
    """Data intervention on ΔA_u of the concept's (z-scored) span score: drop the top ρ of pairs,
    or weight w_i = σ(−κ·ΔA_u)."""

    def validate(self) -> None:
        mode = self.params.get("mode", "drop")
        if mode not in ("drop", "weight"):
            raise ShapingError(f"{self.concepts[0]}: filter mode must be drop or weight, got {mode!r}")
        share = float(self.params.get("share", 0.0))
        if mode == "drop" and not 0.0 <= share < 1.0:
            raise ShapingError(f"{self.concepts[0]}: filter share ρ must be in [0, 1), got {share}")

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        c, r = ctx.concept_score(self.concepts[0])
        return _zscored_diff(c, r)

    def weights(self, delta_a: np.ndarray) -> np.ndarray:
        w = filter_weights(torch.as_tensor(delta_a), self.lam, str(self.params.get("mode", "drop")),
                           float(self.params.get("share", 0.0)))
        return w.numpy()


class _ResidualEdit(Intervention):
    def validate(self) -> None:
        if self.layer is None:
            raise ShapingError(f"{self.concepts[0]}: {self.method} needs a layer (shaping.layer or sae.layer)")

    def touches_layers(self) -> set[int]:
        return {int(self.layer)} if self.layer is not None else set()

    def bind(self, ctx: PrecomputeContext) -> None:
        """Fetch the directions once (in the precompute pass, where the context is)."""
        self._dirs = torch.stack([ctx.direction(c) for c in self.concepts])  # (K, d)

    def precompute(self, ctx: PrecomputeContext) -> None:
        self.bind(ctx)
        return None


@register_intervention("ablate")
class AblateShaping(_ResidualEdit):
    """CAFT: h ← h − (hQ)Qᵀ at layer ℓ while training the policy, Q an orthonormal basis of the
    concept directions. Only suppresses (there is no amplifying ablation)."""

    def validate_one(self, spec: Spec) -> None:
        if spec.action != "suppress":
            raise ShapingError(f"{spec.concept}: ablate can only suppress; use prevent or score to amplify")

    @contextlib.contextmanager
    def train_hooks(self, model: Any) -> Iterator[None]:
        q, _ = torch.linalg.qr(self._dirs.T.double())  # (d, K) orthonormal columns
        p = next(model.parameters())
        with project_out_residual(model, int(self.layer), q.to(p.dtype)):
            yield


@register_intervention("prevent")
class PreventShaping(_ResidualEdit):
    """Preventative steering: add α·v_u to the policy's residual at ℓ while training only. Adding
    the concept for free means the weights need not learn it (suppress, α = +λ); subtracting it
    (amplify, α = −λ) makes them learn more of it."""

    @contextlib.contextmanager
    def train_hooks(self, model: Any) -> Iterator[None]:
        p = next(model.parameters())
        with add_to_residual(model, int(self.layer), self._dirs[0].to(p.dtype), self.lam):
            yield
