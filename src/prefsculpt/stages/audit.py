"""The ``audit`` stage: concept scores of an ``sae`` run -> hypotheses, decisions, report.

Writes, as artifacts of its own run under ``audit/``: ``hypotheses.parquet`` (every concept tested,
one row each; ``rank`` set for the hypotheses), ``hypotheses.json`` (the hypotheses with labels,
where they concentrate and example pair ids; clusters with their ``members``; the ``length`` record
with ``length_carriers``), ``decisions.yaml`` (proposed, all ``allow``; empty and marked
``withheld`` when calibration failed), ``calibration.json`` (the swap-null verdict and per-seed
counts), ``report.html`` and ``plots/*.png``; on planted data also ``planted.json``, the check that
each planted concept is captured by a top hypothesis. The headline (q, significance, ranking,
volcano) is length-controlled; the raw figures sit beside it. Every file is written locally first and uploaded
at the end, so a failed audit leaves no partial artifacts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from prefsculpt.audit import clusters as C
from prefsculpt.audit import streaming as SS
from prefsculpt.audit.analysis import (
    COFIRING,
    NEAR_DUPLICATE,
    AuditInputError,
    CalibrationVerdict,
    align_pairs,
    calibration_verdict,
    describe_clusters,
    example_views,
    length_carriers,
    planted_check,
    select_hypotheses,
    selected_share,
    where_null_rows,
    where_rows,
    write_outputs,
)
from prefsculpt.audit.config import AuditConfig
from prefsculpt.audit.labels import ExplainSettings, build_labels, explain_labels, validate_top_contexts
from prefsculpt.audit.stats import calibration_row, half_assignment, swap_flips
from prefsculpt.concepts.store import ScoreStore
from prefsculpt.core.faults import fault_point
from prefsculpt.core.files import scratch_dir
from prefsculpt.core.names import Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.data.source import dataset_name
from prefsculpt.report import html as H
from prefsculpt.shaping.table import decisions_help
from prefsculpt.stages.prepare import prepared_data
from prefsculpt.tracking.runs import latest_stage_run, log_pairs_input, stage_run

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- the stage
def run_audit(cfg: DictConfig) -> dict[str, Any]:
    a: AuditConfig = OmegaConf.to_object(cfg.audit)  # the typed section, converted once
    named = [OmegaConf.to_object(n) for n in cfg.named_concepts]
    stat, seed = a.score, cfg.seed
    prepared, prepare_run = prepared_data(cfg)
    with stage_run(cfg, "audit") as run, scratch_dir(cache_root(cfg.cache_dir), "audit") as tmp:
        mlflow.set_tag(Tag.PREPARE_RUN, prepare_run)
        src = find_scores_run(cfg, run.info.run_id)
        mlflow.set_tag(Tag.SCORES_RUN, src)
        scores, top = download_scores(src, Path(tmp) / "in")
        fault_point("audit", "scores")
        top = validate_top_contexts(top)
        source = str(prepared.meta.get("source", ""))
        pairs = align_pairs(prepared.all_pairs(), scores.pair_ids, source)
        log_pairs_input(pairs, dataset_name(cfg.data), context="audit", source=source)
        keys = [p.prompt_key() for p in pairs]
        latent_cols = [i for i, c in enumerate(scores.concept_names) if c.startswith("latent:")]

        groups, dups = SS.latent_structure(
            scores, stat, latent_cols, top, clusters=a.latent_clusters, top_fraction=a.nmi_top_fraction,
            min_size=a.min_latent_cluster, seed=seed, duplicates=a.merge_duplicates,
            min_corr=a.duplicate_min_corr, min_overlap=a.duplicate_min_overlap)
        all_groups = groups + dups  # cluster:<i>: the co-firing communities first, then the near-duplicates
        types = [COFIRING] * len(groups) + [NEAR_DUPLICATE] * len(dups)
        test_kw = dict(stat=stat, test=a.test, fdr=a.fdr, min_support=a.min_support,
                       min_nonzero=a.min_nonzero_pairs, rank_by=a.rank_by)
        # the swap nulls ride along in the same passes: every concept family BH runs over, clusters included
        flips = swap_flips(scores.n_pairs, a.calibration_seeds) if a.calibration_seeds > 0 else []
        table, nulls = SS.test_store(scores, keys, extra={"length": scores.length_diff()},
                                     clusters=all_groups or None, flips=flips, **test_kw)
        member_names = [[scores.concept_names[i] for i in g] for g in all_groups]
        table = select_hypotheses(table, member_names, types)
        hyp = table[table["rank"].notna()].head(a.top_k)
        n_hyp = len(hyp)
        shown = pd.concat([hyp, table[table["kind"].isin(["named", "builtin"]) & table["rank"].isna()]])
        carriers = length_carriers(table, a.length_carriers)

        group_cols = {f"cluster:{i}": g for i, g in enumerate(all_groups)}
        names = shown["concept"].tolist()
        in_shown = [m for ms in shown["members"].dropna() for m in ms]  # member rows get labels too
        extra_lab = [c for c in carriers["concept"] if c not in names]
        labels = build_labels(top, names + in_shown + extra_lab, a.label_tokens, a.label_contexts,
                              groups={f"cluster:{i}": m for i, m in enumerate(member_names)},
                              directions=dict(zip(table["concept"], table["direction"], strict=True)))
        if a.explain_base_url:
            root = cache_root(cfg.cache_dir)
            settings = ExplainSettings(a.explain_base_url, str(a.explain_model), a.explain_api_key_env,
                                       a.explain_timeout_s, root / "explanations", a.explain_retries,
                                       a.explain_backoff_s)
            todo = hyp[hyp["kind"].isin(["latent", "cluster"])]["concept"].head(a.explain_top)
            outcome = explain_labels(labels, todo, settings)
            mlflow.log_metrics({"labels/explained": outcome.explained, "labels/explain_failed": outcome.failed})
            if outcome.error:
                mlflow.set_tag(Tag.EXPLAIN_ERROR, outcome.error[:5000])
        label_of = {c: lab.label for c, lab in labels.items()}
        table["label"] = table["concept"].map(label_of)
        shown = shown.assign(label=shown["concept"].map(label_of))
        carriers = carriers.assign(label=carriers["concept"].map(label_of))

        d = SS.concept_diffs(scores, names, stat, group_cols)  # (n, shown)
        dirs = shown["direction"].to_numpy(dtype=float)
        half = half_assignment(keys)
        where: list[list[dict[str, Any]]] = [[] for _ in names]
        sym = SS.symmetric_activity(scores, stat, latent_cols)  # sparse (n, latents)
        k = min(a.n_data_clusters, int(C.active_rows(sym).sum()) // max(1, a.min_cluster_size))
        dl = None
        if k >= 2:
            dl = C.data_clusters(sym, k, seed)
            # asked of the significant hypotheses only, at BH level fdr·R/m (analysis.where_family)
            where = where_rows(d, dirs, dl, half, a, describe_clusters(dl, sym, pairs),
                               selected=shown["significant"].to_numpy(dtype=bool), share=selected_share(table))
        verdict, cal = None, None
        if flips:
            cal = pd.DataFrame([{**calibration_row(sd, nt, a.fdr), **wr} for sd, (nt, wr) in enumerate(
                zip(nulls, where_null_rows(lambda cs: SS.concept_diffs(scores, cs, stat, group_cols), nulls, dl, half,
                                           a.min_cluster_size, a.fdr, flips, a.top_k), strict=True))])
            verdict = calibration_verdict(cal, a.fdr, a.calibration_alpha)
            log_calibration(cal, verdict)
        summary = [", ".join(f"cluster {w['cluster']} (z {w['welch_z']:.1f})" for w in ws) for ws in where]
        shown = shown.assign(where=summary)
        hyp = shown.iloc[:n_hyp]
        table["where"] = table["concept"].map(dict(zip(names, summary, strict=True)))

        patterns = {f"named:{n.name}": n.pattern for n in named if n.kind == "regex" and n.pattern}
        views = []
        for j, r in enumerate(shown.to_dict("records")):
            ex = example_views(j, r["concept"], d, int(r["direction"]), pairs, top, r["members"] or [],
                               patterns, a.n_examples)
            views.append(H.HypothesisView(r, labels.get(r["concept"]), where[j], ex))
        planted = planted_check(hyp, d[:, :n_hyp], pairs, a.planted_min_corr, a.fdr)
        out = write_outputs(Path(tmp) / "audit", a, cfg.data.name, run.info.run_id, src, table, hyp, views,
                            labels, planted, decisions_help(), verdict=verdict, carriers=carriers,
                            calibration=cal)
        mlflow.log_artifacts(str(out), "audit")
        metrics = log_summary(table, hyp, planted, len(groups), len(dups), len(carriers))
    log.info("audit: %d hypotheses (%d significant of %d tested); run %s", len(hyp),
             metrics["n_significant"], metrics["n_tested"], run.info.run_id)
    return {"run_id": run.info.run_id, "scores_run_id": src, **metrics,
            "planted": None if planted is None else planted.to_dict("records")}


def log_calibration(cal: pd.DataFrame, verdict: CalibrationVerdict) -> None:
    """The swap null on these very pairs (METHOD §3 "Calibration"): how many seeds make any discovery,
    in all families together and per family; whether calibration failed."""
    n = verdict.n_seeds
    metrics = {"calibration/seeds": n, "calibration/seeds_reporting": verdict.false_seeds,
               "calibration/seeds_allowed": verdict.allowed, "calibration/failed": int(verdict.failed),
               "calibration/share_reporting": verdict.false_seeds / n if n else 0.0,
               "calibration/seeds_reporting_concepts": int((cal["n_q_below_fdr"] > 0).sum()),
               "calibration/seeds_reporting_replicated": int((cal["n_significant"] > 0).sum()),
               "calibration/seeds_reporting_raw": int((cal["n_q_raw_below_fdr"] > 0).sum())}
    if "n_where_q_below_fdr" in cal:
        metrics["calibration/seeds_reporting_where"] = int((cal["n_where_q_below_fdr"] > 0).sum())
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    (log.warning if verdict.failed else log.info)("%s", verdict.message())


def log_summary(table: pd.DataFrame, hyp: pd.DataFrame, planted: pd.DataFrame | None, n_groups: int,
                n_dups: int = 0, n_carriers: int = 0) -> dict[str, Any]:
    metrics = {"n_concepts": len(table), "n_tested": int(table["tested"].sum()),
               "n_significant": int(table["significant"].sum()),
               "n_significant_raw": int(table["significant_raw"].sum()),
               "n_hypotheses": int(table["rank"].notna().sum()),
               "n_latent_clusters": n_groups, "n_duplicate_groups": n_dups, "n_length_carriers": n_carriers}
    for i, r in enumerate(hyp.head(5).itertuples(index=False), start=1):
        metrics[f"top{i}_d_z"] = float(r.d_z)
    if planted is not None:
        for r in planted.to_dict("records"):
            metrics[f"planted/{r['planted concept']}/rank"] = r["rank"]
            metrics[f"planted/{r['planted concept']}/corr"] = r["corr"]
        metrics["planted/captured"] = int(planted["captured"].sum())
        mlflow.log_table(planted, "audit/planted_table.json")
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    cols = ["rank", "concept", "label", "direction", "d_z", "mean_diff", "ci_low", "ci_high", "q", "q_raw",
            "half_a", "half_b", "length_effect", "length_share", "support", "where"]
    mlflow.log_table(hyp[cols].head(50).astype({"label": str, "where": str}), "audit/top_hypotheses.json")
    return metrics
