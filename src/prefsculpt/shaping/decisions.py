"""Reading a decisions file (METHOD §4) against the registered interventions.

The audit proposes the file (``prefsculpt.audit.decisions``: its format, the proposal, the hash);
this module validates what a person made of it, because only ``shaping`` knows the methods and
their parameters (``audit`` sits below ``shaping`` in the layers and imports no method).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prefsculpt.audit.decisions import (
    ACTIONS,
    BUILTIN_CONCEPTS,
    DECISION_FIELDS,
    FORMAT_VERSION,
    INFO_FIELDS,
    Action,
    Decision,
    Decisions,
    DecisionsError,
    decisions_hash,
    parse_direction,
    read_yaml,
)
from prefsculpt.shaping.params import entry_fields
from prefsculpt.shaping.registry import INTERVENTIONS, method_names, strengthless_methods


def param_fields() -> tuple[str, ...]:
    """Every parameter an entry may set, over all methods (in registration order)."""
    return tuple(dict.fromkeys(f for cls in INTERVENTIONS.values() for f in entry_fields(cls.Params)))


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_entry(i: int, e: Any, known: set[str] | None) -> tuple[list[str], Decision | None]:
    """Problems of entry ``i`` (1-based) and the parsed decision when it has none."""
    if not isinstance(e, Mapping):
        return [f"entry {i}: expected a mapping with concept/action/method/strength, got {e!r}"], None
    concept = e.get("concept")
    where = f"entry {i} ({concept})" if concept is not None else f"entry {i}"
    params_known = param_fields()
    errs: list[str] = []
    for key in e:
        if key not in DECISION_FIELDS and key not in INFO_FIELDS and key not in params_known:
            errs.append(f"{where}: unknown field {key!r}{_suggest(str(key), DECISION_FIELDS + params_known)}")
    for key in ("concept", "action", "method", "strength"):
        if key not in e or e[key] is None:
            errs.append(f"{where}: missing field {key!r}")
    if isinstance(concept, str) and known is not None and concept not in known:
        errs.append(
            f"{where}: unknown concept {concept!r}{_suggest(concept, known)}: it was not tested by the audit; "
            "use a concept from hypotheses.json or a built-in (" + ", ".join(BUILTIN_CONCEPTS) + ")"
        )
    elif concept is not None and not isinstance(concept, str):
        errs.append(f"{where}: concept must be a string such as 'latent:12', got {concept!r}")
    action, method = e.get("action"), e.get("method")
    if action is not None and action not in ACTIONS:
        errs.append(f"{where}: unknown action {action!r}{_suggest(str(action), ACTIONS)}; use one of {list(ACTIONS)}")
    methods = method_names()
    if method is not None and method not in methods:
        errs.append(f"{where}: unknown method {method!r}{_suggest(str(method), methods)}; use one of {list(methods)}")
    strength = e.get("strength")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            errs.append(f"{where}: strength must be a finite number >= 0, got {strength!r}")
        elif strength < 0:
            errs.append(f"{where}: negative strength {strength}; use strength >= 0 and action amplify to reverse")
    note = e.get("note", "")
    if note is not None and not isinstance(note, str):
        errs.append(f"{where}: note must be text, got {note!r}")
    params = {k: e[k] for k in params_known if e.get(k) is not None}
    if method in INTERVENTIONS:
        errs.extend(f"{where}: {p}" for p in INTERVENTIONS[method].validate_params(params))
    members, direction = e.get("members"), None
    try:
        direction = parse_direction(e.get("direction"))
    except ValueError as exc:
        errs.append(f"{where}: {exc}")
    if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
        errs.append(f"{where}: members must be a list of concept names such as ['latent:3', 'latent:7'], got {members!r}")
    if errs:
        return errs, None
    return [], Decision(concept, Action(action), method, float(strength), note or "", params, direction,
                        tuple(members or ()))


def load_decisions(path: str | Path | Mapping[str, Any], known_concepts: Iterable[str] | None) -> Decisions:
    """Read and validate a decisions file; one :class:`DecisionsError` lists every problem.

    ``known_concepts``: the concepts the audit tested (built-ins are always known); None skips
    that check.
    """
    obj, source = read_yaml(path)
    known = None if known_concepts is None else {*map(str, known_concepts), *BUILTIN_CONCEPTS}
    if not isinstance(obj, Mapping) or not isinstance(obj.get("concepts"), list):
        raise DecisionsError(
            f"{source}: expected a mapping with a 'concepts:' list of entries (as the audit writes it), "
            f"got {type(obj).__name__}"
        )
    errors: list[str] = []
    version = obj.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        errors.append(f"version {version!r} is not supported (this prefsculpt reads version {FORMAT_VERSION})")
    entries: list[Decision] = []
    seen: dict[str, int] = {}
    for i, e in enumerate(obj["concepts"], start=1):
        errs, dec = _check_entry(i, e, known)
        errors.extend(errs)
        if dec is not None:
            if dec.concept in seen:
                errors.append(f"entry {i} ({dec.concept}): duplicate of entry {seen[dec.concept]}; keep one")
            seen.setdefault(dec.concept, i)
            entries.append(dec)
    if errors:
        raise DecisionsError(
            f"{source} has {len(errors)} problem(s); fix each and re-run:\n" + "\n".join(f"  - {m}" for m in errors)
        )
    return Decisions(entries=entries, hash=decisions_hash(obj), source=source, strengthless=strengthless_methods())
