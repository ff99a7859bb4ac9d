"""The search space: which of the audit's top-K hypotheses to shape, how, and how strongly.

A candidate concept is one of three things, decided by ``decisions.yaml`` (METHOD §4):
- *pinned off*: an ``allow`` entry a person made (see ``search.allow_pins``): never shaped, not a
  parameter at all;
- *fixed*: a ``suppress``/``amplify`` entry: always shaped with that action and method; only λ (or
  the filter share) is searched. Such an entry joins the space even when it is outside the top-K;
- *free*: whether to shape it (``shape/<c>``), the action and method when more than one is allowed
  (``action/<c>``, ``method/<c>``), and the method's searched parameters, as its registered class
  declares them (``Intervention.search_ranges``): λ (``lambda/<c>``, log-uniform) or the filter share
  (``share/<c>``); ``search.lambda_min/max`` and ``search.share_min/max`` override the ranges.
The space is conditional (method and λ exist only when the concept is shaped), so the sampler is
TPE with ``multivariate=True, group=True`` (STACK §5).

The plain-DPO baseline is a trial with no concept shaped at all (fixed ones included). It is
enqueued once, by the worker that creates the study (:func:`enqueue_plan`), with the user attr
``prefsculpt.baseline``; the objective builds no concepts for it. Every other trial shapes at least
one concept: when the sampler has turned every free concept off and nothing is fixed, the last free
concept is shaped anyway (a second plain DPO would only repeat the baseline).

With ``search.informed_start`` the creator also enqueues, right after the baseline, the audit's own
proposal (:func:`start_params`): every free candidate suppressed with ``score`` (else the first
allowed method) at a cautious strength, a quarter of the way up the λ range on its log scale
(λ_min^¾·λ_max^¼ = 0.32 for [0.1, 10]; a quarter of the way up the share range for filter). A handful
of trials is mostly TPE's random start-up phase; this puts one well-placed point in it. Why low:
explaining away saturates (ΔA is z-scored, so λ·ΔA = 1 already halves a one-SD pair's gradient and
nearly doubles that of a pair against the concept). On the planted default (400 pairs, top 6 layers)
the top 4 at λ = 1 over-corrected sycophancy to −0.61 against the base and lost on-target accuracy
(0.50 vs plain DPO's 0.57); at 0.32 they gave −0.10 and 0.58.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from prefsculpt.audit.decisions import PROPOSED_METHOD, Action
from prefsculpt.core.errors import UserError
from prefsculpt.core.names import Attr
from prefsculpt.shaping.params import SEARCH, SearchRange, entry_fields, fields
from prefsculpt.shaping.registry import INTERVENTIONS, Source, method_names

log = logging.getLogger(__name__)

BASELINE_ATTR = Attr.BASELINE
#: The sources a concept kind can have (a method applies when it has the one the method needs);
#: built-ins such as ``length`` are only scores, latent clusters have neither scores nor a direction yet.
KIND_SOURCES: dict[str, frozenset[Source]] = {
    "latent": frozenset(Source),
    "named": frozenset(Source),
    "builtin": frozenset({Source.scores}),
    "cluster": frozenset(),
}
#: The actions the search may pick (``allow`` is not shaping); the informed start takes the first.
SEARCH_ACTIONS = (Action.suppress.value, Action.amplify.value)


def kind_methods(kind: str) -> tuple[str, ...]:
    """The registered methods training can apply to a concept of this kind."""
    have = KIND_SOURCES.get(kind, frozenset())
    return tuple(m for m, cls in INTERVENTIONS.items() if cls.needs in have)


class SearchSpaceError(UserError):
    """The audit/decisions leave nothing valid to search, or the search config is inconsistent."""


@dataclass(frozen=True)
class Candidate:
    concept: str
    #: Audit rank (None for a decision outside the top-K).
    rank: int | None
    #: Methods the search may pick (one element when fixed by a decision).
    methods: tuple[str, ...]
    actions: tuple[str, ...]
    #: True: a decision fixes it as shaped (no ``shape/`` parameter).
    fixed: bool = False
    #: The decision's own strength / params, kept for the record.
    decision: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


_UNSAFE = re.compile(r"[^\w.\- :]")


def param_key(kind: str, concept: str) -> str:
    """``shape/latent:12``: a valid Optuna and MLflow param name (MLflow allows ``[/\\w.\\- :]``)."""
    return kind + "/" + _UNSAFE.sub("_", concept)


def _pinned_allow(entry: Any, allow_pins: str) -> bool:
    if entry.action != "allow":
        return False
    if allow_pins == "all":
        return True
    # "edited": the audit proposes every hypothesis as a bare allow (strength 0, no note); only an
    # entry a person touched says "learn it as the data says, do not search it".
    return bool(entry.note.strip()) or entry.strength > 0


def build_candidates(hypotheses: pd.DataFrame, decisions: Any | None, top_k: int, methods: Sequence[str],
                     actions: Sequence[str], allow_pins: str = "edited",
                     feasible: Callable[[str, str], bool] | None = None) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Candidates (best rank first, then fixed decisions outside the top-K) and the skipped concepts
    with the reason. ``hypotheses``: the audit's table (``concept``, ``rank``, ``kind``); ``decisions``:
    a :class:`prefsculpt.audit.decisions.Decisions` or None; ``feasible(concept, method)`` says whether
    training has the source a method needs for that concept (default: by kind only)."""
    if allow_pins not in ("edited", "all"):
        raise SearchSpaceError(f"search.allow_pins={allow_pins!r}: use 'edited' or 'all'")
    bad = [a for a in actions if a not in SEARCH_ACTIONS]
    if bad or not actions:
        raise SearchSpaceError(f"search.actions={list(actions)}: use a non-empty subset of {list(SEARCH_ACTIONS)}")
    bad = [m for m in methods if m not in INTERVENTIONS]
    if bad or not methods:
        raise SearchSpaceError(f"search.methods: unknown {bad} (or empty); choose from {list(method_names())}")
    for col in ("concept", "rank"):
        if col not in hypotheses.columns:
            raise SearchSpaceError(f"the audit's hypotheses table has no {col!r} column (columns: {list(hypotheses.columns)})")
    kind_of = dict(zip(hypotheses["concept"], hypotheses.get("kind", pd.Series(["latent"] * len(hypotheses))),
                       strict=True))
    ranked = hypotheses[hypotheses["rank"].notna()].sort_values("rank").head(int(top_k))
    feasible = feasible or (lambda c, m: True)
    by_concept = {d.concept: d for d in decisions.entries} if decisions is not None else {}
    out: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for rec in ranked.to_dict("records"):
        c, kind = str(rec["concept"]), str(kind_of.get(rec["concept"], "latent"))
        d = by_concept.get(c)
        if d is not None and d.action != "allow":
            continue  # fixed decisions are added below, in file order
        if d is not None and _pinned_allow(d, allow_pins):
            skipped.append({"concept": c, "reason": f"decisions: allow ({d.note or 'strength ' + str(d.strength)})"})
            continue
        ok = tuple(m for m in methods if m in kind_methods(kind) and feasible(c, m))
        if not ok:
            why = ("training cannot shape latent clusters yet" if kind == "cluster"
                   else f"none of the methods {list(methods)} has a source for it")
            skipped.append({"concept": c, "reason": why})
            continue
        out.append(Candidate(c, int(rec["rank"]), ok, tuple(actions)))
    rank_of = dict(zip(hypotheses["concept"], hypotheses["rank"], strict=True))
    for d in by_concept.values():
        if d.action in SEARCH_ACTIONS:
            r = rank_of.get(d.concept)
            out.append(Candidate(d.concept, None if r is None or pd.isna(r) else int(r), (d.method,), (str(d.action),),
                                 fixed=True, decision={"strength": d.strength, **dict(d.params)}))
    for s in skipped:
        log.info("search: %s not searched: %s", s["concept"], s["reason"])
    return out, skipped


