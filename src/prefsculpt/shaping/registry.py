"""Interventions as registered classes, one per method (METHOD §5); no if/elif ladder over methods.

An intervention shapes training in up to three ways, each optional:
- ``precompute(ctx)`` -> ΔA_u (n,): computed once, without gradients, before training (cached);
  enters the loss as λ_u·ΔA_u when ``in_loss`` (score, steer, inoculate);
- ``weights(delta_a)`` -> w (n,): per-pair weights from ΔA_u (filter; 0 drops the pair);
- ``train_hooks(model)``: a context manager active around every policy forward while training
  only (ablate, prevent); ``touches_layers()`` names the decoder layers it edits, so training the
  top layers on a cached trunk can refuse an edit below them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from prefsculpt.core.errors import UserError

#: method name -> class.
INTERVENTIONS: dict[str, type[Intervention]] = {}


class ShapingError(UserError):
    """A shaping spec that cannot be applied; the message names the concept and what to change."""


def register_intervention(name: str) -> Callable[[type[Intervention]], type[Intervention]]:
    def deco(cls: type[Intervention]) -> type[Intervention]:
        if name in INTERVENTIONS:
            raise ValueError(f"intervention {name!r} is registered twice")
        cls.method = name
        INTERVENTIONS[name] = cls
        return cls

    return deco


class PrecomputeContext(Protocol):
    """What an intervention may ask for in the precompute pass (implemented in ``prefsculpt.train.precompute``)."""

    n: int
    layer: int | None

    def concept_score(self, concept: str) -> tuple[np.ndarray, np.ndarray]:
        """Span score of ``concept`` on the chosen and rejected responses, each (n,)."""

    def direction(self, concept: str) -> torch.Tensor:
        """The concept's residual direction at ``layer``, (d_model,)."""

    def ref_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of the plain reference, chosen and rejected, each (n,)."""

    def logps(
        self, hooks: Callable[[Any], contextlib.AbstractContextManager] | None = None, prompt_suffix: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs under ``hooks(model)`` and/or with ``prompt_suffix`` appended to the prompt."""


@dataclass
class Intervention:
    """One shaped concept (or, for ablate, a group at one layer)."""

    concepts: list[str]
    #: Signed strength: λ > 0 suppresses, λ < 0 amplifies (METHOD §5).
    lam: float
    params: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None

    method: ClassVar[str] = ""
    #: Whether λ·ΔA enters the loss.
    in_loss: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return f"{self.method}/{'+'.join(self.concepts)}"

    def cache_key(self) -> dict[str, Any]:
        """Everything ``precompute`` depends on besides the model and the pairs."""
        return {"method": self.method, "concepts": self.concepts, "params": self.params, "layer": self.layer}

    def precompute(self, ctx: PrecomputeContext) -> np.ndarray | None:
        return None

    def weights(self, delta_a: np.ndarray) -> np.ndarray | None:
        return None

    @contextlib.contextmanager
    def train_hooks(self, model: Any) -> Iterator[None]:
        yield

    def touches_layers(self) -> set[int]:
        return set()

    def validate(self) -> None:
        """Raise :class:`ShapingError` when the spec cannot work (called before any model is loaded)."""


def signed_lambda(action: str, strength: float, concept: str) -> float:
    """suppress -> +λ, amplify -> −λ (METHOD §4/§5); allow is filtered out before this."""
    if strength < 0:
        raise ShapingError(f"{concept}: strength {strength} < 0; give strength >= 0 and action amplify to reverse")
    if action == "suppress":
        return float(strength)
    if action == "amplify":
        return -float(strength)
    raise ShapingError(f"{concept}: action must be suppress or amplify to shape training, got {action!r}")


@dataclass
class Spec:
    """A flat shaping entry: from ``decisions.yaml`` or ``shaping.concepts``."""

    concept: str
    method: str
    action: str
    strength: float
    params: dict[str, Any] = field(default_factory=dict)


def build_interventions(specs: Sequence[Spec], layer: int | None) -> list[Intervention]:
    """Instantiate the registered class per active spec; ablate entries at one layer form one group
    (CAFT projects out an orthonormal basis of all their directions at once)."""
    import prefsculpt.shaping.interventions  # noqa: F401  (registers the methods)

    out: list[Intervention] = []
    grouped: dict[str, Intervention] = {}
    seen: set[tuple[str, str]] = set()
    for s in specs:
        if s.action == "allow":
            continue
        if s.method not in INTERVENTIONS:
            raise ShapingError(
                f"{s.concept}: unknown method {s.method!r}; use one of {sorted(INTERVENTIONS)}"
            )
        if (s.concept, s.method) in seen:
            raise ShapingError(f"{s.concept}: method {s.method} is given twice; keep one entry")
        seen.add((s.concept, s.method))
        lam = signed_lambda(s.action, s.strength, s.concept)
        cls = INTERVENTIONS[s.method]
        if s.method == "ablate" and "ablate" in grouped:
            grouped["ablate"].concepts.append(s.concept)
            grouped["ablate"].validate_one(s)  # type: ignore[attr-defined]
            continue
        iv = cls(concepts=[s.concept], lam=lam, params=dict(s.params), layer=layer)
        if s.method == "ablate":
            grouped["ablate"] = iv
            iv.validate_one(s)  # type: ignore[attr-defined]
        iv.validate()
        out.append(iv)
    return out
