"""The ``evaluate`` stage: one policy against the base, every result tracked in MLflow.

Order of work: resolve the policy and every input (a bad URI or a malformed eval file fails here,
before any compute, with an error naming it), then inside the stage's run, each evaluation in
``eval.evals``. As each one finishes, its metrics (``syc/…``, ``style/…``, ``cap/…``, ``shift/…``;
``_base`` and paired ``_diff`` beside each), per-item tables (``mlflow.log_table`` under
``evals/<eval>/``), a policy-vs-base plot and ``evals/summary.json`` are logged, so a crash later
keeps everything finished before it. The base's tables are cached on disk by model digest and
inputs (``<cache>/evals/base/<key>/``), so comparing many policies evaluates the base once.

In the ``main`` pipeline the stage evaluates the policy that promotion will pick from the search
(:func:`run_pipeline_evaluate`); it is the same evaluation, with the policy chosen first.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow.genai.scorers import scorer
from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.errors import UserError
from prefsculpt.core.files import model_fingerprint
from prefsculpt.core.names import Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.evals import style as sty
from prefsculpt.evals.inputs import load_inputs
from prefsculpt.evals.plots import shift_scatter, sycophancy_forest
from prefsculpt.evals.runner import _ID_COLS, EVALS, BaseCache, Evaluator, cache_key, summarise_eval
from prefsculpt.evals.shift import compute_shift
from prefsculpt.evals.summary import Row, plot_rows
from prefsculpt.models.loading import resolve_model_dir
from prefsculpt.search.objective import ObjectiveError, objective_metrics, objectives_from_metrics
from prefsculpt.search.promote import PromoteInputError, choose, find_search_run, read_trials
from prefsculpt.stages.prepare import prepared_data
from prefsculpt.tracking.policies import resolve_policy
from prefsculpt.tracking.runs import resolve_tracking_uri, stage_run
from prefsculpt.tracking.shift_sources import ShiftSources, resolve_shift_sources

log = logging.getLogger(__name__)


def _log_eval(name: str, rows: list[Row], tables: dict[str, pd.DataFrame], extra: dict[str, float],
              summary: list[dict]) -> dict[str, float]:
    metrics = {k: v for r in rows for k, v in r.metrics().items()} | extra
    mlflow.log_metrics(metrics)
    for t, df in tables.items():
        mlflow.log_table(df.drop(columns=[c for c in _ID_COLS if c in df.columns]), f"evals/{name}/{t}.json")
    if any(r.base is not None for r in rows):
        fig = plot_rows(rows, f"{name}: policy vs base (95% CI; Δ = paired difference)")
        mlflow.log_figure(fig, f"evals/plots/{name}.png")
        plt.close(fig)
    figs = {"sycophancy_by_kind": sycophancy_forest(rows) if name == "sycophancy" else None,
            "shift_predicted_vs_observed": shift_scatter(tables.get("concepts"), extra) if name == "shift" else None}
    for fname, fig in figs.items():
        if fig is not None:
            mlflow.log_figure(fig, f"evals/plots/{fname}.png")
            plt.close(fig)
    summary.extend(r.record() for r in rows)
    mlflow.log_dict({"rows": summary}, "evals/summary.json")  # rewritten after each eval: partial results
    return metrics


#: mlflow.genai.evaluate's defaults (10 row workers x 10 scorer workers, traces exported by 10 async
#: threads) exhaust a local SQLAlchemy store's connection pool (5 + 10): every trace then waits 30 s
#: and is lost ("QueuePool limit ... reached"). Code scorers need no parallelism; a variable the user
#: set is left alone.
GENAI_ENV = {"MLFLOW_GENAI_EVAL_MAX_WORKERS": "2", "MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS": "1",
             "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}


@contextlib.contextmanager
def _genai_env() -> Iterator[None]:
    added = [k for k in GENAI_ENV if k not in os.environ]
    os.environ.update({k: GENAI_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _genai_style(tables: dict[str, pd.DataFrame], feats: dict) -> None:
    """The style responses through ``mlflow.genai.evaluate`` with code scorers (its evaluation views)."""

    def make(fname: str, pat: Any):
        def count(outputs) -> int:
            return len(pat.findall(str(outputs)))
        return scorer(count, name=f"style_{fname}")

    df = tables["responses"]
    data = [{"inputs": {"prompt": p}, "outputs": t} for p, t in zip(df.prompt, df.text, strict=True)]
    scorers = [make(f, p) for f, p in feats.items()]
    try:
        with _genai_env():
            mlflow.genai.evaluate(data=data, scorers=scorers)
    except Exception as exc:  # an optional view: never lose the evaluation over it
        log.warning("mlflow.genai.evaluate failed (%s); the style metrics and tables are logged anyway", exc)
        mlflow.set_tag(Tag.GENAI_ERROR, str(exc)[:500])


def _named(cfg: DictConfig) -> list | None:
    return OmegaConf.to_container(cfg.named_concepts) if "named_concepts" in cfg else None


def _shift(ev: Evaluator, src: ShiftSources | None) -> tuple[list, dict[str, pd.DataFrame], dict[str, float]]:
    if src is None:
        mlflow.set_tag(Tag.SHIFT, "skipped: no SAE or no audit hypotheses (see the log)")
        return [], {}, {}
    table, metrics = compute_shift(ev, src)
    mlflow.set_tag(Tag.SHIFT_SOURCES, src.origin)
    return [], {"concepts": table}, metrics


def _objectives(cfg: DictConfig, metrics: dict[str, float]) -> dict[str, float]:
    """The search objectives (``search/*``) of these metrics, logged here too: a trial run carries its
    evaluation's metrics, so both kinds of run share one key set in the UI's compare view. Nothing
    when the evaluation lacks what an objective needs (e.g. no ``compare_base``)."""
    if cfg.get("search") is None:
        return {}
    try:
        got = objective_metrics(objectives_from_metrics(metrics, cfg.search.objectives))
    except ObjectiveError as exc:
        log.info("evaluate: no search objectives on this run (%s)", str(exc).split(";")[0])
        return {}
    mlflow.log_metrics(got)
    return got


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``eval.policy`` against the base inside the stage's run."""
    ec = cfg.eval
    unknown = sorted(set(ec.evals) - set(EVALS))
    if unknown:
        raise UserError(f"eval.evals: unknown evaluation(s) {unknown}; choose from {list(EVALS)}")
    t0 = time.perf_counter()
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    root = cache_root(cfg.cache_dir)
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    policy = resolve_policy(ec.policy, base_dir, root)  # fails first, naming the URI
    prepared, prepare_run = prepared_data(cfg)
    inputs = load_inputs(cfg.eval, prepared, str(cfg.train.split))  # every external file validated before any compute
    shift_src = resolve_shift_sources(cfg, root) if "shift" in ec.evals else None
    base_digest = model_fingerprint(base_dir)
    cache = BaseCache(root / "evals" / "base" / cache_key(cfg, base_digest, inputs))

    with stage_run(cfg, "evaluate") as run:
        mlflow.set_tags({Tag.POLICY: policy.spec, Tag.POLICY_SOURCE: policy.source,
                         Tag.POLICY_DIGEST: policy.digest, Tag.BASE_DIGEST: base_digest,
                         Tag.PREPARE_RUN: prepare_run, **({Tag.POLICY_RUN: policy.run_id} if policy.run_id else {})})
        same = policy.source == "base" or policy.digest == base_digest
        ev = Evaluator(cfg, inputs, base_dir, policy.path, same, cache)
        metrics: dict[str, float] = {}
        summary: list[dict] = []
        for name in ec.evals:
            t1 = time.perf_counter()
            if name == "shift":
                rows, tables, extra = _shift(ev, shift_src)
            else:
                rows, tables = summarise_eval(ev, name)
                extra = {}
            took = {f"time/{name}_s": time.perf_counter() - t1}
            metrics |= _log_eval(name, rows, tables, extra | took, summary)
            if name == "style" and ec.genai:
                _genai_style(ev.tables("style", "policy"), sty.compile_features(_named(cfg)))
            log.info("evaluate: %s done in %.1f s", name, took[f"time/{name}_s"])
        metrics |= _objectives(cfg, metrics)
        total = time.perf_counter() - t0
        mlflow.log_metric("time/total_s", total)
        log.info("evaluate: %s finished in %.1f s (run %s)", policy.spec, total, run.info.run_id)
        return {"run_id": run.info.run_id, "metrics": metrics | {"time/total_s": total}, "policy": policy.spec,
                "policy_path": str(policy.path), "summary": summary}


def run_pipeline_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The full evaluation of the policy the promote rule will pick from the search's trials.

    Trials are evaluated on what the objectives need; the pick gets every evaluation here, concept
    shift included, as its own run. The promote stage then registers that policy.
    """
    search = find_search_run(cfg.promote.search_run_id, cfg.tracking.experiment)
    uid = search.data.tags.get(Tag.STUDY_UID)
    trials = read_trials(uid) if uid else None
    if trials is None or trials.empty:
        raise PromoteInputError(f"search run {search.info.run_id}: no finished trial to evaluate")
    base_rows = trials[trials["baseline"]]
    if base_rows.empty:
        raise PromoteInputError("the study's plain-DPO baseline trial has not finished; rerun the search worker")
    b = base_rows.iloc[0]
    pick, _ = choose(trials, {"syc_increase": float(b.syc_increase), "on_target": float(b.on_target)}, cfg.promote)
    if not pick.train_run_id:
        raise PromoteInputError(f"trial {pick.trial} (run {pick.run_id}) has no train run to evaluate")
    ecfg = copy.deepcopy(cfg)
    OmegaConf.update(ecfg, "eval.policy", str(pick.train_run_id))
    log.info("evaluate: trial %d (%s), train run %s", pick.trial, pick.shaping or "plain DPO", pick.train_run_id)
    result = run_evaluate(ecfg)
    client = mlflow.MlflowClient()
    for k, v in {Tag.TRIAL_RUN: pick.run_id, Tag.TRIAL_NUMBER: str(int(pick.trial)),
                 Tag.SEARCH_RUN: search.info.run_id}.items():
        client.set_tag(result["run_id"], k, v)
    return {**result, "trial": int(pick.trial), "trial_run_id": pick.run_id}
