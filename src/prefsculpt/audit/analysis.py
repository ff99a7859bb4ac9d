"""The audit's analysis, pure: scores + top contexts + pairs -> tested table, hypotheses, labels,
where they hold, example views, the planted check; and the files a person reads (report, plots,
proposed decisions). The ``audit`` stage (``prefsculpt.stages.audit``) fetches inputs and logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from prefsculpt.audit import clusters as C
from prefsculpt.audit.config import AuditConfig
from prefsculpt.audit.decisions import propose_decisions, write_decisions
from prefsculpt.audit.labels import ConceptLabel
from prefsculpt.audit.stats import bh_qvalues
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
#: ``cluster_type`` of a latent cluster: co-firing community (Leiden) or near-duplicate latents.
COFIRING, NEAR_DUPLICATE = "cofiring", "near_duplicate"


def cluster_key(cluster_type: str, members: list[str]) -> str:
    """A cluster's content id: ``<type>-<12 hex of sha256 over its sorted member names>``."""
    digest = hashlib.sha256("\x00".join(sorted(map(str, members))).encode()).hexdigest()[:12]
    return f"{cluster_type}-{digest}"


def select_hypotheses(table: pd.DataFrame, clusters: list[list[str]],
                      cluster_types: list[str] | None = None) -> pd.DataFrame:
    """Add ``members``, ``cluster_type``, ``cluster_key``, ``member_of``, ``duplicate_of`` and ``rank``.

    ``cluster_key`` (:func:`cluster_key`) names a cluster by its members, so it is the same in every
    audit that finds the same group, whatever its ``cluster:<i>`` number there.

    ``clusters``: the member names of ``cluster:0``, ``cluster:1``, ...; ``cluster_types``: each one's
    type (:data:`COFIRING` by default, :data:`NEAR_DUPLICATE`). A latent inside a significant cluster of
    the same direction counts with its cluster (``member_of``; a near-duplicate group first, being the
    tighter), so it is one hypothesis and ranks go to the other significant rows. ``duplicate_of``
    names a latent's near-duplicate group whatever its significance."""
    t = table.copy()
    types = list(cluster_types or [COFIRING] * len(clusters))
    if len(types) != len(clusters):
        raise ValueError(f"{len(clusters)} clusters but {len(types)} cluster types")
    t["members"] = None
    t["cluster_type"] = None
    t["cluster_key"] = None
    t["member_of"] = None
    t["duplicate_of"] = None
    row = {c: i for i, c in enumerate(t["concept"])}
    order = sorted(range(len(clusters)), key=lambda ci: types[ci] != NEAR_DUPLICATE)  # duplicates first
    for ci in order:
        name, members = f"cluster:{ci}", clusters[ci]
        if name not in row:
            continue
        t.at[row[name], "members"] = list(members)
        t.at[row[name], "cluster_type"] = types[ci]
        t.at[row[name], "cluster_key"] = cluster_key(types[ci], members)
        cr = t.loc[row[name]]
        for m in members:
            if m not in row:
                continue
            if types[ci] == NEAR_DUPLICATE and t.at[row[m], "duplicate_of"] is None:
                t.at[row[m], "duplicate_of"] = name
            if cr["significant"] and t.at[row[m], "member_of"] is None and t.at[row[m], "direction"] == cr["direction"]:
                t.at[row[m], "member_of"] = name
    hyp = t["significant"].astype(bool) & t["member_of"].isna()
    t["rank"] = np.nan
    t.loc[hyp, "rank"] = np.arange(1, int(hyp.sum()) + 1)  # the table is sorted best first
    return t


