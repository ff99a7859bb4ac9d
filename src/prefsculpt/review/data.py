"""What the review page shows and what it saves, as plain data (no MLflow here).

Inputs, all from an audit run's artifacts: the table of every concept tested
(``audit/hypotheses.parquet``), the detail records of the shown hypotheses (``audit/hypotheses.json``:
label detail, where it concentrates, example views), and the decisions to start from (the audit's
proposal ``audit/decisions.yaml`` or a saved ``decisions/v<N>.yaml``). Labels of concepts the audit
did not label may be built from the sae run's top contexts (:func:`prefsculpt.audit.labels.build_labels`).

The page gets the table as ``{"columns": [...], "rows": [[...], ...]}`` (compact for thousands of
rows) and fetches one concept's detail when it is opened.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

import prefsculpt.shaping  # noqa: F401  (registers the interventions)
from prefsculpt.audit.decisions import (
    ACTIONS,
    BUILTIN_CONCEPTS,
    DECISION_FIELDS,
    FORMAT_VERSION,
    INFO_FIELDS,
    DecisionsError,
    plain_value,
)
from prefsculpt.core.errors import UserError
from prefsculpt.shaping.decisions import load_decisions
from prefsculpt.shaping.registry import entry_param_names, method_names


class ReviewInputError(UserError):
    """The audit to review is missing or incomplete; the message says what to do."""


#: Table columns sent to the page, in this order (absent columns are sent as null).
ROW_COLUMNS = ("concept", "kind", "rank", "label", "direction", "d_z", "mean_diff", "ci_low", "ci_high", "q", "p",
               "half_a", "half_b", "replicated", "length_effect", "length_p", "support", "n", "tested",
               "significant", "member_of", "n_members", "where")
#: hypotheses.json fields forwarded to the detail view.
DETAIL_FIELDS = ("share_chosen_more", "share_rejected_more", "where_detail", "examples", "members")


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def table_payload(table: pd.DataFrame, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every concept row of ``hypotheses.parquet`` as columns + rows; a missing label is taken
    from ``labels`` (concept -> one-line label)."""
    if "concept" not in table.columns:
        raise ReviewInputError(f"hypotheses.parquet has no 'concept' column (has {list(table.columns)}); "
                               "re-run the audit stage")
    labels = labels or {}
    t = table.copy()
    t["concept"] = t["concept"].astype(str)
    if "members" in t.columns:
        t["n_members"] = [len(m) if m is not None and not isinstance(m, float) else None for m in t["members"]]
    rows = []
    for rec in t.to_dict("records"):
        if _is_missing(rec.get("label")) and rec["concept"] in labels:
            rec["label"] = labels[rec["concept"]]
        rows.append([plain_value(rec.get(c)) for c in ROW_COLUMNS])
    return {"columns": list(ROW_COLUMNS), "rows": rows}


def concept_detail(concept: str, record: Mapping[str, Any] | None, label: Any = None) -> dict[str, Any]:
    """What the page shows when a concept is opened: label detail (tokens, contexts, phrase,
    explanation), where it concentrates, members, example pairs (text segments with ``mark``).

    ``record``: the concept's hypotheses.json entry, if the audit showed it; ``label``: a
    ``ConceptLabel`` (or its dict) when the record has none."""
    rec = dict(record or {})
    lab = rec.get("label_detail")
    if lab is None and label is not None:
        lab = label.to_dict() if hasattr(label, "to_dict") else dict(label)
    out: dict[str, Any] = {"concept": concept, "label": lab}
    out.update({key: rec.get(key) for key in DETAIL_FIELDS})
    out["members"] = None if out["members"] is None else [str(m) for m in out["members"]]
    out["share_chosen_more"] = plain_value(out["share_chosen_more"])
    out["share_rejected_more"] = plain_value(out["share_rejected_more"])
    out["examples"] = out["examples"] or []
    out["where_detail"] = out["where_detail"] or []
    return out


def initial_decisions(decisions: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The entries the page starts from (person's fields only), in file order."""
    out = []
    for e in (decisions or {}).get("concepts") or []:
        if isinstance(e, Mapping) and isinstance(e.get("concept"), str):
            d = {k: e.get(k) for k in DECISION_FIELDS if e.get(k) is not None}
            d.update({k: e[k] for k in entry_param_names() if e.get(k) is not None})
            out.append(d)
    return out


def page_data(table: pd.DataFrame, decisions: Mapping[str, Any] | None, meta: Mapping[str, Any],
              labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything the page loads at start: the table, the starting decisions, the choices, facts."""
    return {"table": table_payload(table, labels), "decisions": initial_decisions(decisions),
            "actions": list(ACTIONS), "methods": list(method_names()), "params": list(entry_param_names()),
            "meta": {str(k): str(v) for k, v in meta.items()}}


def build_decisions(submitted: Any, base: Mapping[str, Any] | None, known_concepts: Iterable[str],
                    audit_run_id: str | None = None) -> dict[str, Any]:
    """The decisions file for what the page posted, validated against the audit.

    ``submitted``: ``{"concepts": [{concept, action, method, strength, note?, share?, multiplier?,
    instruction?}, ...]}``. Each entry keeps the audit's reading figures (label, effect, q, ...) from
    ``base`` (the proposal) so the saved file reads like the proposal. Raises :class:`DecisionsError`
    listing every problem (unknown concepts, bad actions/methods/parameters).
    """
    if not isinstance(submitted, Mapping) or not isinstance(submitted.get("concepts"), list):
        raise DecisionsError("the page sent no 'concepts' list; reload the page and save again")
    info = {e["concept"]: e for e in (base or {}).get("concepts") or []
            if isinstance(e, Mapping) and isinstance(e.get("concept"), str)}
    entries = []
    for e in submitted["concepts"]:
        if not isinstance(e, Mapping):
            entries.append(e)  # load_decisions names it
            continue
        out = {k: v for k, v in info.get(e.get("concept"), {}).items() if k in INFO_FIELDS}
        out.update({k: e[k] for k in DECISION_FIELDS if k in e})
        out.update({k: e[k] for k in entry_param_names() if e.get(k) not in (None, "")})
        out.update({k: v for k, v in e.items() if k not in DECISION_FIELDS and k not in entry_param_names()})
        entries.append(out)
    doc: dict[str, Any] = {"version": FORMAT_VERSION}
    if audit_run_id:
        doc["audit_run_id"] = audit_run_id
    doc["concepts"] = entries
    load_decisions(doc, known_concepts)  # raises with every problem listed
    return doc


def error_lines(exc: DecisionsError) -> list[str]:
    """The problems of a :class:`DecisionsError` as one line each (for the page)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    items = [ln[2:] for ln in lines if ln.startswith("- ")]
    return items or [ln for ln in lines if ln]


def known_concepts(table: pd.DataFrame) -> list[str]:
    return [*table["concept"].astype(str), *BUILTIN_CONCEPTS]


def labels_needed(table: pd.DataFrame, limit: int | None = None) -> list[str]:
    """Concepts the audit left unlabelled, tested ones first (they are the ones worth reading)."""
    lab = table["label"] if "label" in table.columns else pd.Series([None] * len(table), index=table.index)
    miss = table[lab.isna()]
    if "tested" in miss.columns:
        miss = pd.concat([miss[miss["tested"].astype(bool)], miss[~miss["tested"].astype(bool)]])
    out = miss["concept"].astype(str).tolist()
    return out if limit is None else out[:limit]


def by_concept(records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(r["concept"]): r for r in records if isinstance(r, Mapping) and "concept" in r}