@dataclass(frozen=True)
class SpaceBounds:
    """The search config's overrides of the registry's ranges (``search.lambda_min/max`` for every
    method's strength, ``search.share_min/max`` for filter's share), and the fixed ``shaping``
    parameters that decide what a method searches."""

    lambda_min: float
    lambda_max: float
    share_min: float
    share_max: float
    #: ``shaping.filter_mode``: drop searches the share ρ, weight searches κ as λ.
    filter_mode: str = "drop"

    def __post_init__(self) -> None:
        if not 0 < self.lambda_min < self.lambda_max:
            raise SearchSpaceError(f"search.lambda_min/max = {self.lambda_min}/{self.lambda_max}: need 0 < min < max "
                                   "(λ is drawn on a log scale)")
        if not 0 < self.share_min < self.share_max < 1:
            raise SearchSpaceError(f"search.share_min/max = {self.share_min}/{self.share_max}: need 0 < min < max < 1")

    def ranges(self, method: str) -> dict[str, SearchRange]:
        """Parameter name -> the range drawn for ``method``: its class's, with the config's bounds."""
        bounds = {"strength": (self.lambda_min, self.lambda_max), "share": (self.share_min, self.share_max)}
        out = {}
        for name, r in INTERVENTIONS[method].search_ranges({"mode": self.filter_mode}).items():
            lo, hi = bounds.get(name, (r.low, r.high))
            out[name] = SearchRange(r.key, lo, hi, r.log)
        return out


