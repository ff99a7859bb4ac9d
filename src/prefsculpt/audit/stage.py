"""The ``audit`` entry point: concept scores of an ``sae`` run -> hypotheses, decisions, report.

Writes, as artifacts of its own run under ``audit/``: ``hypotheses.parquet`` (every concept tested,
one row each; ``rank`` set for the hypotheses), ``hypotheses.json`` (the hypotheses with labels,
where they concentrate and example pair ids), ``decisions.yaml`` (proposed, all ``allow``),
``report.html`` and ``plots/*.png``; on planted data also ``planted.json``, the check that each
planted concept is captured by a top hypothesis. Every file is written locally first and uploaded
at the end, so a failed audit leaves no partial artifacts.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from prefsculpt.audit import clusters as C
from prefsculpt.audit import streaming as SS
from prefsculpt.audit.decisions import propose_decisions, write_decisions
from prefsculpt.audit.labels import (
    ConceptLabel,
    ExplainSettings,
    build_labels,
    explain_labels,
    validate_top_contexts,
)
from prefsculpt.audit.stats import half_assignment
from prefsculpt.concepts.store import ScoreStore
from prefsculpt.data.schema import PreferencePair
from prefsculpt.report import html as H
from prefsculpt.report import plots as P
from prefsculpt.tracking.runs import latest_stage_run

log = logging.getLogger(__name__)

PLANTED = ("sycophancy", "flattery", "styling", "length")


class AuditInputError(ValueError):
    """The audit's inputs (scores run, pairs) are missing or do not match; the message says what to do."""


# ---------------------------------------------------------------- inputs
def find_scores_run(cfg: DictConfig, current_run_id: str) -> str:
    """``audit.scores_run_id``, else the latest FINISHED ``sae`` run beside this one (same parent
    run), else the latest in this experiment."""
    client = mlflow.MlflowClient()
    if cfg.audit.scores_run_id:
        try:
            return client.get_run(str(cfg.audit.scores_run_id)).info.run_id
        except mlflow.exceptions.MlflowException as exc:
            raise AuditInputError(f"audit.scores_run_id={cfg.audit.scores_run_id!r} is not a run here: {exc}") from exc
    run = client.get_run(current_run_id)
    exp = run.info.experiment_id
    found = latest_stage_run("sae", [exp], run.data.tags.get("mlflow.parentRunId"))
    if found:
        return found
    raise AuditInputError(
        f"no finished sae run in experiment {exp}: run the sae stage first: mlflow run . -e sae "
        "(or set audit.scores_run_id=<run id>)"
    )


def download_scores(run_id: str, dst: Path) -> tuple[ScoreStore, pd.DataFrame]:
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    if "scores" not in names:
        raise AuditInputError(f"sae run {run_id} has no scores/ artifact (has {sorted(names)}); re-run the sae stage")
    sdir = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="scores", dst_path=str(dst)))
    top = sdir / "top_contexts.parquet"
    if not top.exists():
        if "top_contexts.parquet" not in names:
            raise AuditInputError(f"sae run {run_id} has no top_contexts.parquet; re-run the sae stage")
        top = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="top_contexts.parquet",
                                                       dst_path=str(dst)))
    return ScoreStore(sdir), pd.read_parquet(top)


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


def where_rows(d: np.ndarray, dirs: np.ndarray, labels: np.ndarray, half: np.ndarray, cfg: DictConfig,
               about: dict[int, str]) -> list[list[dict[str, Any]]]:
    """Per hypothesis column of ``d``, the data clusters where its effect is strongest in its direction."""
    wh = C.where_it_holds(d, labels, half, int(cfg.audit.min_cluster_size))
    out: list[list[dict[str, Any]]] = [[] for _ in range(d.shape[1])]
    if wh.empty:
        return out
    wh = wh.assign(z_dir=wh["welch_z"] * dirs[wh["concept_index"].to_numpy()])
    wh = wh[(wh["z_dir"] > 2.0) & wh["agree_halves"]].sort_values("z_dir", ascending=False)
    for j, g in wh.groupby("concept_index", sort=False):
        for r in g.head(int(cfg.audit.where_top)).to_dict("records"):
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


