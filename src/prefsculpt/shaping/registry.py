"""Interventions as registered classes, one per method (METHOD §5); no if/elif ladder over methods.

An intervention shapes training in up to three ways, each optional:
- ``precompute(ctx)`` -> ΔA_u (n,): computed once, without gradients, before training (cached);
  enters the loss as λ_u·ΔA_u when ``in_loss`` (score, steer, inoculate);
- ``weights(delta_a)`` -> w (n,): per-pair weights from ΔA_u (filter; 0 drops the pair);
- ``train_hooks(model)``: a context manager active around every policy forward while training
  only (ablate, prevent); ``touches_layers()`` names the decoder layers it edits, so training the
  top layers on a cached trunk can refuse an edit below them.

Each class also declares what it takes (its ``Params`` dataclass, the :class:`Source` it needs, what
its strength means, the actions it supports); validation (here and in ``shaping.decisions``), the
search space (``search.space``) and the README's method table (``shaping.table``) are read from these
declarations, so the registry is the one list of methods. The classes register in
``shaping.interventions``, which the package ``__init__`` imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from prefsculpt.audit.decisions import Action
from prefsculpt.core.errors import UserError
from prefsculpt.shaping.params import (
    CONFIG,
    PER_ENTRY,
    SEARCH,
    NoParams,
    SearchRange,
    check_declaration,
    coerce,
    entry_fields,
    fields,
    problems,
)

#: method name -> class, in registration order (the order of the README table and error messages).
INTERVENTIONS: dict[str, type[Intervention]] = {}

#: λ of every method with a strength: drawn log-uniformly (``search.lambda_min/max`` override it).
STRENGTH_RANGE = SearchRange("lambda", 0.1, 10.0, log=True)


class ShapingError(UserError):
    """A shaping spec that cannot be applied; the message names the concept and what to change."""


class Source(enum.StrEnum):
    """What a method needs for a concept, besides the model and the pairs."""

    #: span scores A_u(x, y) (the sae stage's scores, a regex named concept, or ``length``).
    scores = "scores"
    #: a residual direction v_u at layer ℓ (an SAE decoder row or a named direction).
    direction = "direction"
    #: an instruction C_u naming the concept (``shaping.instructions``).
    instruction = "instruction"


class Role(enum.StrEnum):
    """Where a method acts (the README table's "acts on" column)."""

    #: λ·ΔA_u in the margin of the DPO loss.
    loss = "loss term"
    #: per-pair weights (0 drops a pair).
    data = "data"
    #: an edit of the policy's residual stream while training only (inference runs unmodified).
    edit = "training-time edit"


def register_intervention(name: str) -> Callable[[type[Intervention]], type[Intervention]]:
    """Class decorator: the one place a method name is bound to its class (and so to its parameters)."""

    def deco(cls: type[Intervention]) -> type[Intervention]:
        if name in INTERVENTIONS:
            raise ValueError(f"intervention {name!r} is registered twice")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"intervention {name!r}: Params must be a dataclass, got {cls.Params!r}")
        check_declaration(name, cls.Params)
        cls.method = name
        INTERVENTIONS[name] = cls
        return cls

    return deco


def method_names() -> tuple[str, ...]:
    return tuple(INTERVENTIONS)


def entry_param_names() -> tuple[str, ...]:
    """Every parameter a decisions entry may set, over all methods (first-registered first)."""
    out: dict[str, None] = {}
    for cls in INTERVENTIONS.values():
        out.update(dict.fromkeys(entry_fields(cls.Params)))
    return tuple(out)


def methods_needing(source: Source | str) -> tuple[str, ...]:
    return tuple(m for m, cls in INTERVENTIONS.items() if cls.needs == source)


def strengthless_methods() -> frozenset[str]:
    """Methods that shape without a strength (an entry of theirs with strength 0 still acts)."""
    return frozenset(m for m, cls in INTERVENTIONS.items() if cls.strength_doc is None)


def get_intervention(method: str, concept: str) -> type[Intervention]:
    cls = INTERVENTIONS.get(method)
    if cls is None:
        raise ShapingError(f"{concept}: unknown method {method!r}; use one of {sorted(INTERVENTIONS)}")
    return cls


class PrecomputeContext(Protocol):
    """What an intervention may ask for in the precompute pass (implemented in ``prefsculpt.train.precompute``)."""

    n: int
    layer: int | None
    #: Directions are scaled to unit norm (``shaping.unit_directions``).
    unit_directions: bool

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