def _kept_params(method: str, decision: dict[str, Any]) -> dict[str, Any]:
    """A fixed decision's own parameters that the search does not draw (steer's multiplier, inoculate's
    instruction), carried into the trial's spec."""
    params = INTERVENTIONS[method].Params
    drawn = {f.name for f in fields(params) if f.metadata.get(SEARCH)}
    return {k: decision[k] for k in entry_fields(params) if k not in drawn and decision.get(k) is not None}


def suggest_concepts(trial: Any, candidates: Sequence[Candidate], b: SpaceBounds) -> list[dict[str, Any]]:
    """Sample one trial's shaping: a list of ``shaping.ConceptSpec`` dicts (empty = plain DPO)."""
    if trial.user_attrs.get(BASELINE_ATTR):
        for c in candidates:  # the enqueued False values: recorded as params, shown in the UI
            if not c.fixed:
                trial.suggest_categorical(param_key("shape", c.concept), [False, True])
        return []
    specs = []
    free = [c for c in candidates if not c.fixed]
    for c in candidates:
        if not c.fixed:
            # Last free concept, nothing shaped so far and nothing fixed: shape it (see module doc).
            forced = c is free[-1] and not specs and len(free) == len(candidates)
            if not forced and not trial.suggest_categorical(param_key("shape", c.concept), [False, True]):
                continue
        action = c.actions[0] if len(c.actions) == 1 else trial.suggest_categorical(param_key("action", c.concept),
                                                                                     list(c.actions))
        method = c.methods[0] if len(c.methods) == 1 else trial.suggest_categorical(param_key("method", c.concept),
                                                                                     list(c.methods))
        # strength 1.0 where it is not drawn (filter in drop mode; ablate has none)
        spec: dict[str, Any] = {"concept": c.concept, "method": method, "action": action, "strength": 1.0}
        for name, r in b.ranges(method).items():
            spec[name] = trial.suggest_float(param_key(r.key, c.concept), r.low, r.high, log=r.log)
        spec.update(_kept_params(method, c.decision))
        specs.append(spec)
    return specs


def baseline_params(candidates: Sequence[Candidate]) -> dict[str, bool]:
    """Fixed params of the plain-DPO baseline (every free concept off), shown in the UI like any trial."""
    return {param_key("shape", c.concept): False for c in candidates if not c.fixed}


def start_params(candidates: Sequence[Candidate], b: SpaceBounds) -> dict[str, Any]:
    """The informed start trial's fixed params (module doc): every free candidate shaped."""
    out: dict[str, Any] = {}
    for c in candidates:
        method = PROPOSED_METHOD if PROPOSED_METHOD in c.methods else c.methods[0]
        if not c.fixed:
            out[param_key("shape", c.concept)] = True
            if len(c.actions) > 1:
                out[param_key("action", c.concept)] = SEARCH_ACTIONS[0] if SEARCH_ACTIONS[0] in c.actions else c.actions[0]
            if len(c.methods) > 1:
                out[param_key("method", c.concept)] = method
        for r in b.ranges(method).values():  # a quarter of the way up, on the range's own scale
            out[param_key(r.key, c.concept)] = r.at(0.25)
    return out


def describe(specs: Sequence[dict[str, Any]]) -> str:
    """One line for the run list: ``latent:12 score suppress λ=0.52; named:emoji filter ρ=0.10``."""
    if not specs:
        return "plain DPO"
    parts = []
    for s in specs:
        no_strength = INTERVENTIONS[s["method"]].strength_doc is None
        extra = f"ρ={s['share']:.3g}" if "share" in s else "" if no_strength else f"λ={s['strength']:.3g}"
        parts.append(" ".join(x for x in (s["concept"], s["method"], s["action"], extra) if x))
    return "; ".join(parts)


START_ATTR = Attr.INFORMED_START


def enqueue_plan(study: Any, candidates: Sequence[Candidate], n_slots: int, with_baseline: bool,
                 start: dict[str, Any] | None = None) -> int:
    """Enqueue the study's trials as WAITING slots: the baseline first (when asked), the informed
    start (when given), then empty slots the sampler fills when a worker pops them. Workers only ever
    pop slots (see ``study.claim``), so several workers together run exactly the enqueued number.
    Returns the number enqueued."""
    n = 0
    if with_baseline and n_slots > 0:
        study.enqueue_trial(baseline_params(candidates), user_attrs={BASELINE_ATTR: True})
        n += 1
    if start and n < n_slots:
        study.enqueue_trial(start, user_attrs={START_ATTR: True})
        n += 1
    for _ in range(n_slots - n):
        study.enqueue_trial({})
        n += 1
    return n
