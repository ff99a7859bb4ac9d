"""The ``audit`` stage: concept scores of an ``sae`` run -> hypotheses, decisions, report.

Writes, as artifacts of its own run under ``audit/``: ``hypotheses.parquet`` (every concept tested,
one row each; ``rank`` set for the hypotheses), ``hypotheses.json`` (the hypotheses with labels,
where they concentrate and example pair ids), ``decisions.yaml`` (proposed, all ``allow``),
``report.html`` and ``plots/*.png``; on planted data also ``planted.json``, the check that each
planted concept is captured by a top hypothesis. Every file is written locally first and uploaded
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
    AuditInputError,
    align_pairs,
    describe_clusters,
    example_views,
    planted_check,
    select_hypotheses,
    where_rows,
    write_outputs,
)
from prefsculpt.audit.config import AuditConfig
from prefsculpt.audit.labels import ExplainSettings, build_labels, explain_labels, validate_top_contexts
from prefsculpt.audit.stats import half_assignment
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

        groups: list[list[int]] = []
        if a.latent_clusters and latent_cols:
            groups = SS.latent_groups(scores, stat, latent_cols, a.nmi_top_fraction, a.min_latent_cluster, seed)
        test_kw = dict(stat=stat, test=a.test, fdr=a.fdr, min_support=a.min_support,
                       min_nonzero=a.min_nonzero_pairs, rank_by=a.rank_by)
        table, _ = SS.test_store(scores, keys, extra={"length": scores.length_diff()}, clusters=groups or None,
                                 **test_kw)
        if a.calibration_seeds > 0:
            log_calibration(scores, keys, a.calibration_seeds, test_kw)
        member_names = [[scores.concept_names[i] for i in g] for g in groups]
        table = select_hypotheses(table, member_names)
        hyp = table[table["rank"].notna()].head(a.top_k)
        n_hyp = len(hyp)
        shown = pd.concat([hyp, table[table["kind"].isin(["named", "builtin"]) & table["rank"].isna()]])

        group_cols = {f"cluster:{i}": g for i, g in enumerate(groups)}
        names = shown["concept"].tolist()
        in_shown = [m for ms in shown["members"].dropna() for m in ms]  # member rows get labels too
        labels = build_labels(top, names + in_shown, a.label_tokens, a.label_contexts,
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

        d = SS.concept_diffs(scores, names, stat, group_cols)  # (n, shown)
        dirs = shown["direction"].to_numpy(dtype=float)
        half = half_assignment(keys)
        where: list[list[dict[str, Any]]] = [[] for _ in names]
        sym = SS.symmetric_activity(scores, stat, latent_cols)  # sparse (n, latents)
        k = min(a.n_data_clusters, int(C.active_rows(sym).sum()) // max(1, a.min_cluster_size))
        if k >= 2:
            dl = C.data_clusters(sym, k, seed)
            where = where_rows(d, dirs, dl, half, a, describe_clusters(dl, sym, pairs))
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
                            labels, planted, decisions_help())
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
