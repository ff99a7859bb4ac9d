"""The decisions file (METHOD §4): per concept, what training may learn of it.

The audit proposes ``decisions.yaml`` with every hypothesis listed and ``action: allow``; a person
edits it; training and the search read it with ``prefsculpt.shaping.decisions.load_decisions``,
which validates the whole file against the registered interventions (this module sits below
``shaping`` and knows no method) and reports *every* bad entry at once. Its :func:`decisions_hash`
is logged with each run that used it.
"""

from __future__ import annotations

import enum
import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from prefsculpt.core.errors import UserError


class Action(enum.StrEnum):
    """What training may learn of a concept (METHOD §4)."""

    #: learn it as the data says (not shaped).
    allow = "allow"
    #: learn less of it (λ = +strength).
    suppress = "suppress"
    #: learn more of it (λ = −strength).
    amplify = "amplify"


ACTIONS = tuple(a.value for a in Action)
#: The method a proposal writes (a person changes it); every method is a registered intervention.
PROPOSED_METHOD = "score"
#: Surface concepts the audit tests beside the latents without any SAE (``length`` = response tokens).
BUILTIN_CONCEPTS = ("length",)
#: Fields a person sets; ``note`` may be left out.
DECISION_FIELDS = ("concept", "action", "method", "strength", "note")
#: Figures the audit writes next to each decision for the reader; ignored when loading.
INFO_FIELDS = ("rank", "label", "explanation", "kind", "direction", "effect", "mean_diff", "q", "q_raw", "support",
               "members", "cluster_type", "cluster_key")
FORMAT_VERSION = 1

HEADER = """\
# prefsculpt decisions: what training may learn of each concept (METHOD.md §4).
# Proposed by the audit with every hypothesis listed and action `allow`; edit, then pass this file to
# training / the search. Per entry, you set:
#   action:   allow (learn it as the data says) | suppress (learn less of it) | amplify (learn more)
#   method:   how training shapes it (README.md, "Interventions", lists every method and its parameters)
{methods}\
#   strength: lambda >= 0 (the sign comes from the action: suppress = +lambda, amplify = -lambda;
#             ignored for allow)
#   note:     free text (why)
#   optional: the method's own parameters, by name (the same table lists them; absent = the defaults)
# The audit's hypothesis, which training reads: direction (+1 = the preferred side has more of the
# concept, -1 = less; suppress removes the learning signal along it, amplify adds to it, for every
# method) and members (a cluster is shaped through its members' summed scores and directions).
# The other fields (rank, label, effect = paired d_z, mean_diff, q = length-controlled q-value,
# q_raw = raw q-value, support; for a cluster its cluster_type (near_duplicate or cofiring) and
# cluster_key, an id from its members) are the audit's figures, for reading only. You may add any
# concept the audit tested (see hypotheses.json; built-ins: length; give it a direction) or delete
# entries: an unlisted concept is allowed.
"""


class DecisionsError(UserError):
    """A decisions file that cannot be used; the message lists every offending entry."""


@dataclass(frozen=True)
class Decision:
    concept: str
    action: Action = Action.allow
    method: str = PROPOSED_METHOD
    strength: float = 0.0
    note: str = ""
    #: Optional method parameters given in the entry (the method's ``Params`` fields).
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: The audit's direction of the hypothesis (its ``direction`` field): +1 = the preferred side has
    #: more of the concept, −1 = less; None when the entry has none (a concept a person added).
    #: Shaping orients suppress/amplify by it (``shaping.orient=audit``).
    direction: int | None = None
    #: The member concepts a cluster hypothesis stands for (its ``members`` field); training shapes it
    #: through their summed scores and their directions. Empty for a single concept.
    members: tuple[str, ...] = ()

    @property
    def lam(self) -> float:
        """Signed λ of METHOD §5: positive suppresses, negative amplifies, 0 for allow."""
        return {Action.allow: 0.0, Action.suppress: self.strength, Action.amplify: -self.strength}[self.action]