def length_carriers(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """What carries "the preferred answer is longer": up to ``k`` concepts whose raw effect is significant
    (``significant_raw``) but does not survive length control (not ``significant``), that point the
    way the length gap does (``length_share`` > 0), ranked by ``length_share`` — the share of the mean
    chosen - rejected length difference the concept's own difference accounts for
    (``stats.length_carried``). Built-ins are left out, and so are members of a near-duplicate group
    that is listed itself. Columns: concept, kind, label (if the table has one), length_share, length_r2,
    d_z, q_raw, length_effect, q, members."""
    cols = ["concept", "kind", "label", "length_share", "length_r2", "d_z", "q_raw", "length_effect", "q", "members"]
    need = {"significant_raw", "significant", "length_share"}
    if not need <= set(table.columns):
        return pd.DataFrame(columns=cols)
    share = table["length_share"].to_numpy(dtype=float)
    cand = table[table["significant_raw"].astype(bool) & ~table["significant"].astype(bool)
                 & (table["kind"] != "builtin") & (np.nan_to_num(share, nan=-np.inf) > 0)]
    if "duplicate_of" in cand.columns:
        listed = set(cand["concept"])
        cand = cand[~cand["duplicate_of"].isin(listed)]
    cand = cand.sort_values("length_share", ascending=False, kind="stable").head(k)
    return cand.reindex(columns=cols).reset_index(drop=True)


def describe_clusters(labels: np.ndarray, sym: np.ndarray, pairs: list[PreferencePair]) -> dict[int, str]:
    """A readable line per data cluster: its most central prompt. sym: (n, F) symmetric activity."""
    out = {}
    for c, best in C.central_rows(labels, sym).items():
        text = " ".join(pairs[best].prompt_text().split())
        out[int(c)] = f"e.g. “{text[:90]}{'…' if len(text) > 90 else ''}”"
    return out


def where_family(d: np.ndarray, labels: np.ndarray, half: np.ndarray, min_size: int, selected_share: float = 1.0,
                 concept_index: Sequence[int] | None = None) -> pd.DataFrame:
    """Every (concept column of ``d``, data cluster) test of "where it holds" (``clusters.where_it_holds``'s
    Welch p, two-sided) with its q: BH over that concept's own clusters, divided by ``selected_share``.

    "Where it holds" is asked of hypotheses only: a concept is a family of cluster tests, selected by
    the concept test, and a selected family is tested at level fdr·R/m (R selected of m tested
    concepts; Benjamini & Bogomolov 2014, *Selective inference on multiple families of hypotheses*).
    Dividing the within-family q by ``selected_share`` = R/m keeps the rule ``q < fdr``. On null data
    no concept is selected, so no data-cluster claim can be made either: the whole report's chance of
    any false discovery stays the concept test's (a second BH family at level fdr beside it would
    roughly double it)."""
    if not 0 < selected_share <= 1:
        raise ValueError(f"where_family: selected_share must be in (0, 1], got {selected_share}")
    wh = C.where_it_holds(d, labels, half, min_size, concept_index=concept_index)
    if not len(wh):
        return wh.assign(q=[])
    p = wh["p"].to_numpy(dtype=float)
    q = np.empty_like(p)
    for rows in wh.groupby("concept_index", sort=False).indices.values():
        q[rows] = bh_qvalues(p[rows])
    return wh.assign(q=np.minimum(1.0, q / selected_share))


def selected_share(table: pd.DataFrame) -> float:
    """R/m of :func:`where_family`: the share of tested concepts that are significant (0 when none are)."""
    m = int(table["tested"].sum())
    return float(table["significant"].sum()) / m if m else 0.0


def where_rows(d: np.ndarray, dirs: np.ndarray, labels: np.ndarray, half: np.ndarray, a: AuditConfig,
               about: dict[int, str], selected: np.ndarray | None = None, share: float = 1.0
               ) -> list[list[dict[str, Any]]]:
    """Per column of ``d``, the data clusters where its effect is stronger, in its direction, than in
    the rest: q < fdr (:func:`where_family`; ``share`` = R/m) and the same sign in both halves. Only
    the ``selected`` columns (the significant hypotheses; default all) are tested; the rest get []."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(d.shape[1])]
    cols = np.arange(d.shape[1]) if selected is None else np.flatnonzero(selected)
    if not len(cols) or share <= 0:
        return out
    wh = where_family(d[:, cols], labels, half, a.min_cluster_size, share, concept_index=cols)
    if wh.empty:
        return out
    wh = wh.assign(z_dir=wh["welch_z"] * dirs[wh["concept_index"].to_numpy()])
    wh = wh[(wh["z_dir"] > 0) & (wh["q"] < a.fdr) & wh["agree_halves"]].sort_values("z_dir", ascending=False)
    for j, g in wh.groupby("concept_index", sort=False):
        for r in g.head(a.where_top).to_dict("records"):
            r["about"] = about.get(int(r["cluster"]), "")
            out[int(j)].append({k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()})
    return out


def where_null_rows(diffs: Callable[[list[str]], np.ndarray], nulls: Sequence[pd.DataFrame],
                    labels: np.ndarray | None, half: np.ndarray, min_size: int, fdr: float,
                    flips: Sequence[np.ndarray], top_k: int) -> list[dict[str, int]]:
    """The data-cluster family under each swap-null coin vector of ``flips``, as the audit makes it:
    on the seed's own significant concepts (``nulls[s]``, the concept table of that null; the first
    ``top_k`` by rank, like the hypotheses) at the seed's own R/m. ``diffs(names)``: those concepts'
    (n, len(names)) chosen - rejected on the real pairs (the coins are applied here). Per seed, how
    many (concept, cluster) tests reach q < fdr (``n_where_q_below_fdr``) and how many of those also
    agree in both halves (``n_where_significant``). The data clusters are built from symmetric
    activity, which a swap leaves unchanged, so the same ``labels`` serve every seed; None (no data
    clusters) or no significant concept in the seed: zeros."""
    out = []
    for nt, flip in zip(nulls, flips, strict=True):
        sig = nt[nt["significant"].astype(bool)]
        if labels is None or sig.empty:
            out.append({"n_where_q_below_fdr": 0, "n_where_significant": 0})
            continue
        d = diffs(sig["concept"].head(top_k).tolist()) * np.where(flip, -1.0, 1.0)[:, None]
        wh = where_family(d, labels, half, min_size, selected_share(nt))
        hit = wh["q"].to_numpy(dtype=float) < fdr if len(wh) else np.zeros(0, bool)
        out.append({"n_where_q_below_fdr": int(hit.sum()),
                    "n_where_significant": int((hit & wh["agree_halves"].to_numpy(dtype=bool)).sum())})
    return out


@dataclass
class CalibrationVerdict:
    """The swap-null check over every family BH runs over (concepts — latents, latent clusters, named,
    built-ins — and the data-cluster "where it holds" tests), and what follows from it."""

    #: Null seeds run, and how many of them made any discovery (any q < fdr in any family).
    n_seeds: int
    false_seeds: int
    #: The most false seeds tolerated (:func:`allowed_false_seeds`: 2 of 20 at fdr 0.05).
    allowed: int
    #: Seeds with a discovery per family.
    by_family: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.false_seeds > self.allowed

    def message(self) -> str:
        fam = ", ".join(f"{k}: {v}" for k, v in self.by_family.items())
        head = (f"Calibration FAILED: {self.false_seeds} of {self.n_seeds} swap-null seeds made a discovery "
                f"(at most {self.allowed} tolerated; {fam}). "
                if self.failed else
                f"Calibration passed: {self.false_seeds} of {self.n_seeds} swap-null seeds made a discovery "
                f"(at most {self.allowed} tolerated; {fam}).")
        if self.failed:
            head += ("On these pairs the tests report findings where there are none, so the q-values here do not "
                     "hold their nominal false-discovery rate; no decisions are proposed automatically. "
                     "Treat every hypothesis below as unconfirmed.")
        return head


def allowed_false_seeds(n_seeds: int, fdr: float, alpha: float = 0.1) -> int:
    """The most null seeds with a discovery that tests holding their level are expected to give: the
    smallest k with P(Binomial(n_seeds, fdr) > k) < ``alpha`` (BH at level fdr makes a discovery on a
    null dataset with probability at most fdr). 2 of 20 at fdr 0.05, 1 of 3."""
    k = 0
    while k < n_seeds and sps.binom.sf(k, n_seeds, fdr) >= alpha:
        k += 1
    return k


def calibration_verdict(cal: pd.DataFrame, fdr: float = 0.05, alpha: float = 0.1) -> CalibrationVerdict:
    """``cal``: one row per null seed with ``n_q_below_fdr`` (concept family) and, when the data
    clusters were tested, ``n_where_q_below_fdr``; a seed with any of them > 0 made a discovery."""
    fams = {"concepts": "n_q_below_fdr", "data clusters": "n_where_q_below_fdr"}
    hits = {k: cal[c].to_numpy() > 0 for k, c in fams.items() if c in cal.columns}
    any_hit = np.logical_or.reduce(list(hits.values())) if hits else np.zeros(len(cal), bool)
    n = len(cal)
    return CalibrationVerdict(n, int(any_hit.sum()), allowed_false_seeds(n, fdr, alpha),
                              {k: int(v.sum()) for k, v in hits.items()})


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
                  planted: pd.DataFrame | None, methods_help: str = "", verdict: CalibrationVerdict | None = None,
                  carriers: pd.DataFrame | None = None, calibration: pd.DataFrame | None = None) -> Path:
    """Every audit file, written locally (uploaded by the stage once all exist). ``methods_help``: the
    per-method comment lines of the proposed decisions file (the stage has them from the registry).
    ``verdict``: the calibration verdict — when it failed, the report opens with a banner saying so
    and the proposed decisions file is empty and marked ``withheld``; ``calibration``: its per-seed
    table (``calibration.json``); ``carriers``: :func:`length_carriers`, attached to the ``length``
    record of hypotheses.json and shown as a report section."""
    (out / "plots").mkdir(parents=True)
    table.to_parquet(out / "hypotheses.parquet", index=False)
    carrier_recs = [] if carriers is None else [
        {k: _plain(v) for k, v in r.items()} for r in carriers.to_dict("records")]
    records = []
    for v in views:
        r = {k: (None if isinstance(x, float) and not np.isfinite(x) else x) for k, x in v.row.items()}
        r.update(label_detail=v.label.to_dict() if v.label else None, where_detail=v.where,
                 example_pairs=[e.pair_id for e in v.examples], examples=[asdict(e) for e in v.examples])
        if r.get("concept") == "length":
            r["length_carriers"] = carrier_recs
        records.append(r)
    (out / "hypotheses.json").write_text(json.dumps(records, indent=1, default=_json_default, ensure_ascii=False))
    withheld = verdict.message() if verdict is not None and verdict.failed else None
    write_decisions(propose_decisions(hyp, None, audit_run_id=run_id, withheld=withheld), out / "decisions.yaml",
                    methods_help)
    if verdict is not None:
        cal = {"n_seeds": verdict.n_seeds, "false_seeds": verdict.false_seeds, "allowed": verdict.allowed,
               "failed": verdict.failed, "by_family": verdict.by_family, "message": verdict.message(),
               "seeds": [] if calibration is None else calibration.to_dict("records")}
        (out / "calibration.json").write_text(json.dumps(cal, indent=1, default=_json_default))
    lab = {c: x.label for c, x in labels.items()}
    images = {}
    for name, fig in (("volcano", P.volcano(table, a.fdr, lab)), ("top_effects", P.top_effects(hyp, 20, lab))):
        images[name] = P.png_bytes(fig)
        (out / "plots" / f"{name}.png").write_bytes(images[name])
        P.plt.close(fig)
    if planted is not None:
        (out / "planted.json").write_text(planted.to_json(orient="records", indent=1))
    n_sig, n_raw = int(table["significant"].sum()), int(table["significant_raw"].sum())
    meta = {"audit run": run_id, "scores from (sae run)": src, "data": data_name,
            "pairs": int(table["n"].iloc[0]) if len(table) else 0,
            "concepts tested": f"{int(table['tested'].sum())} of {len(table)} (score: {a.score}, test: {a.test})",
            "significant": f"{n_sig} length-controlled (q < {a.fdr:g} on the test at equal response length, "
                           f"replicated in both halves); {n_raw} on the raw test",
            "hypotheses": f"{len(hyp)} shown (significant length-controlled, one row per cluster of near-duplicate "
                          "or co-firing latents)",
            "calibration": verdict.message() if verdict is not None else "not run (audit.calibration_seeds=0)"}
    H.write_report(H.render_report(views, meta, planted, images,
                                   banner=verdict.message() if verdict is not None else None,
                                   banner_failed=bool(verdict is not None and verdict.failed),
                                   carriers=carrier_recs), out / "report.html")
    return out


def _plain(v: Any) -> Any:
    """numpy scalars / NaN / arrays -> JSON-friendly Python values."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
