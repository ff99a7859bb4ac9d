"""The pipeline's ``evaluate`` stage: the full evaluation of the policy the promote rule will pick.

Trials are evaluated on what the objectives need; the policy that :func:`promote.choose` picks from
the Pareto front gets every evaluation here, concept shift included (SAE-encoded rollouts against
the audit's predicted effects), as its own child run. The promote stage then registers that policy.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from prefsculpt.search.objective import STUDY_TAG
from prefsculpt.search.promote import PromoteInputError, choose, find_search_run, read_trials

log = logging.getLogger(__name__)


def run_final_evaluate(cfg: DictConfig) -> dict[str, Any]:
    from prefsculpt.evals.stage import run_evaluate

    search = find_search_run(cfg)
    uid = search.data.tags.get(STUDY_TAG)
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
    for k, v in {"prefsculpt.trial_run_id": pick.run_id, "prefsculpt.trial_number": str(int(pick.trial)),
                 "prefsculpt.search_run_id": search.info.run_id}.items():
        client.set_tag(result["run_id"], k, v)
    return {**result, "trial": int(pick.trial), "trial_run_id": pick.run_id}