#: ``shaping.orient`` (``ShapingConfig.orient`` says what each means).
ORIENT_MODES = ("audit", "data", "formula")


def orientation(direction: int | None, delta_a: np.ndarray | None, mode: str) -> tuple[int, str]:
    """The sign s_u a concept is oriented by, and where it came from (``audit`` | ``data`` | ``formula``
    | ``assumed``). delta_a: the raw ΔA_u = A(y⁺) − A(y⁻) over the training pairs (n,), or None for a
    method that computes none (prevent: without the audit's direction it assumes +1)."""
    if mode not in ORIENT_MODES:
        raise ShapingError(f"shaping.orient={mode!r}: use one of {list(ORIENT_MODES)}")
    if mode == "formula":
        return 1, "formula"
    if mode == "audit" and direction is not None:
        return int(direction), "audit"
    if delta_a is None:
        return (1, "assumed") if direction is None else (int(direction), "audit")
    return (-1 if float(np.mean(delta_a, dtype=np.float64)) < 0 else 1), "data"


@dataclass
class Intervention:
    """One shaped concept (or, for a grouping method such as ablate, a group at one layer).

    A subclass declares, as class attributes: ``Params`` (a frozen dataclass of :func:`param` fields),
    ``needs`` (the :class:`Source` it reads), ``strength_doc`` (what the strength means; None = it has
    none) and ``strength_range``, the ``actions`` it supports, and ``in_loss`` / ``groups``. The first
    paragraph of its docstring is its summary in the README table."""

    concepts: list[str]
    #: Signed strength: λ > 0 suppresses, λ < 0 amplifies (METHOD §5).
    lam: float
    #: Parameter values (plain, for cache keys and logs); ``args`` holds them typed.
    params: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None
    #: The audit's direction of the (first) concept: +1 the preferred side has more of it, −1 less, None unknown.
    direction: int | None = None
    #: Concept -> its member concepts (a cluster hypothesis: shaped through their summed scores and directions).
    members: dict[str, list[str]] = field(default_factory=dict)
    #: ``params`` as the typed ``Params`` instance (set from ``params``).
    args: Any = field(init=False, repr=False, compare=False)
    #: The orientation s_u (set by :meth:`orient` in the precompute pass) and where it came from.
    sign: int = field(default=1, init=False, compare=False)
    sign_from: str = field(default="", init=False, compare=False)

    method: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: Whether λ·ΔA enters the loss.
    in_loss: ClassVar[bool] = False
    needs: ClassVar[Source] = Source.scores
    strength_doc: ClassVar[str | None] = "λ ≥ 0"
    #: The range the search draws the strength from (None: the search never draws it).
    strength_range: ClassVar[SearchRange | None] = STRENGTH_RANGE
    role: ClassVar[Role] = Role.loss
    actions: ClassVar[tuple[Action, ...]] = (Action.suppress, Action.amplify)
    #: Entries of this method at one layer form a single intervention.
    groups: ClassVar[bool] = False
    #: Whether suppress/amplify depend on which side carries the concept (ablate's projection does not).
    oriented: ClassVar[bool] = True
    #: What suppress and amplify do with this method (README's "Suppress and amplify" table).
    suppress_doc: ClassVar[str] = ""
    amplify_doc: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.args = coerce(self.Params, self.params)
        self.params = dataclasses.asdict(self.args)

    @property
    def name(self) -> str:
        return f"{self.method}/{'+'.join(self.concepts)}"

    # ------------------------------------------------------------ declared (class-level) behaviour
    @classmethod
    def validate_params(cls, values: Mapping[str, Any]) -> list[str]:
        """Problems with ``values`` as this method's parameters, each naming the parameter."""
        return problems(cls.method, cls.Params, values)

    @classmethod
    def resolve_params(cls, given: Mapping[str, Any], shaping: Any, concept: str) -> dict[str, Any]:
        """Each parameter from the entry (when it may set it), else ``shaping.<config key>`` (looked up
        by concept when that is a mapping), else the field default."""
        out: dict[str, Any] = {}
        for f in fields(cls.Params):
            v = given.get(f.name) if f.metadata.get(PER_ENTRY, True) else None
            key = f.metadata.get(CONFIG)
            if v is None and key is not None:
                v = getattr(shaping, key, None) if not isinstance(shaping, Mapping) else shaping.get(key)
                if isinstance(v, Mapping) or hasattr(v, "keys"):
                    v = dict(v).get(concept)
            out[f.name] = f.default if v is None else v
        return out

    @classmethod
    def search_ranges(cls, fixed: Mapping[str, Any]) -> dict[str, SearchRange]:
        """Parameter name (``strength`` or a Params field) -> the range the search draws it from,
        given the parameters it does not search (``fixed``, e.g. filter's mode)."""
        out = {"strength": cls.strength_range} if cls.strength_range is not None else {}
        out.update({f.name: f.metadata[SEARCH] for f in fields(cls.Params) if f.metadata.get(SEARCH)})
        return out

    # ------------------------------------------------------------ what it does to training
    def cache_key(self) -> dict[str, Any]:
        """Everything ``precompute`` depends on besides the model and the pairs (not the orientation:
        the cache keeps the raw ΔA_u)."""
        key = {"method": self.method, "concepts": self.concepts, "params": self.params, "layer": self.layer}
        return {**key, "members": self.members} if self.members else key

    def parts(self, concept: str) -> list[str]:
        """The concepts that stand for ``concept``: its members (a cluster), else itself."""
        return list(self.members.get(concept) or [concept])

    def score(self, ctx: PrecomputeContext, concept: str) -> tuple[np.ndarray, np.ndarray]:
        """Span score (chosen, rejected), each (n,): a cluster's is the sum of its members'."""
        got = [ctx.concept_score(m) for m in self.parts(concept)]
        return (np.sum([c for c, _ in got], axis=0, dtype=np.float64).astype(np.float32),
                np.sum([r for _, r in got], axis=0, dtype=np.float64).astype(np.float32))

    def direction_of(self, ctx: PrecomputeContext, concept: str) -> torch.Tensor:
        """The concept's residual direction (d,): a cluster's is the sum of its members' (unit) directions,
        rescaled to unit norm when ``ctx`` scales directions so."""
        parts = self.parts(concept)
        if len(parts) == 1:
            return ctx.direction(parts[0])
        v = torch.stack([ctx.direction(m) for m in parts]).sum(0)
        return v / v.norm().clamp_min(1e-8) if ctx.unit_directions else v

    def orient(self, delta_a: np.ndarray | None, mode: str) -> int:
        """Set and return the sign s_u (:func:`orientation`); +1 for a method that needs none."""
        self.sign, self.sign_from = orientation(self.direction, delta_a, mode) if self.oriented else (1, "")
        return self.sign

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
    if action == Action.suppress:
        return float(strength)
    if action == Action.amplify:
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
    #: The audit's direction (+1 / −1) of the hypothesis, None when the entry gives none.
    direction: int | None = None
    #: A cluster hypothesis' members (empty: a single concept).
    members: Sequence[str] = ()


