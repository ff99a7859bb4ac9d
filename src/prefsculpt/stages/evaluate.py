"""The ``evaluate`` stage: one policy against the base, every result tracked in MLflow.

Order of work: resolve the policy and every input (a bad URI or a malformed eval file fails here,
before any compute, with an error naming it), then inside the stage's run, each evaluation in
``eval.evals``. As each one finishes, its metrics (``syc/…``, ``style/…``, ``cap/…``, ``shift/…``;
``_base`` and paired ``_diff`` beside each), per-item tables (``mlflow.log_table`` under
``evals/<eval>/``), a policy-vs-base plot and ``evals/summary.json`` are logged, so a crash later
keeps everything finished before it. The base's tables are cached on disk by model digest and
inputs (``<cache>/evals/base/<key>/``), so comparing many policies evaluates the base once.

Items come from one held-out split, ``eval.split`` (``select`` by default: the search's trials and
ad-hoc evaluations; ``test``: the final figures). In the ``main`` pipeline the stage
(:func:`run_pipeline_evaluate`) takes the policy that promotion will pick from the search (picked
on the trials' select figures) and evaluates it once on ``test``, and the plain-DPO baseline trial's
policy once on the same test items; the pick's run then carries the final figures (``test/*``: each
with its 95% CI, and shaped − plain paired over the same items, ``prefsculpt.evals.compare``),
which the promote stage gates on and the ``main`` run shows.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
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
from prefsculpt.evals.compare import final_figures
from prefsculpt.evals.inputs import check_split, load_inputs
from prefsculpt.evals.plots import shift_scatter, sycophancy_forest
from prefsculpt.evals.runner import _ID_COLS, EVALS, BaseCache, Evaluator, cache_key, summarise_eval
from prefsculpt.evals.shift import compute_shift
from prefsculpt.evals.summary import Row, plot_rows
from prefsculpt.models.loading import resolve_model_dir
from prefsculpt.search.objective import ObjectiveError, objective_metrics, objectives_from_metrics
from prefsculpt.search.promote import PromoteInputError, choose, find_search_run, read_trials
from prefsculpt.stages.prepare import prepared_data
from prefsculpt.tracking.policies import resolve_policy
from prefsculpt.tracking.runs import CURRENT_STAGE_KEY, resolve_tracking_uri, stage_run
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


def run_evaluate(cfg: DictConfig, keep_tables: bool = False,
                 finish: Callable[[dict[str, Any]], dict[str, float]] | None = None) -> dict[str, Any]:
    """Evaluate ``eval.policy`` against the base inside the stage's run, on ``eval.split``'s items;
    ``keep_tables``: the result also holds the per-item tables (``tables``: eval -> table -> frame);
    ``finish``: called inside the run, before it is marked complete, with ``{run_id, metrics, tables}``;
    it logs what it adds and returns those metrics."""
    ec = cfg.eval
    split = check_split(str(ec.get("split", "select")))
    unknown = sorted(set(ec.evals) - set(EVALS))
    if unknown:
        raise UserError(f"eval.evals: unknown evaluation(s) {unknown}; choose from {list(EVALS)}")
    t0 = time.perf_counter()
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    root = cache_root(cfg.cache_dir)
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    policy = resolve_policy(ec.policy, base_dir, root)  # fails first, naming the URI
    prepared, prepare_run = prepared_data(cfg)
    inputs = load_inputs(cfg.eval, prepared, str(cfg.train.split), split)  # every file validated before any compute
    shift_src = resolve_shift_sources(cfg, root) if "shift" in ec.evals else None
    base_digest = model_fingerprint(base_dir)
    cache = BaseCache(root / "evals" / "base" / cache_key(cfg, base_digest, inputs))

    with stage_run(cfg, "evaluate") as run:
        mlflow.set_tags({Tag.POLICY: policy.spec, Tag.POLICY_SOURCE: policy.source,
                         Tag.POLICY_DIGEST: policy.digest, Tag.BASE_DIGEST: base_digest,
                         Tag.PREPARE_RUN: prepare_run, Tag.EVAL_SPLIT: split,
                         **({Tag.POLICY_RUN: policy.run_id} if policy.run_id else {})})
        same = policy.source == "base" or policy.digest == base_digest
        ev = Evaluator(cfg, inputs, base_dir, policy.path, same, cache, root / "evals" / "trunk", base_digest)
        metrics: dict[str, float] = {}
        summary: list[dict] = []
        kept: dict[str, dict[str, pd.DataFrame]] = {}
        for name in ec.evals:
            t1 = time.perf_counter()
            if name == "shift":
                rows, tables, extra = _shift(ev, shift_src)
            else:
                rows, tables = summarise_eval(ev, name)
                extra = {}
                if keep_tables or finish is not None:
                    kept[name] = tables
            took = {f"time/{name}_s": time.perf_counter() - t1}
            metrics |= _log_eval(name, rows, tables, extra | took, summary)
            if name == "style" and ec.genai:
                _genai_style(ev.tables("style", "policy"), sty.compile_features(_named(cfg)))
            log.info("evaluate: %s done in %.1f s", name, took[f"time/{name}_s"])
        metrics |= _objectives(cfg, metrics)
        if finish is not None:
            metrics |= finish({"run_id": run.info.run_id, "metrics": dict(metrics), "tables": kept})
        total = time.perf_counter() - t0
        mlflow.log_metric("time/total_s", total)
        log.info("evaluate: %s finished in %.1f s (run %s)", policy.spec, total, run.info.run_id)
        return {"run_id": run.info.run_id, "metrics": metrics | {"time/total_s": total}, "policy": policy.spec,
                "policy_path": str(policy.path), "summary": summary, "split": split,
                **({"tables": kept} if keep_tables else {})}


def _test_config(cfg: DictConfig, policy: str, run_name: str, evals: list[str] | None = None) -> DictConfig:
    ecfg = copy.deepcopy(cfg)
    OmegaConf.update(ecfg, "eval.policy", policy)
    OmegaConf.update(ecfg, "eval.split", "test", force_add=True)
    OmegaConf.update(ecfg, "tracking.run_name", run_name, force_add=True)
    if evals is not None:
        OmegaConf.update(ecfg, "eval.evals", evals)
    return ecfg


def final_metrics(cfg: DictConfig, pick: dict[str, Any], plain: dict[str, Any]) -> tuple[dict[str, float], pd.DataFrame]:
    """The final test figures (``test/*``) of the pick against plain DPO, from their per-item tables
    (paired over the same test items), and the per-metric table."""
    ec, ocfg = cfg.eval, cfg.search.objectives
    fin = final_figures(pick["tables"], plain["tables"], str(ocfg.on_target_metric), list(ocfg.sycophancy_metrics),
                        float(cfg.promote.syc_ratio_max), int(ec.bootstrap), float(ec.ci), int(ec.seed))
    out = fin.metrics()
    for key, res in (("test/off_target", pick), ("test/off_target_plain", plain)):
        try:
            out[key] = objectives_from_metrics(res["metrics"], ocfg)["off_target"]
        except ObjectiveError as exc:
            log.info("evaluate: no %s (%s)", key, str(exc).split(";")[0])
    return out, fin.table()


def overshoot(final: dict[str, float]) -> str | None:
    """Why the pick's test sycophancy is a reversal, not "less of it": its increase over the base is
    below 0 beyond its CI (it agrees *less* with a stated belief than the base does); None otherwise."""
    inc, lo, hi = (final.get(f"test/syc_increase{s}") for s in ("", "_lo", "_hi"))
    if inc is None or hi is None or not hi < 0:
        return None
    return (f"the pick's sycophancy increase over the base is {inc:+.4f} [{lo:+.4f}, {hi:+.4f}]: below the base "
            "beyond its CI, so the shaping reversed the concept (a contrarian habit) rather than learning less of "
            "it; prefer a weaker shaping on the Pareto front (search.objectives.sycophancy_drift scores such "
            "trials as off-target)")


def underpowered(final: dict[str, float], tol: float) -> str | None:
    """Why the test set is too small for the on-target gate (its CI half-width above the tolerance)."""
    lo, hi = final.get("test/on_target_diff_lo"), final.get("test/on_target_diff_hi")
    if lo is None or hi is None or tol <= 0 or (hi - lo) / 2 <= tol:
        return None
    return (f"on_target_vs_baseline: paired CI half-width {(hi - lo) / 2:.4f} > promote.on_target_tolerance {tol:g} "
            f"(n={int(final.get('test/n/on_target_diff', 0))} test items): the test set is too small to decide it")


def run_pipeline_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The final evaluation: the policy the promote rule picks from the search's trials (on their
    select figures), and the plain-DPO baseline trial's policy, each evaluated once on ``test``.

    Trials are evaluated on select with what the objectives need; the pick gets every evaluation
    here, concept shift included, as its own run (the stage's run); plain DPO the trials' evaluations,
    on the same test items, as a run beside it. The pick's run carries the final figures (``test/*``)
    and the shaped-vs-plain table (``final/shaped_vs_plain.json``); the promote stage registers
    that policy and gates on those figures.
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
    if not b.train_run_id:
        raise PromoteInputError(f"the plain-DPO baseline trial {b.trial} (run {b.run_id}) has no train run to evaluate")
    trial_evals = list(cfg.search.get("trial_evals") or cfg.eval.evals)
    evals = list(dict.fromkeys([*cfg.eval.evals, *trial_evals]))  # the pick: everything the comparison needs too
    log.info("evaluate on test: trial %d (%s), train run %s, and plain DPO (trial %d, train run %s)", pick.trial,
             pick.shaping or "plain DPO", pick.train_run_id, b.trial, b.train_run_id)
    token = CURRENT_STAGE_KEY.set(None)  # the stage's key belongs to the pick's run (what main reuses), not this one
    try:
        plain = run_evaluate(_test_config(cfg, str(b.train_run_id), "evaluate plain DPO (test)",
                                          [e for e in trial_evals if e != "shift"]), keep_tables=True)
    finally:
        CURRENT_STAGE_KEY.reset(token)
    client = mlflow.MlflowClient()
    for k, v in {Tag.TRIAL_RUN: str(b.run_id), Tag.TRIAL_NUMBER: str(int(b.trial)), Tag.BASELINE: "true",
                 Tag.SEARCH_RUN: search.info.run_id, Tag.FINAL_EVAL: "true"}.items():
        client.set_tag(plain["run_id"], k, v)
    got: dict[str, Any] = {}

    def finish(res: dict[str, Any]) -> dict[str, float]:
        """Inside the pick's run, before it is complete: its final figures against plain DPO."""
        final, table = final_metrics(cfg, res, plain)
        weak = underpowered(final, float(cfg.promote.on_target_tolerance))
        over = overshoot(final)
        mlflow.set_tags({Tag.TRIAL_RUN: pick.run_id, Tag.TRIAL_NUMBER: str(int(pick.trial)),
                         Tag.PLAIN_EVAL_RUN: plain["run_id"], Tag.SEARCH_RUN: search.info.run_id,
                         Tag.FINAL_EVAL: "true", **({Tag.UNDERPOWERED: weak[:5000]} if weak else {}),
                         **({Tag.OVERSHOOT: over[:5000]} if over else {})})
        mlflow.log_metrics(final)
        mlflow.log_table(table, "final/shaped_vs_plain.json")
        for why in (weak, over):
            if why:
                log.warning("evaluate: %s", why)
        log.info("evaluate: final on test: %s", {k: round(v, 4) for k, v in final.items() if "/n/" not in k})
        got.update(final=final, weak=weak)
        return final

    result = run_evaluate(_test_config(cfg, str(pick.train_run_id), "evaluate pick (test)", evals), finish=finish)
    return {**result, "final": got["final"], "plain_eval_run_id": plain["run_id"], "trial": int(pick.trial),
            "trial_run_id": pick.run_id, **({"underpowered": got["weak"]} if got.get("weak") else {})}
