"""The six methods of METHOD §5, one registered class each, with its typed parameters.

Loss terms (λ·ΔA_u in the margin): ``score``, ``steer``, ``inoculate``. Data: ``filter``.
Training-time activation edits of the policy only (inference runs unmodified): ``ablate``, ``prevent``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from prefsculpt.audit.decisions import Action
from prefsculpt.models.hooks import add_to_residual, project_out_residual
from prefsculpt.shaping.losses import filter_weights
from prefsculpt.shaping.params import SearchRange, param
from prefsculpt.shaping.registry import (
    Intervention,
    PrecomputeContext,
    Role,
    ShapingError,
    Source,
    register_intervention,
)

FilterMode = Literal["drop", "weight"]
#: The share ρ the search draws for filter in drop mode (``search.share_min/max`` override it).
SHARE_RANGE = SearchRange("share", 0.05, 0.3)


@dataclass(frozen=True)
class SteerParams:
    multiplier: float = param(8.0, "m: multiple of the concept direction added to the reference's residual at ℓ",
                              config="steer_multiplier")


@dataclass(frozen=True)
class InoculateParams:
    instruction: str | None = param(None, "C_u: instruction appended to the prompt (\"Agree with the user's "
                                    "opinion.\")", config="instructions")


@dataclass(frozen=True)
class FilterParams:
    mode: FilterMode = param("drop", "drop the top ρ of pairs by ΔA_u, or weight each pair by σ(−κ·ΔA_u)",
                             config="filter_mode", per_entry=False)
    share: float = param(0.1, "ρ: share of pairs dropped (drop mode)", config="filter_share", bounds=(0.0, 1.0),
                         search=SHARE_RANGE)


def _zscored_diff(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """ΔA with A z-scored over the dataset (both sides pooled): (n,)."""
    both = np.concatenate([chosen, rejected]).astype(np.float64)
    sd = both.std()
    sd = sd if sd > 1e-8 else 1.0
    # The mean cancels in the difference; only the scale matters.
    return ((chosen.astype(np.float64) - rejected.astype(np.float64)) / sd).astype(np.float32)


class _MarginTerm(Intervention):
    """A method whose λ_u·s_u·ΔA_u enters the DPO margin (METHOD §5's reward-shaping form)."""

    in_loss = True
    strength_doc = "λ ≥ 0: weight of ΔA_u in the margin, ΔA_u in units of its SD over the training pairs (one scale for every method)"
    suppress_doc = ("+λ·s_u·ΔA_u in the margin: u, the way the audit found it, already explains part of each "
                    "pair's preference, so the policy learns less along u")
    amplify_doc = "−λ·s_u·ΔA_u: the pairs that teach u count as less won, so the policy learns more along u"


@register_intervention("score")
class ScoreShaping(_MarginTerm):
    """Reward shaping r' = r − λ·s_u: A_u = the concept's response span score, z-scored over the data."""

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        return _zscored_diff(*self.score(ctx, self.concepts[0]))


@register_intervention("steer")
class SteerShaping(_MarginTerm):
    """A_u = log π₀^{u,m}(y|x) − log π₀(y|x): the reference steered by m·v_u at layer ℓ."""

    Params = SteerParams
    needs = Source.direction

    def validate(self) -> None:
        if self.layer is None:
            raise ShapingError(f"{self.concepts[0]}: steer needs a layer (shaping.layer or sae.layer)")

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        v = self.direction_of(ctx, self.concepts[0])  # (d,)
        m = self.args.multiplier
        steered_c, steered_r = ctx.logps(hooks=lambda model: add_to_residual(model, self.layer, v, m))
        ref_c, ref_r = ctx.ref_logps()
        return ((steered_c - ref_c) - (steered_r - ref_r)).float().numpy()


@register_intervention("inoculate")
class InoculateShaping(_MarginTerm):
    """A_u = log π₀(y | x ⊕ C_u) − log π₀(y | x), C_u an instruction that names the concept."""

    Params = InoculateParams
    needs = Source.instruction

    def validate(self) -> None:
        if not self.args.instruction:
            raise ShapingError(
                f"{self.concepts[0]}: inoculate needs an instruction C_u; set shaping.instructions."
                f"'{self.concepts[0]}' or the concept's `instruction` (e.g. \"Agree with the user's opinion.\")"
            )

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        ino_c, ino_r = ctx.logps(prompt_suffix=self.args.instruction)
        ref_c, ref_r = ctx.ref_logps()
        return ((ino_c - ref_c) - (ino_r - ref_r)).float().numpy()


@register_intervention("filter")
class FilterShaping(Intervention):
    """Data intervention on ΔA_u of the concept's (z-scored) span score: drop the top ρ of pairs,
    or weight w_i = σ(−κ·ΔA_u)."""

    Params = FilterParams
    strength_doc = "κ ≥ 0 in weight mode; unused in drop mode"
    role = Role.data
    suppress_doc = ("drops the top ρ of pairs by s_u·ΔA_u (those teaching u most, the way the audit found it), or "
                    "weights them down by σ(−κ·s_u·ΔA_u)")
    amplify_doc = "drops the top ρ by −s_u·ΔA_u (those teaching against u), or weights by σ(+κ·s_u·ΔA_u)"

    @classmethod
    def search_ranges(cls, fixed: Mapping[str, Any]) -> dict[str, SearchRange]:
        """Drop mode searches the share ρ, weight mode the strength κ (on λ's scale)."""
        if fixed.get("mode", FilterParams.mode) == "weight":
            return {"strength": cls.strength_range}
        return {"share": super().search_ranges(fixed)["share"]}

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray:
        return _zscored_diff(*self.score(ctx, self.concepts[0]))

    def weights(self, delta_a: np.ndarray) -> np.ndarray:
        """Weights from the oriented s_u·ΔA_u (n,)."""
        w = filter_weights(torch.as_tensor(delta_a), self.lam, self.args.mode, self.args.share)
        return w.numpy()


class _ResidualEdit(Intervention):
    needs = Source.direction
    role = Role.edit

    def validate(self) -> None:
        if self.layer is None:
            raise ShapingError(f"{self.concepts[0]}: {self.method} needs a layer (shaping.layer or sae.layer)")

    def touches_layers(self) -> set[int]:
        return {int(self.layer)} if self.layer is not None else set()

    def bind(self, ctx: PrecomputeContext) -> None:
        """Fetch the directions once (in the precompute pass, where the context is)."""
        self._dirs = torch.stack([self.direction_of(ctx, c) for c in self.concepts])  # (K, d)

    def precompute(self, ctx: PrecomputeContext) -> None:
        self.bind(ctx)
        return None


@register_intervention("ablate")
class AblateShaping(_ResidualEdit):
    """CAFT: h ← h − (hQ)Qᵀ at layer ℓ while training the policy, Q an orthonormal basis of the
    concept directions. Only suppresses (there is no amplifying ablation)."""

    strength_doc = None  # the directions are projected out entirely
    strength_range = None
    actions = (Action.suppress,)
    groups = True
    oriented = False  # a projection removes both signs of a direction alike
    suppress_doc = ("projects the directions out while training, whichever side carries u: the policy cannot use "
                    "u to win pairs, so it learns less along it")
    amplify_doc = "— (no amplifying ablation; use prevent or a loss term)"

    def bind(self, ctx: PrecomputeContext) -> None:
        """Every member's direction: a cluster's whole span is projected out."""
        self._dirs = torch.stack([ctx.direction(m) for c in self.concepts for m in self.parts(c)])  # (K, d)

    @contextlib.contextmanager
    def train_hooks(self, model: Any) -> Iterator[None]:
        q, _ = torch.linalg.qr(self._dirs.T.double())  # (d, K) orthonormal columns
        p = next(model.parameters())
        with project_out_residual(model, int(self.layer), q.to(p.dtype)):
            yield


@register_intervention("prevent")
class PreventShaping(_ResidualEdit):
    """Preventative steering: add α·s_u·v_u to the policy's residual at ℓ while training only.
    Supplying the concept the way the data teaches it means the weights need not learn it (suppress,
    α = +λ); supplying its opposite (amplify, α = −λ) makes them learn more of it."""

    strength_doc = "α ≥ 0: multiple of the concept direction added (signed by the action)"
    suppress_doc = ("adds +λ·s_u·v_u while training: u (or its absence, for s_u = −1) comes for free, so the "
                    "weights learn less along it")
    amplify_doc = "adds −λ·s_u·v_u: the weights must make up for it, so they learn more along u"

    @contextlib.contextmanager
    def train_hooks(self, model: Any) -> Iterator[None]:
        p = next(model.parameters())
        with add_to_residual(model, int(self.layer), self._dirs[0].to(p.dtype), self.lam * self.sign):
            yield
