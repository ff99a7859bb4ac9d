"""The search space: which of the audit's top-K hypotheses to shape, how, and how strongly.

A candidate concept is one of three things, decided by ``decisions.yaml`` (METHOD §4):
- *pinned off*: an ``allow`` entry a person made (see ``search.allow_pins``): never shaped, not a
  parameter at all;
- *fixed*: a ``suppress``/``amplify`` entry: always shaped with that action and method; only λ (or
  the filter share) is searched. Such an entry joins the space even when it is outside the top-K;
- *free*: whether to shape it (``shape/<c>``), the method when more than one is allowed
  (``method/<c>``), then the action when the method can take more than one (``action/<c>``; ablate
  only suppresses), and the method's searched parameters, as its registered class
  declares them (``Intervention.search_ranges``): λ (``lambda/<c>``, log-uniform) or the filter share
  (``share/<c>``); ``search.lambda_min/max`` and ``search.share_min/max`` override the ranges.
Each trial's spec carries the hypothesis' audit direction (training orients suppress/amplify by it)
and, for a cluster, its members (shaped through their summed scores and directions).
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

from prefsculpt.audit.decisions import PROPOSED_METHOD, Action, parse_direction
from prefsculpt.core.errors import UserError
from prefsculpt.core.names import Attr
from prefsculpt.shaping.params import SEARCH, SearchRange, entry_fields, fields
from prefsculpt.shaping.registry import INTERVENTIONS, Source, method_names

log = logging.getLogger(__name__)

BASELINE_ATTR = Attr.BASELINE
#: The sources a concept kind can have (a method applies when it has the one the method needs);
#: built-ins such as ``length`` are only scores; a cluster has its members' (summed scores, summed
#: directions), so it is shaped as one concept.
KIND_SOURCES: dict[str, frozenset[Source]] = {
    "latent": frozenset(Source),
    "named": frozenset(Source),
    "builtin": frozenset({Source.scores}),
    "cluster": frozenset(Source),
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
    #: The audit's direction of the hypothesis (+1: the preferred side has more of it, −1 less): every
    #: method orients suppress/amplify by it (``shaping.orient=audit``).
    direction: int | None = None
    #: A cluster's member concepts: training shapes it through their summed scores and directions.
    members: tuple[str, ...] = ()


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


def _members(value: Any) -> tuple[str, ...]:
    """A ``members`` cell of the hypotheses table (None, a list, or parquet's array) as a tuple."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ()
    return tuple(str(m) for m in value)


def members_of(hypotheses: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Concept -> its members, for the hypotheses that list any (clusters)."""
    if "members" not in hypotheses.columns:
        return {}
    pairs = zip(hypotheses["concept"].astype(str), map(_members, hypotheses["members"]), strict=True)
    return {c: m for c, m in pairs if m}


def _direction(value: Any) -> int | None:
    """A ``direction`` cell (the sign of the effect; NaN or 0 = none) as +1 / −1 / None."""
    return None if value is None or pd.isna(value) else parse_direction(float(value))


def build_candidates(hypotheses: pd.DataFrame, decisions: Any | None, top_k: int, methods: Sequence[str],
                     actions: Sequence[str], allow_pins: str = "edited",
                     feasible: Callable[[str, str], bool] | None = None) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Candidates (best rank first, then fixed decisions) and the skipped concepts with the reason.

    ``hypotheses``: the audit's table (``concept``, ``rank``, ``kind``, ``direction``, ``members``),
    ranked after clusters are merged (a latent inside a significant cluster has no rank of its own:
    it keeps its place through its cluster, which is a candidate like any concept). The free
    candidates are the ``top_k`` best-ranked hypotheses the search can shape: a pinned, fixed or
    unshapeable hypothesis takes no place, the next one does. ``decisions``: a
    :class:`prefsculpt.audit.decisions.Decisions` or None; ``feasible(concept, method)`` says whether
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
    rows = {str(r["concept"]): r for r in hypotheses.to_dict("records")}
    ranked = hypotheses[hypotheses["rank"].notna()].sort_values("rank")
    feasible = feasible or (lambda c, m: True)
    by_concept = {d.concept: d for d in decisions.entries} if decisions is not None else {}
    # only methods that can take one of the searched actions (ablate cannot amplify)
    methods = [m for m in methods if set(INTERVENTIONS[m].actions) & set(actions)]
    out: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for rec in ranked.to_dict("records"):
        if len(out) >= int(top_k):
            break
        c, kind = str(rec["concept"]), str(rec.get("kind") or "latent")
        d = by_concept.get(c)
        if d is not None and d.action != "allow":
            continue  # fixed decisions are added below, in file order
        if d is not None and _pinned_allow(d, allow_pins):
            skipped.append({"concept": c, "reason": f"decisions: allow ({d.note or 'strength ' + str(d.strength)})"})
            continue
        members = _members(rec.get("members"))
        if kind == "cluster" and not members:
            skipped.append({"concept": c, "reason": "a cluster without its members listed (hypotheses 'members')"})
            continue
        # any hypothesis that lists members (a latent cluster, or one the audit forms otherwise) is shaped
        # through them, whatever its kind is called
        ok = tuple(m for m in methods if m in kind_methods("cluster" if members else kind) and feasible(c, m))
        if not ok:
            skipped.append({"concept": c, "reason": f"none of the methods {list(methods)} has a source for it"})
            continue
        out.append(Candidate(c, int(rec["rank"]), ok, tuple(actions), direction=_direction(rec.get("direction")),
                             members=members))
    for d in by_concept.values():
        if d.action in SEARCH_ACTIONS:
            row = rows.get(d.concept, {})
            r = row.get("rank")
            direction = d.direction if d.direction is not None else _direction(row.get("direction"))
            out.append(Candidate(d.concept, None if r is None or pd.isna(r) else int(r), (d.method,), (str(d.action),),
                                 fixed=True, decision={"strength": d.strength, **dict(d.params)}, direction=direction,
                                 members=tuple(d.members) or _members(row.get("members"))))
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
        method = c.methods[0] if len(c.methods) == 1 else trial.suggest_categorical(param_key("method", c.concept),
                                                                                     list(c.methods))
        # the actions this method can take (ablate only suppresses); drawn from all of them when it has a choice
        can = [a for a in c.actions if a in INTERVENTIONS[method].actions]
        action = can[0] if len(can) == 1 else trial.suggest_categorical(param_key("action", c.concept),
                                                                        list(c.actions))
        # strength 1.0 where it is not drawn (filter in drop mode; ablate has none)
        spec: dict[str, Any] = {"concept": c.concept, "method": method, "action": action, "strength": 1.0}
        for name, r in b.ranges(method).items():
            spec[name] = trial.suggest_float(param_key(r.key, c.concept), r.low, r.high, log=r.log)
        spec.update(_kept_params(method, c.decision))
        if c.direction is not None:
            spec["direction"] = c.direction
        if c.members:
            spec["members"] = list(c.members)
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
