"""The audit's analysis, pure: scores + top contexts + pairs -> tested table, hypotheses, labels,
where they hold, example views, the planted check; and the files a person reads (report, plots,
proposed decisions). The ``audit`` stage (``prefsculpt.stages.audit``) fetches inputs and logs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefsculpt.audit import clusters as C
from prefsculpt.audit.config import AuditConfig
from prefsculpt.audit.decisions import propose_decisions, write_decisions
from prefsculpt.audit.labels import ConceptLabel
from prefsculpt.core.errors import UserError
from prefsculpt.data.schema import PreferencePair
from prefsculpt.report import html as H
from prefsculpt.report import plots as P

log = logging.getLogger(__name__)

PLANTED = ("sycophancy", "flattery", "styling", "length")


class AuditInputError(UserError):
    """The audit's inputs (scores run, pairs) are missing or do not match; the message says what to do."""


def align_pairs(pairs: list[PreferencePair], pair_ids: list[str], source: str) -> list[PreferencePair]:
    """The pairs in the scores' order; every scored id must be among the data's pairs."""
    by_id = {p.id: p for p in pairs}
    missing = [i for i in pair_ids if i not in by_id]
    if missing:
        raise AuditInputError(
            f"{len(missing)} of {len(pair_ids)} scored pairs are not in the data {source} (e.g. {missing[:3]}): "
            "the sae run scored other data; run the audit with the same data overrides, or set audit.scores_run_id"
        )
    return [by_id[i] for i in pair_ids]


# ---------------------------------------------------------------- analysis
def select_hypotheses(table: pd.DataFrame, clusters: list[list[str]]) -> pd.DataFrame:
    """Add ``member_of``, ``members`` and ``rank``: a latent inside a significant cluster of the same
    direction counts with its cluster (one hypothesis), so ranks go to the other significant rows."""
    t = table.copy()
    t["members"] = None
    t["member_of"] = None
    row = {c: i for i, c in enumerate(t["concept"])}
    for ci, members in enumerate(clusters):
        name = f"cluster:{ci}"
        if name not in row:
            continue
        t.at[row[name], "members"] = list(members)
        cr = t.loc[row[name]]
        if cr["significant"]:
            for m in members:
                if m in row and t.at[row[m], "direction"] == cr["direction"]:
                    t.at[row[m], "member_of"] = name
    hyp = t["significant"].astype(bool) & t["member_of"].isna()
    t["rank"] = np.nan
    t.loc[hyp, "rank"] = np.arange(1, int(hyp.sum()) + 1)  # the table is sorted best first
    return t


def describe_clusters(labels: np.ndarray, sym: np.ndarray, pairs: list[PreferencePair]) -> dict[int, str]:
    """A readable line per data cluster: its most central prompt. sym: (n, F) symmetric activity."""
    out = {}
    for c, best in C.central_rows(labels, sym).items():
        text = " ".join(pairs[best].prompt_text().split())
        out[int(c)] = f"e.g. “{text[:90]}{'…' if len(text) > 90 else ''}”"
    return out


def where_rows(d: np.ndarray, dirs: np.ndarray, labels: np.ndarray, half: np.ndarray, a: AuditConfig,
               about: dict[int, str]) -> list[list[dict[str, Any]]]:
    """Per hypothesis column of ``d``, the data clusters where its effect is strongest in its direction."""
    wh = C.where_it_holds(d, labels, half, a.min_cluster_size)
    out: list[list[dict[str, Any]]] = [[] for _ in range(d.shape[1])]
    if wh.empty:
        return out
    wh = wh.assign(z_dir=wh["welch_z"] * dirs[wh["concept_index"].to_numpy()])
    wh = wh[(wh["z_dir"] > 2.0) & wh["agree_halves"]].sort_values("z_dir", ascending=False)
    for j, g in wh.groupby("concept_index", sort=False):
        for r in g.head(a.where_top).to_dict("records"):
            r["about"] = about.get(int(r["cluster"]), "")
            out[int(j)].append({k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()})
    return out


def example_views(j: int, concept: str, d: np.ndarray, direction: int, pairs: list[PreferencePair],
                  top: pd.DataFrame, members: list[str], patterns: dict[str, str], k: int) -> list[H.ExampleView]:
    """Up to ``k`` pairs with the largest d in the hypothesis' direction, those with recorded firing
    tokens first; firing tokens (or regex matches for named regex concepts) highlighted."""
    sgn = 1 if direction >= 0 else -1
    order = [i for i in np.argsort(-sgn * d[:, j], kind="stable") if sgn * d[i, j] > 0]
    ctx = top[top["concept"].isin(members or [concept])]
    fired = set(ctx["pair_id"])
    chosen = ([i for i in order if pairs[i].id in fired] + [i for i in order if pairs[i].id not in fired])[:k]
    views = []
    for i in chosen:
        p, texts = pairs[i], {}
        for side in ("chosen", "rejected"):
            text = getattr(p, side)
            if concept in patterns:
                spans = H.regex_spans(text, patterns[concept])
            else:
                w = ctx[(ctx["pair_id"] == p.id) & (ctx["span"] == side)]
                spans = H.context_spans(text, zip(w["left"], w["token"], w["right"], strict=True))
            texts[side] = H.segments(text, spans)
        views.append(H.ExampleView(p.id, float(d[i, j]), H.segments(p.prompt_text(), [], 500),
                                   texts["chosen"], texts["rejected"]))
    return views