# ---------------------------------------------------------------- the stage
def run_audit(cfg: DictConfig) -> dict[str, Any]:
    from prefsculpt.data.source import dataset_name, load_source
    from prefsculpt.tracking.runs import log_pairs_input, stage_run

    a = cfg.audit
    stat = str(a.score)
    with stage_run(cfg, "audit") as run, tempfile.TemporaryDirectory(prefix="prefsculpt-audit-") as tmp:
        src = find_scores_run(cfg, run.info.run_id)
        mlflow.set_tag("prefsculpt.scores_run_id", src)
        scores, top = download_scores(src, Path(tmp) / "in")
        top = validate_top_contexts(top)
        loaded = load_source(cfg.data)
        pairs = align_pairs(loaded.pairs, scores.pair_ids, loaded.source)
        log_pairs_input(pairs, dataset_name(cfg.data), context="audit", source=loaded.source)
        keys = [p.prompt_key() for p in pairs]
        latent_cols = [i for i, c in enumerate(scores.concept_names) if c.startswith("latent:")]

        groups: list[list[int]] = []
        if a.latent_clusters and latent_cols:
            groups = SS.latent_groups(scores, stat, latent_cols, float(a.nmi_top_fraction),
                                      int(a.min_latent_cluster), int(cfg.seed))
        test_kw = dict(stat=stat, test=str(a.test), fdr=float(a.fdr), min_support=float(a.min_support),
                       min_nonzero=int(a.min_nonzero_pairs), rank_by=str(a.rank_by))
        table, _ = SS.test_store(scores, keys, extra={"length": scores.length_diff()}, clusters=groups or None,
                                 **test_kw)
        if int(a.calibration_seeds) > 0:
            log_calibration(scores, keys, int(a.calibration_seeds), test_kw)
        member_names = [[scores.concept_names[i] for i in g] for g in groups]
        table = select_hypotheses(table, member_names)
        hyp = table[table["rank"].notna()].head(int(a.top_k))
        n_hyp = len(hyp)
        shown = pd.concat([hyp, table[table["kind"].isin(["named", "builtin"]) & table["rank"].isna()]])

        group_cols = {f"cluster:{i}": g for i, g in enumerate(groups)}
        names = shown["concept"].tolist()
        in_shown = [m for ms in shown["members"].dropna() for m in ms]  # member rows get labels too
        labels = build_labels(top, names + in_shown, int(a.label_tokens), int(a.label_contexts),
                              groups={f"cluster:{i}": m for i, m in enumerate(member_names)})
        if a.explain_base_url:
            from prefsculpt.models.loading import default_cache_dir

            root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
            settings = ExplainSettings(str(a.explain_base_url), str(a.explain_model), str(a.explain_api_key_env),
                                       float(a.explain_timeout_s), root / "explanations")
            todo = hyp[hyp["kind"].isin(["latent", "cluster"])]["concept"].head(int(a.explain_top))
            explain_labels(labels, todo, settings)
        label_of = {c: lab.label for c, lab in labels.items()}
        table["label"] = table["concept"].map(label_of)
        shown = shown.assign(label=shown["concept"].map(label_of))

        d = SS.concept_diffs(scores, names, stat, group_cols)  # (n, shown)
        dirs = shown["direction"].to_numpy(dtype=float)
        half = half_assignment(keys)
        where: list[list[dict[str, Any]]] = [[] for _ in names]
        sym = SS.symmetric_activity(scores, stat, latent_cols)  # sparse (n, latents)
        k = min(int(a.n_data_clusters), int(C.active_rows(sym).sum()) // max(1, int(a.min_cluster_size)))
        if k >= 2:
            dl = C.data_clusters(sym, k, int(cfg.seed))
            where = where_rows(d, dirs, dl, half, cfg, describe_clusters(dl, sym, pairs))
        summary = [", ".join(f"cluster {w['cluster']} (z {w['welch_z']:.1f})" for w in ws) for ws in where]
        shown = shown.assign(where=summary)
        hyp = shown.iloc[:n_hyp]
        table["where"] = table["concept"].map(dict(zip(names, summary, strict=True)))

        patterns = {f"named:{n.name}": str(n.pattern) for n in cfg.named_concepts if n.kind == "regex" and n.pattern}
        views = []
        for j, r in enumerate(shown.to_dict("records")):
            ex = example_views(j, r["concept"], d, int(r["direction"]), pairs, top, r["members"] or [],
                               patterns, int(a.n_examples))
            views.append(H.HypothesisView(r, labels.get(r["concept"]), where[j], ex))
        planted = planted_check(hyp, d[:, :n_hyp], pairs, float(a.planted_min_corr), float(a.fdr))
        out = write_outputs(Path(tmp) / "audit", cfg, run.info.run_id, src, table, hyp, views, labels, planted)
        mlflow.log_artifacts(str(out), "audit")
        metrics = log_summary(table, hyp, planted, len(groups))
    log.info("audit: %d hypotheses (%d significant of %d tested); run %s", len(hyp),
             metrics["n_significant"], metrics["n_tested"], run.info.run_id)
    return {"run_id": run.info.run_id, "scores_run_id": src, **metrics,
            "planted": None if planted is None else planted.to_dict("records")}


def log_calibration(scores: ScoreStore, keys: list[str], n_seeds: int, test_kw: dict[str, Any]) -> None:
    """The swap null on these very pairs (METHOD §3 "Calibration"): how many seeds report anything."""
    cal = SS.calibrate_store(scores, keys, n_seeds=n_seeds, extra={"length": scores.length_diff()}, **test_kw)
    n_reporting = int((cal["n_q_below_fdr"] > 0).sum())  # any q < fdr, replicated or not (strict)
    n_replicated = int((cal["n_significant"] > 0).sum())
    mlflow.log_metrics({"calibration/seeds": n_seeds, "calibration/seeds_reporting": n_reporting,
                        "calibration/seeds_reporting_replicated": n_replicated,
                        "calibration/share_reporting": n_reporting / n_seeds})
    mlflow.log_table(cal, "audit/calibration.json")
    log.info("calibration: %d of %d swap-null seeds report a hypothesis at q < fdr", n_reporting, n_seeds)


def write_outputs(out: Path, cfg: DictConfig, run_id: str, src: str, table: pd.DataFrame, hyp: pd.DataFrame,
                  views: list[H.HypothesisView], labels: dict[str, ConceptLabel], planted: pd.DataFrame | None) -> Path:
    (out / "plots").mkdir(parents=True)
    a = cfg.audit
    table.to_parquet(out / "hypotheses.parquet", index=False)
    records = []
    for v in views:
        r = {k: (None if isinstance(x, float) and not np.isfinite(x) else x) for k, x in v.row.items()}
        r.update(label_detail=v.label.to_dict() if v.label else None, where_detail=v.where,
                 example_pairs=[e.pair_id for e in v.examples])
        records.append(r)
    (out / "hypotheses.json").write_text(json.dumps(records, indent=1, default=_json_default, ensure_ascii=False))
    write_decisions(propose_decisions(hyp, None, audit_run_id=run_id), out / "decisions.yaml")
    lab = {c: x.label for c, x in labels.items()}
    images = {}
    for name, fig in (("volcano", P.volcano(table, float(a.fdr), lab)), ("top_effects", P.top_effects(hyp, 20, lab))):
        images[name] = P.png_bytes(fig)
        (out / "plots" / f"{name}.png").write_bytes(images[name])
        P.plt.close(fig)
    if planted is not None:
        (out / "planted.json").write_text(planted.to_json(orient="records", indent=1))
    meta = {"audit run": run_id, "scores from (sae run)": src, "data": str(cfg.data.name),
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


def log_summary(table: pd.DataFrame, hyp: pd.DataFrame, planted: pd.DataFrame | None, n_groups: int) -> dict[str, Any]:
    metrics = {"n_concepts": len(table), "n_tested": int(table["tested"].sum()),
               "n_significant": int(table["significant"].sum()), "n_hypotheses": int(table["rank"].notna().sum()),
               "n_latent_clusters": n_groups}
    for i, r in enumerate(hyp.head(5).itertuples(index=False), start=1):
        metrics[f"top{i}_d_z"] = float(r.d_z)
    if planted is not None:
        for r in planted.to_dict("records"):
            metrics[f"planted/{r['planted concept']}/rank"] = r["rank"]
            metrics[f"planted/{r['planted concept']}/corr"] = r["corr"]
        metrics["planted/captured"] = int(planted["captured"].sum())
        mlflow.log_table(planted, "audit/planted_table.json")
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    cols = ["rank", "concept", "label", "direction", "d_z", "mean_diff", "ci_low", "ci_high", "q", "half_a",
            "half_b", "length_effect", "support", "where"]
    mlflow.log_table(hyp[cols].head(50).astype({"label": str, "where": str}), "audit/top_hypotheses.json")
    return metrics