def _check_spec(cls: type[Intervention], s: Spec) -> None:
    bad = cls.validate_params(s.params)
    if bad:
        raise ShapingError(f"{s.concept}: " + "; ".join(bad))
    if s.action not in cls.actions:
        others = [m for m, c in INTERVENTIONS.items() if s.action in c.actions]
        raise ShapingError(f"{s.concept}: {cls.method} can only {' or '.join(cls.actions)}; use one of {others} "
                           f"to {s.action}")


def build_interventions(specs: Sequence[Spec], layer: int | None) -> list[Intervention]:
    """Instantiate the registered class per active spec; entries of a grouping method (ablate: CAFT
    projects out an orthonormal basis of all their directions at once) form one intervention."""
    out: list[Intervention] = []
    grouped: dict[str, Intervention] = {}
    seen: set[tuple[str, str]] = set()
    for s in specs:
        if s.action == Action.allow:
            continue
        cls = get_intervention(s.method, s.concept)
        if (s.concept, s.method) in seen:
            raise ShapingError(f"{s.concept}: method {s.method} is given twice; keep one entry")
        seen.add((s.concept, s.method))
        lam = signed_lambda(s.action, s.strength, s.concept)
        _check_spec(cls, s)
        members = {s.concept: list(s.members)} if s.members else {}
        if cls.groups and s.method in grouped:
            grouped[s.method].concepts.append(s.concept)
            grouped[s.method].members.update(members)
            continue
        iv = cls(concepts=[s.concept], lam=lam, params=dict(s.params), layer=layer, direction=s.direction,
                 members=members)
        if cls.groups:
            grouped[s.method] = iv
        iv.validate()
        out.append(iv)
    return out
