"""Typed method parameters: each intervention declares a frozen dataclass whose fields carry their
doc, where their default may come from in ``shaping`` config, the interval they must lie in, and the
range the search draws them from. Validation, the search space and the README table read these.

A parameter field is declared with :func:`param`::

    share: float = param(0.1, "ρ: share of pairs dropped", config="filter_share",
                         bounds=(0.0, 1.0), search=SearchRange("share", 0.05, 0.3))
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Metadata keys of a parameter field (set by :func:`param`).
DOC, CONFIG, BOUNDS, SEARCH, PER_ENTRY = "doc", "config", "bounds", "search", "per_entry"


@dataclass(frozen=True)
class SearchRange:
    """How the search draws one parameter: uniformly from [low, high], on a log scale when ``log``.

    ``key`` is the prefix of the Optuna / MLflow parameter name (``lambda/<concept>``)."""

    key: str
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"search range {self.key}: need low < high (and low > 0 on a log scale), "
                             f"got [{self.low}, {self.high}]")

    def at(self, fraction: float) -> float:
        """The point ``fraction`` of the way up the range, on its own scale (log or linear)."""
        if self.log:
            return math.exp((1 - fraction) * math.log(self.low) + fraction * math.log(self.high))
        return self.low + fraction * (self.high - self.low)

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def param(default: Any, doc: str, *, config: str | None = None, bounds: tuple[float, float] | None = None,
          search: SearchRange | None = None, per_entry: bool = True) -> Any:
    """A parameter field. ``config``: the ``shaping`` key that gives the default when an entry leaves
    it out (a mapping there is looked up by concept); ``bounds``: the open interval a number must lie
    in; ``search``: the range the search draws it from; ``per_entry``: a decisions entry or
    ``shaping.concepts`` item may set it (else only ``shaping.<config>`` does)."""
    meta = {DOC: doc, CONFIG: config, BOUNDS: bounds, SEARCH: search, PER_ENTRY: per_entry}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class NoParams:
    """A method without parameters besides its strength."""


def fields(params_cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(params_cls)


def entry_fields(params_cls: type) -> tuple[str, ...]:
    """Names a decisions entry / ``shaping.concepts`` item may set for this method."""
    return tuple(f.name for f in fields(params_cls) if f.metadata.get(PER_ENTRY, True))


def _kind(params_cls: type, name: str) -> Any:
    """The field's type with ``None`` taken out: float, str or a Literal."""
    tp = typing.get_type_hints(params_cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def choices(params_cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field (empty for free-valued ones)."""
    tp = _kind(params_cls, name)
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


def check_declaration(method: str, params_cls: type) -> None:
    """Refuse a Params class validation could not check: each field made with :func:`param`, typed
    float, str or a Literal of choices (optionally ``| None``)."""
    for f in fields(params_cls):
        kind = _kind(params_cls, f.name)
        if DOC not in f.metadata:
            raise TypeError(f"intervention {method!r}: parameter {f.name!r} must be declared with param(...)")
        if kind not in (float, str) and not choices(params_cls, f.name):
            raise TypeError(f"intervention {method!r}: parameter {f.name!r} has type {kind!r}; use float, str or a "
                            "Literal of choices")


def problems(method: str, params_cls: type, values: Mapping[str, Any]) -> list[str]:
    """Every problem with ``values`` as parameters of ``method``, each naming the parameter (empty = fine).
    ``None`` stands for "not given" and is never a problem here."""
    out: list[str] = []
    by_name = {f.name: f for f in fields(params_cls)}
    for name, v in values.items():
        f = by_name.get(name)
        if f is None:
            have = ", ".join(by_name) or "none"
            out.append(f"{name!r} is not a parameter of {method} (its parameters: {have})")
            continue
        if v is None:
            continue
        opts, kind = choices(params_cls, name), _kind(params_cls, name)
        if opts:
            if v not in opts:
                out.append(f"{method} {name} must be one of {list(opts)}, got {v!r}")
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                out.append(f"{name} must be a number, got {v!r}")
            elif f.metadata.get(BOUNDS) is not None:
                lo, hi = f.metadata[BOUNDS]
                if not lo < v < hi:
                    out.append(f"{name} {v} must lie in ({lo:g}, {hi:g}) ({method}: {f.metadata[DOC]})")
        elif kind is str and not isinstance(v, str):
            out.append(f"{name} must be text, got {v!r}")
    return out


def coerce(params_cls: type, values: Mapping[str, Any]) -> Any:
    """The typed parameters from checked ``values`` (ints given for floats become floats)."""
    out = {}
    for f in fields(params_cls):
        v = values.get(f.name, f.default)
        out[f.name] = float(v) if v is not None and _kind(params_cls, f.name) is float else v
    return params_cls(**out)
