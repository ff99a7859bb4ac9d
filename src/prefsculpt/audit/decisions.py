"""The decisions file (METHOD §4): per concept, what training may learn of it.

The audit proposes ``decisions.yaml`` with every hypothesis listed and ``action: allow``; a person
edits it; training and the search read it with :func:`load_decisions`, which validates the whole
file and reports *every* bad entry at once. Its :func:`decisions_hash` is logged with each run
that used it.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from prefsculpt.core.errors import UserError

ACTIONS = ("allow", "suppress", "amplify")
#: How the concept's signal A_u is obtained or applied (METHOD §5).
METHODS = ("score", "steer", "inoculate", "filter", "ablate", "prevent")
#: Surface concepts the audit tests beside the latents without any SAE (``length`` = response tokens).
BUILTIN_CONCEPTS = ("length",)
#: Fields a person sets; ``note`` may be left out.
DECISION_FIELDS = ("concept", "action", "method", "strength", "note")
#: Optional per-entry method parameters (``shaping.ConceptSpec``): filter share ρ in (0, 1), steer
#: multiplier m, inoculate instruction C_u. Absent = the ``shaping`` defaults.
PARAM_FIELDS = ("share", "multiplier", "instruction")
#: Figures the audit writes next to each decision for the reader; ignored when loading.
INFO_FIELDS = ("rank", "label", "explanation", "kind", "direction", "effect", "mean_diff", "q", "support",
               "members")
FORMAT_VERSION = 1

HEADER = """\
# prefsculpt decisions: what training may learn of each concept (METHOD.md §4).
# Proposed by the audit with every hypothesis listed and action `allow`; edit, then pass this file to
# training / the search. Per entry, you set:
#   action:   allow (learn it as the data says) | suppress (learn less of it) | amplify (learn more)
#   method:   score     reward shaping with the concept's span score (z-scored)
#             steer     log-prob shift of the reference steered along the concept direction
#             inoculate log-prob shift when the prompt names the concept
#             filter    drop / down-weight pairs where the chosen side has much more of the concept
#             ablate    project the concept direction out of the policy's residual while training
#             prevent   add the concept direction to the policy's residual while training
#   strength: lambda >= 0 (the sign comes from the action: suppress = +lambda, amplify = -lambda;
#             ignored for allow)
#   note:     free text (why)
#   optional: share (filter: share of pairs dropped, 0-1), multiplier (steer), instruction (inoculate)
# The other fields (rank, label, direction, effect = paired d_z, mean_diff, q, support) are the
# audit's figures, for reading only. You may add any concept the audit tested (see hypotheses.json;
# built-ins: length) or delete entries: an unlisted concept is allowed.
"""


class DecisionsError(UserError):
    """A decisions file that cannot be used; the message lists every offending entry."""


@dataclass(frozen=True)
class Decision:
    concept: str
    action: str = "allow"
    method: str = "score"
    strength: float = 0.0
    note: str = ""
    #: Optional method parameters given in the entry (keys from PARAM_FIELDS).
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def lam(self) -> float:
        """Signed λ of METHOD §5: positive suppresses, negative amplifies, 0 for allow."""
        return {"allow": 0.0, "suppress": self.strength, "amplify": -self.strength}[self.action]


@dataclass
class Decisions:
    entries: list[Decision] = field(default_factory=list)
    #: sha256 of the canonical YAML (see :func:`decisions_hash`).
    hash: str = ""
    source: str = ""

    def active(self) -> list[Decision]:
        """Decisions that change training: not ``allow``, and strength > 0 (ablate needs none)."""
        return [d for d in self.entries if d.action != "allow" and (d.strength > 0 or d.method == "ablate")]

    def get(self, concept: str) -> Decision:
        for d in self.entries:
            if d.concept == concept:
                return d
        return Decision(concept)

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for d in self.entries:
            e = asdict(d)
            e.update(e.pop("params"))
            entries.append(e)
        return {"version": FORMAT_VERSION, "concepts": entries}


def _plain(v: Any) -> Any:
    """numpy scalars / NaN -> YAML-friendly Python values."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def propose_decisions(
    hypotheses: pd.DataFrame, top_k: int | None = None, audit_run_id: str | None = None
) -> dict[str, Any]:
    """Every hypothesis row (in the given order, at most ``top_k``) with action ``allow``.

    ``hypotheses`` needs a ``concept`` column; ``label, direction, d_z, mean_diff, q, support, rank,
    kind, explanation, members`` are copied when present.
    """
    if "concept" not in hypotheses.columns:
        raise ValueError("hypotheses need a 'concept' column")
    rows = hypotheses if top_k is None else hypotheses.head(int(top_k))
    source_of = {"effect": "d_z"}
    entries = []
    for rec in rows.to_dict("records"):
        e: dict[str, Any] = {"concept": str(rec["concept"])}
        for key in INFO_FIELDS:
            col = source_of.get(key, key)
            if col in rec and rec[col] is not None:
                val = _plain(rec[col])
                if key == "members" and val is not None and not isinstance(val, str):
                    val = [str(m) for m in val]
                if isinstance(val, float):
                    val = float(f"{val:.4g}")  # figures for reading; full precision is in hypotheses.json
                if val is not None:
                    e[key] = val
        e.update(action="allow", method="score", strength=0.0, note="")
        entries.append(e)
    out: dict[str, Any] = {"version": FORMAT_VERSION}
    if audit_run_id:
        out["audit_run_id"] = audit_run_id
    out["concepts"] = entries
    return out