@dataclass
class Decisions:
    entries: list[Decision] = field(default_factory=list)
    #: sha256 of the canonical YAML (see :func:`decisions_hash`).
    hash: str = ""
    source: str = ""
    #: Methods that act without a strength (ablate), as the loader read them from the registry.
    strengthless: frozenset[str] = frozenset()

    def active(self) -> list[Decision]:
        """Decisions that change training: not ``allow``, and strength > 0 (or a strengthless method)."""
        return [d for d in self.entries
                if d.action != Action.allow and (d.strength > 0 or d.method in self.strengthless)]

    def get(self, concept: str) -> Decision:
        for d in self.entries:
            if d.concept == concept:
                return d
        return Decision(concept)

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for d in self.entries:
            e = asdict(d)
            e["action"] = str(e["action"])  # plain text for YAML
            e.update(e.pop("params"))
            e["members"] = list(e["members"]) or None
            e = {k: v for k, v in e.items() if v is not None or k not in ("direction", "members")}
            entries.append(e)
        return {"version": FORMAT_VERSION, "concepts": entries}


#: Words a decisions file may give for a direction besides the audit's +1 / −1.
DIRECTION_WORDS = {"chosen_more": 1, "more": 1, "chosen_less": -1, "less": -1}


def parse_direction(value: Any) -> int | None:
    """A hypothesis' direction as +1 (the preferred side has more of the concept) / −1 (less); None for
    none given or 0 (no direction). The audit writes the sign of the effect (a number); ValueError for
    anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in DIRECTION_WORDS:
            return DIRECTION_WORDS[value.strip().lower()]
        raise ValueError(f"direction must be 1 (the preferred side has more of it) or -1 (less), got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"direction must be 1 (the preferred side has more of it) or -1 (less), got {value!r}")
    return None if value == 0 else (1 if value > 0 else -1)


def plain_value(v: Any) -> Any:
    """numpy scalars / NaN -> YAML-friendly Python values."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def propose_decisions(
    hypotheses: pd.DataFrame, top_k: int | None = None, audit_run_id: str | None = None,
    withheld: str | None = None,
) -> dict[str, Any]:
    """Every hypothesis row (in the given order, at most ``top_k``) with action ``allow``.

    ``hypotheses`` needs a ``concept`` column; ``label, direction, d_z, mean_diff, q, q_raw, support,
    rank, kind, explanation, members, cluster_type, cluster_key`` are copied when present. ``withheld``: a reason not to propose
    anything (the audit's calibration failed): the file then has no entries and says why under
    ``withheld`` (a person may still add entries by hand).
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
                val = plain_value(rec[col])
                if key == "members" and val is not None and not isinstance(val, str):
                    val = [str(m) for m in val]
                if isinstance(val, float):
                    val = float(f"{val:.4g}")  # figures for reading; full precision is in hypotheses.json
                if val is not None:
                    e[key] = val
        e.update(action=str(Action.allow), method=PROPOSED_METHOD, strength=0.0, note="")
        entries.append(e)
    out: dict[str, Any] = {"version": FORMAT_VERSION}
    if audit_run_id:
        out["audit_run_id"] = audit_run_id
    if withheld:
        out["withheld"] = withheld
        entries = []
    out["concepts"] = entries
    return out


def write_decisions(d: Mapping[str, Any], path: str | Path, methods_help: str = "") -> Path:
    """Write ``d`` as YAML under a header explaining the fields (temp file, then rename).
    ``methods_help``: comment lines describing each method (``shaping.table.decisions_help()``),
    placed under the ``method:`` line; this module knows no method itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(dict(d), sort_keys=False, allow_unicode=True, width=1000, default_flow_style=False)
    head = HEADER.format(methods=methods_help)
    if d.get("withheld"):
        head += ("# NO DECISIONS PROPOSED: " + " ".join(str(d["withheld"]).split()) + "\n"
                 "# (see `withheld` below; entries added by hand are read as usual)\n")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(head + body, encoding="utf-8")
    tmp.replace(path)
    return path


def read_yaml(path_or_dict: str | Path | Mapping[str, Any]) -> tuple[Any, str]:
    """The parsed content and where it came from; a missing or broken file is a DecisionsError."""
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
    obj, _ = read_yaml(path_or_dict)
    canon = yaml.safe_dump(obj, sort_keys=True, allow_unicode=True, default_flow_style=False, width=1000)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