def planted_check(hyp: pd.DataFrame, d: np.ndarray, pairs: list[PreferencePair], min_corr: float,
                  fdr: float) -> pd.DataFrame | None:
    """Per planted concept: the best-ranked hypothesis whose d correlates with the planted tag
    difference (chosen - rejected) at least ``min_corr`` in the hypothesis's own direction — "the
    preferred side has more flattery" or "the preferred side has less correction of the user" both
    capture a planted concept. None when the data has no such tags."""
    tags = [c for c in PLANTED if any(c in p.chosen_tags for p in pairs)]
    if not tags:
        return None
    if d.shape[1] == 0:
        log.warning("planted data but no hypotheses: no planted concept is captured")
        return pd.DataFrame({"planted concept": tags, "rank": np.nan, "captured": False})
    t = np.array([[p.chosen_tags.get(c, 0.0) - p.rejected_tags.get(c, 0.0) for c in tags] for p in pairs])
    dz = (d - d.mean(0)) / np.maximum(d.std(0), 1e-12)  # (n, H)
    tz = (t - t.mean(0)) / np.maximum(t.std(0), 1e-12)  # (n, T)
    corr = dz.T @ tz / len(pairs)  # (H, T) Pearson correlations
    aligned = corr * hyp["direction"].to_numpy(dtype=float)[:, None]  # > 0: the hypothesis points the planted way
    rows = []
    for k, c in enumerate(tags):
        hit = np.flatnonzero(aligned[:, k] >= min_corr)
        j = int(hit[0]) if len(hit) else int(np.argmax(aligned[:, k]))
        r = hyp.iloc[j]
        same = np.sign(r["half_a"]) == np.sign(r["half_b"]) == np.sign(r["direction"]) != 0
        rows.append({"planted concept": c, "rank": int(r["rank"]), "concept": r["concept"], "label": r["label"],
                     "corr": float(corr[j, k]), "q": float(r["q"]), "d_z": float(r["d_z"]),
                     "half_a": float(r["half_a"]), "half_b": float(r["half_b"]),
                     "captured": bool(len(hit) and r["rank"] <= 10 and r["q"] < fdr and same)})
    return pd.DataFrame(rows)


def write_outputs(out: Path, a: AuditConfig, data_name: str, run_id: str, src: str, table: pd.DataFrame,
                  hyp: pd.DataFrame, views: list[H.HypothesisView], labels: dict[str, ConceptLabel],
                  planted: pd.DataFrame | None, methods_help: str = "") -> Path:
    """Every audit file, written locally (uploaded by the stage once all exist). ``methods_help``: the
    per-method comment lines of the proposed decisions file (the stage has them from the registry)."""
    (out / "plots").mkdir(parents=True)
    table.to_parquet(out / "hypotheses.parquet", index=False)
    records = []
    for v in views:
        r = {k: (None if isinstance(x, float) and not np.isfinite(x) else x) for k, x in v.row.items()}
        r.update(label_detail=v.label.to_dict() if v.label else None, where_detail=v.where,
                 example_pairs=[e.pair_id for e in v.examples], examples=[asdict(e) for e in v.examples])
        records.append(r)
    (out / "hypotheses.json").write_text(json.dumps(records, indent=1, default=_json_default, ensure_ascii=False))
    write_decisions(propose_decisions(hyp, None, audit_run_id=run_id), out / "decisions.yaml", methods_help)
    lab = {c: x.label for c, x in labels.items()}
    images = {}
    for name, fig in (("volcano", P.volcano(table, a.fdr, lab)), ("top_effects", P.top_effects(hyp, 20, lab))):
        images[name] = P.png_bytes(fig)
        (out / "plots" / f"{name}.png").write_bytes(images[name])
        P.plt.close(fig)
    if planted is not None:
        (out / "planted.json").write_text(planted.to_json(orient="records", indent=1))
    meta = {"audit run": run_id, "scores from (sae run)": src, "data": data_name,
            "pairs": int(table["n"].iloc[0]) if len(table) else 0,
            "concepts tested": f"{int(table['tested'].sum())} of {len(table)} (score: {a.score}, test: {a.test})",
            "hypotheses": f"{len(hyp)} shown (significant at q < {a.fdr:g} and replicated in both halves; "
                          f"{int(table['significant'].sum())} concepts significant)"}
    H.write_report(H.render_report(views, meta, planted, images), out / "report.html")
    return out


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