def write_decisions(d: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``d`` as YAML under a header explaining the fields (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(dict(d), sort_keys=False, allow_unicode=True, width=1000, default_flow_style=False)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(HEADER + body, encoding="utf-8")
    tmp.replace(path)
    return path


def _read(path_or_dict: str | Path | Mapping[str, Any]) -> tuple[Any, str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "<dict>"
    path = Path(path_or_dict)
    if not path.is_file():
        raise DecisionsError(f"decisions file {path} does not exist; the audit proposes one (audit/decisions.yaml)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")), str(path)
    except yaml.YAMLError as exc:
        raise DecisionsError(f"{path} is not valid YAML: {exc}") from exc


def decisions_hash(path_or_dict: str | Path | Mapping[str, Any]) -> str:
    """sha256 of the canonical YAML of the content: comments, key order and layout do not count."""
    obj, _ = _read(path_or_dict)
    canon = yaml.safe_dump(obj, sort_keys=True, allow_unicode=True, default_flow_style=False, width=1000)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_entry(i: int, e: Any, known: set[str] | None) -> tuple[list[str], Decision | None]:
    """Problems of entry ``i`` (1-based) and the parsed decision when it has none."""
    if not isinstance(e, Mapping):
        return [f"entry {i}: expected a mapping with concept/action/method/strength, got {e!r}"], None
    concept = e.get("concept")
    where = f"entry {i} ({concept})" if concept is not None else f"entry {i}"
    errs: list[str] = []
    for key in e:
        if key not in DECISION_FIELDS and key not in INFO_FIELDS and key not in PARAM_FIELDS:
            errs.append(f"{where}: unknown field {key!r}{_suggest(str(key), DECISION_FIELDS + PARAM_FIELDS)}")
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
    if method is not None and method not in METHODS:
        errs.append(f"{where}: unknown method {method!r}{_suggest(str(method), METHODS)}; use one of {list(METHODS)}")
    strength = e.get("strength")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            errs.append(f"{where}: strength must be a finite number >= 0, got {strength!r}")
        elif strength < 0:
            errs.append(f"{where}: negative strength {strength}; use strength >= 0 and action amplify to reverse")
    note = e.get("note", "")
    if note is not None and not isinstance(note, str):
        errs.append(f"{where}: note must be text, got {note!r}")
    params = {k: e[k] for k in PARAM_FIELDS if e.get(k) is not None}
    for k in ("share", "multiplier"):
        v = params.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            errs.append(f"{where}: {k} must be a number, got {v!r}")
    if isinstance(params.get("share"), (int, float)) and not 0 < params["share"] < 1:
        errs.append(f"{where}: share {params['share']} must lie in (0, 1) (the share of pairs filtered)")
    if "instruction" in params and not isinstance(params["instruction"], str):
        errs.append(f"{where}: instruction must be text, got {params['instruction']!r}")
    if errs:
        return errs, None
    return [], Decision(concept, action, method, float(strength), note or "", params)


def load_decisions(path: str | Path | Mapping[str, Any], known_concepts: Iterable[str] | None) -> Decisions:
    """Read and validate a decisions file; one :class:`DecisionsError` lists every problem.

    ``known_concepts``: the concepts the audit tested (built-ins are always known); None skips
    that check.
    """
    obj, source = _read(path)
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
    return Decisions(entries=entries, hash=decisions_hash(obj), source=source)
