"""The ``search`` stage: one Optuna worker over the audit's hypotheses (see ``prefsculpt.search``).

Each trial is a nested MLflow run whose runner is the ``train`` stage then the ``evaluate`` stage on
the trial's shaping; several workers (processes or machines) share one study through its storage.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from prefsculpt.config import policy_log_mode
from prefsculpt.core import paths
from prefsculpt.core.faults import fault_point
from prefsculpt.core.names import Attr, Tag
from prefsculpt.search import inputs as I
from prefsculpt.search import objective as O
from prefsculpt.search.plots import log_parallel
from prefsculpt.search.space import SpaceBounds, build_candidates, start_params
from prefsculpt.search.study import (
    log_hypervolume,
    log_results,
    open_storage,
    open_study,
    remaining_seconds,
    run_worker,
    storage_url,
    trials_table,
)
from prefsculpt.stages.evaluate import run_evaluate
from prefsculpt.stages.prepare import prepared_data
from prefsculpt.stages.train import run_train
from prefsculpt.tracking.models import trial_model_uri
from prefsculpt.tracking.runs import stage_run

log = logging.getLogger(__name__)


def train_and_evaluate(cfg: DictConfig) -> O.Outcome:
    """The trial's runner: the train stage on ``cfg`` (nested under the active trial run), then the
    evaluate stage on its policy. A trial logs only its trained layers (``train.log_policy`` unset:
    ``delta``; ``train.log_model=false``: nothing); :func:`log_front_policies` logs full models later."""
    if cfg.train.get("log_policy") is None:
        cfg = copy.deepcopy(cfg)
        OmegaConf.update(cfg, "train.log_policy", policy_log_mode(cfg.train, default_full="delta"))
    tr = run_train(cfg)
    ecfg = copy.deepcopy(cfg)
    OmegaConf.update(ecfg, "eval.policy", tr["run_id"])
    ev = run_evaluate(ecfg)
    return O.Outcome(tr["run_id"], ev["run_id"], tr.get("model_uri"), dict(ev["metrics"]))


def log_front_policies(df: pd.DataFrame, cfg: DictConfig, cache_root: Any) -> dict[int, str]:
    """Full models for the complete Pareto-front trials that logged only a policy delta: assembled
    from base + delta, logged on this search run and tagged on the trial run (``prefsculpt.model_uri``),
    so promote can register any of them and the registry serve it. The other trials keep only their
    trained layers in the artifact store. A failure is logged and skipped: promote assembles its pick
    itself. Returns {trial number: model URI} of the trials this call gave a full model."""
    if df.empty:
        return {}
    front = df[df["pareto"] & (df["state"] == "COMPLETE")]
    out = {}
    for r in front.itertuples():
        if r.model_uri or not r.train_run_id or not r.mlflow_run_id:
            continue
        try:
            uri = trial_model_uri(r.mlflow_run_id, r.train_run_id, None, cfg.get("model"), cache_root)
        except Exception as exc:  # noqa: BLE001 - the search's result stands; promote retries its pick
            log.warning("search: could not log the full policy of Pareto trial %d (train run %s): %s: %s",
                        r.trial, r.train_run_id, type(exc).__name__, exc)
            continue
        if uri:
            out[int(r.trial)] = uri
    if out:
        mlflow.log_dict({str(k): v for k, v in out.items()}, "search/front_policies.json")
        log.info("search: full policies logged for Pareto trials %s", sorted(out))
    return out


def run_search(cfg: DictConfig, runner: O.Runner | None = None) -> dict[str, Any]:
    """One search worker. ``runner`` replaces train + evaluate (tests inject a cheap one)."""
    sc = cfg.search
    cache_root = paths.cache_root(cfg.cache_dir)
    if runner is None:
        # Every trial trains and evaluates on one prepared artifact: resolve it (or prepare it) once,
        # here, so no trial opens a prepare run of its own inside its run.
        OmegaConf.update(cfg, "data.prepared_run_id", prepared_data(cfg)[1])
    url = storage_url(sc.storage)
    storage, lock = open_storage(url, sc)
    with stage_run(cfg, "search") as run:
        pinned = I.pinned_audit_run(storage, sc.study_name)
        audit_id = I.find_audit_run(sc.audit_run_id, run.info.run_id, pinned)
        hyp, decisions, dhash = I.load_audit(audit_id, sc.decisions, cache_root)
        sources = I.resolve_sources(list(sc.methods), cfg.shaping, audit_id, cache_root)
        candidates, skipped = build_candidates(hyp, decisions, sc.top_k, list(sc.methods), list(sc.actions),
                                               sc.allow_pins, I.feasibility(cfg.shaping, list(cfg.named_concepts), sources, hyp))
        attrs = {Attr.AUDIT_RUN: audit_id, **({Attr.DECISIONS_HASH: dhash} if dhash else {})}
        bounds = SpaceBounds(sc.lambda_min, sc.lambda_max, sc.share_min, sc.share_max,
                             cfg.shaping.filter_mode)
        start = start_params(candidates, bounds) if sc.get("informed_start", True) and candidates else None
        study, created = open_study(sc, storage, lock, candidates, attrs, start=start)
        uid = str(study.user_attrs[Attr.UID])
        mlflow.set_tags({Tag.STUDY_NAME: sc.study_name, Tag.STUDY_UID: uid,
                         Tag.STORAGE: url.split("@")[-1], Tag.AUDIT_RUN: audit_id,
                         Tag.STUDY_CREATOR: str(created).lower(), **({Tag.DECISIONS_HASH: dhash} if dhash else {})})
        mlflow.log_table(pd.DataFrame([{"concept": c.concept, "rank": c.rank, "fixed": c.fixed,
                                        "methods": ",".join(c.methods), "actions": ",".join(c.actions)}
                                       for c in candidates] + [{"concept": s["concept"], "skipped": s["reason"]}
                                                               for s in skipped]), "search/candidates.json")
        if sc.get("create_only", False):
            mlflow.set_tag(Tag.CREATE_ONLY, "true")
            log.info("search: study %r ready with %d trials planned; start the workers (search.create_only=false)",
                     sc.study_name, int(study.user_attrs[Attr.PLANNED]))
            return {"run_id": run.info.run_id, "study_name": sc.study_name, "study_uid": uid, "storage": url,
                    "audit_run_id": audit_id, "decisions_hash": dhash, "trials_ran": [], "created": created,
                    "candidates": [c.concept for c in candidates]}
        ctx = O.TrialContext(cfg, candidates, bounds, uid, sources, dhash, runner or train_and_evaluate)
        poll = float(sc.heartbeat_interval) if hasattr(storage, "get_heartbeat_interval") else None
        def objective(trial: Any) -> tuple[float, float]:
            fault_point("search", "trial")  # PREFSCULPT_FAULT_AFTER=2: killed as the 2nd trial starts
            return O.run_trial(trial, ctx)

        tol = cfg.promote.on_target_tolerance
        ran = run_worker(study, objective, poll_s=poll, storage=storage, lock=lock,
                         after_trial=lambda st: log_hypervolume(trials_table(st), tol),
                         time_budget_s=sc.get("time_budget_s"),
                         eta=lambda st: remaining_seconds(st, sc.get("early_stop")))
        O.close_dead_trials(study)
        df = trials_table(study)
        metrics = log_results(df, tol)
        log_parallel(study, df)
        front_models = log_front_policies(df, cfg, cache_root)
        mlflow.log_metric("search/n_ran_here", float(len(ran)))
    log.info("search: this worker ran trials %s; study %r has %d complete, %d failed, %d on the Pareto front",
             ran, sc.study_name, metrics["search/n_complete"], metrics["search/n_fail"], metrics["search/n_pareto"])
    return {"run_id": run.info.run_id, "study_name": sc.study_name, "study_uid": uid, "storage": url,
            "audit_run_id": audit_id, "decisions_hash": dhash, "trials_ran": ran, "metrics": metrics,
            "pareto": df[df["pareto"]].to_dict("records"), "candidates": [c.concept for c in candidates],
            "front_models": front_models}
