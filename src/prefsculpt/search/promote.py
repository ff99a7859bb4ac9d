"""The ``promote`` entry point: pick a policy from the search's Pareto front, register it, gate it.

Everything is read from MLflow, never from local files: the search run names its study
(tag ``prefsculpt.study_uid``); every worker's trial runs carry that tag and their objectives as
metrics (``search/off_target``, ``search/on_target``, ``search/syc_increase``).

Rule (``promote.rule = lowest_off_target``): over the finished trials other than the plain-DPO
baseline that pass the baseline gates, take the lowest off-target (such a trial is on the Pareto
front of the passing ones); ties go to the higher on-target, then to the lower trial number. If none
passes, the same rule over the Pareto front of all the trials picks the one registered as
``candidate`` (it cannot become champion).

Gates (all must pass to move ``champion``; METHOD §7 and issue 7):
- ``sycophancy_vs_baseline``: candidate's sycophancy increase over the base <= ``syc_ratio_max`` (0.5)
  × the plain-DPO baseline's (literally; a baseline that did not increase sycophancy makes this a
  demand that the candidate decreases it by at least half as much);
- ``on_target_vs_baseline``: candidate's on-target accuracy >= baseline's − ``on_target_tolerance``;
- ``off_target_vs_champion`` / ``on_target_vs_champion``: not worse than the current champion on
  either objective (± ``champion_tolerance``); skipped when there is no champion yet (the registry
  says the model or alias does not exist), read inside the promotion lock (issue 15).
Gates fail closed: a gate whose inputs cannot be read or are not finite numbers (the registry call
behind it raised, a metric is missing) fails, and the refusal names the error.
The new version always gets alias ``candidate`` and tags for the audit run, the decisions hash,
the headline metrics, every gate, the decision and the champion it was compared with; a refusal
names each failed gate and its margin or error.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from prefsculpt.core.errors import UserError
from prefsculpt.core.names import Tag
from prefsculpt.search.objective import BASELINE_TAG, OFF, ON, STUDY_TAG, STYLE, SYC, TRIAL_TAG
from prefsculpt.search.study import pareto_mask
from prefsculpt.tracking.runs import latest_stage_run

log = logging.getLogger(__name__)


class PromoteInputError(UserError):
    """No search run, no finished trials, no baseline or no logged model: the message says what to do."""


class PromotionRefused(UserError):
    """Raised only with ``promote.fail_on_refusal``; the message names each failed gate and its margin."""


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    value: float
    limit: float
    #: How far inside (>= 0) or outside (< 0) the limit the value is, in the metric's units.
    margin: float
    rule: str
    #: Why the gate could not be evaluated (it then fails: gates fail closed), else None.
    error: str | None = None

    def text(self) -> str:
        if self.error:
            return f"{self.name} FAILED (could not be checked: {self.error}): {self.rule}"
        state = "passed" if self.passed else "FAILED"
        return f"{self.name} {state}: {self.rule} (value {self.value:.4f}, limit {self.limit:.4f}, margin {self.margin:+.4f})"


def _gate(name: str, value: float, limit: float, upper: bool, rule: str) -> Gate:
    """``value <= limit`` (upper) or ``>=``; a value or limit that is missing or not finite fails it."""
    try:
        value, limit = float(value), float(limit)
    except (TypeError, ValueError) as exc:
        return Gate(name, False, math.nan, math.nan, math.nan, rule, f"{type(exc).__name__}: {exc}")
    if not (math.isfinite(value) and math.isfinite(limit)):
        return Gate(name, False, value, limit, math.nan, rule, f"value {value} or limit {limit} is not a finite number "
                    "(a metric missing from a trial run?)")
    margin = limit - value if upper else value - limit
    return Gate(name, margin >= 0, value, limit, margin, rule)


def failed_gates(names: list[str], rule: str, exc: BaseException) -> list[Gate]:
    """Gates that could not be evaluated because ``exc`` was raised: each fails, naming the error."""
    msg = f"{type(exc).__name__}: {exc}"[:1000]
    return [Gate(n, False, math.nan, math.nan, math.nan, rule, msg) for n in names]


BASELINE_GATES = ["sycophancy_vs_baseline", "on_target_vs_baseline"]
CHAMPION_GATES = ["off_target_vs_champion", "on_target_vs_champion"]


# ---------------------------------------------------------------- gates (pure)
def baseline_gates(cand: dict[str, float], base: dict[str, float], syc_ratio_max: float, tol: float) -> list[Gate]:
    """``cand``/``base``: {syc_increase, on_target}; any error evaluating them fails both (named)."""
    try:
        lim_syc = syc_ratio_max * base["syc_increase"]
        lim_on = base["on_target"] - tol
        return [
            _gate("sycophancy_vs_baseline", cand["syc_increase"], lim_syc, True,
                  f"sycophancy increase over base <= {syc_ratio_max:g} x plain DPO's {base['syc_increase']:.4f}"),
            _gate("on_target_vs_baseline", cand["on_target"], lim_on, False,
                  f"on-target accuracy >= plain DPO's {base['on_target']:.4f} - {tol:g}"),
        ]
    except Exception as exc:  # fail closed: a gate that cannot be computed is not passed
        return failed_gates(BASELINE_GATES, "candidate vs plain DPO", exc)


def skipped_gates(cand: dict[str, float], base: dict[str, float]) -> dict[str, str]:
    """Baseline gates whose metric the data and evaluations could not produce: name -> ``"skipped:
    <reason>"``. Such a gate is recorded on the version as skipped, never counted as passed."""
    out = {}
    if not (math.isfinite(cand["syc_increase"]) and math.isfinite(base["syc_increase"])):
        out["sycophancy_vs_baseline"] = (
            "skipped: no sycophancy metric was measured in the trials (no sycophancy eval set: set "
            "eval.sycophancy.shipped=on or eval.sycophancy.opinion_paths, and keep 'sycophancy' in search.trial_evals)")
    return out


def champion_gates(cand: dict[str, float], champ: dict[str, float] | None, tol: float) -> list[Gate]:
    """``cand``/``champ``: {off_target, on_target}; no champion -> no gate; any error fails both."""
    if champ is None:
        return []
    try:
        lim_off, lim_on = champ["off_target"] + tol, champ["on_target"] - tol
        return [
            _gate("off_target_vs_champion", cand["off_target"], lim_off, True,
                  f"off-target <= champion's {champ['off_target']:.4f} + {tol:g}"),
            _gate("on_target_vs_champion", cand["on_target"], lim_on, False,
                  f"on-target >= champion's {champ['on_target']:.4f} - {tol:g}"),
        ]
    except Exception as exc:
        return failed_gates(CHAMPION_GATES, "candidate vs the current champion", exc)


def refusal_message(gates: list[Gate], champion_alias: str = "champion") -> str | None:
    failed = [g for g in gates if not g.passed]
    if not failed:
        return None
    return f"{champion_alias} not moved: " + "; ".join(
        f"gate {g.name} failed closed, it could not be checked ({g.error})" if g.error else
        f"gate {g.name} failed by {-g.margin:.4f} ({g.rule}: value {g.value:.4f} vs limit {g.limit:.4f})" for g in failed)


def choose(trials: pd.DataFrame, base: dict[str, float], pc: Any) -> tuple[pd.Series, bool]:
    """The trial to register (see module doc) and whether it passed the baseline gates."""
    if pc.rule != "lowest_off_target":
        raise PromoteInputError(f"promote.rule={pc.rule!r}: the only rule is lowest_off_target")
    df = trials.copy()
    df["pareto"] = pareto_mask(df["off_target"].to_numpy(), df["on_target"].to_numpy())
    shaped = df[~df["baseline"]]
    if shaped.empty:
        raise PromoteInputError("the study has no finished trial besides the plain-DPO baseline; run more trials")
    def passes(r: pd.Series) -> bool:
        cand = {"syc_increase": r.syc_increase, "on_target": r.on_target}
        skip = skipped_gates(cand, base)
        return all(g.passed for g in baseline_gates(cand, base, pc.syc_ratio_max, pc.on_target_tolerance)
                   if g.name not in skip)

    ok = shaped.apply(passes, axis=1)
    if ok.any():
        pool = shaped[ok]
    else:  # nothing passes: the best of the front (only the baseline on it: of the rest)
        pool = shaped[shaped["pareto"]] if shaped["pareto"].any() else shaped
    best = pool.sort_values(["off_target", "on_target", "trial"], ascending=[True, False, True]).iloc[0]
    return best, bool(ok.any())


# ---------------------------------------------------------------- reading MLflow
def find_search_run(search_run_id: str | None, experiment: str) -> mlflow.entities.Run:
    """``promote.search_run_id``, else the latest finished search run in ``experiment`` (else anywhere)."""
    client = mlflow.MlflowClient()
    if search_run_id:
        try:
            return client.get_run(search_run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise PromoteInputError(f"promote.search_run_id={search_run_id!r} is not a run here: {exc}") from exc
    exp = client.get_experiment_by_name(experiment)
    ids = [exp.experiment_id] if exp else [e.experiment_id for e in client.search_experiments()]
    found = latest_stage_run("search", ids)
    if found is None:
        raise PromoteInputError("no finished search run: run `mlflow run . -e search` first, or set promote.search_run_id")
    return client.get_run(found)


def read_trials(study_uid: str) -> pd.DataFrame:
    """Every finished trial run of the study (any worker, any experiment) with its objectives."""
    client = mlflow.MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, f"tags.`{STUDY_TAG}` = '{study_uid}' and tags.`{Tag.STAGE}` = 'trial' "
                                   "and attributes.status = 'FINISHED'", max_results=50_000)
    rows = []
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        if OFF not in m or ON not in m:
            continue
        rows.append({"trial": int(t.get(TRIAL_TAG, -1)), "run_id": r.info.run_id, "baseline": t.get(BASELINE_TAG) == "true",
                     "off_target": m[OFF], "on_target": m[ON], "syc_increase": m.get(SYC, np.nan),
                     "style_drift": m.get(STYLE, np.nan), "shaping": t.get(Tag.SHAPING, ""),
                     "model_uri": t.get(Tag.MODEL_URI), "train_run_id": t.get(Tag.TRAIN_RUN),
                     "eval_run_id": t.get(Tag.EVAL_RUN), "audit_run_id": t.get(Tag.AUDIT_RUN),
                     "decisions_hash": t.get(Tag.DECISIONS_HASH)})
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True) if rows else pd.DataFrame()


def champion_metrics(name: str, alias: str) -> tuple[Any, dict[str, float] | None]:
    """(champion version, its {off_target, on_target}); (None, None) only when there is no champion
    (no such model or alias). Any other error raises: the caller fails the champion gates with it."""
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # no registered model of that name yet
            return None, None
        # A missing alias is reported as INVALID_PARAMETER_VALUE, like real errors: ask the model.
        if alias not in client.get_registered_model(name).aliases:
            return None, None
        raise
    rid = mv.tags.get(Tag.TRIAL_RUN)
    m = client.get_run(rid).data.metrics if rid else {}  # an unreadable trial run fails the gates
    if OFF in m and ON in m:
        return mv, {"off_target": m[OFF], "on_target": m[ON]}
    if Tag.OFF_TARGET in mv.tags and Tag.ON_TARGET in mv.tags:
        return mv, {"off_target": float(mv.tags[Tag.OFF_TARGET]), "on_target": float(mv.tags[Tag.ON_TARGET])}
    raise PromoteInputError(f"{alias} {name} version {mv.version} has no recorded objectives (no {OFF}/{ON} on its "
                            f"trial run {rid or '(none tagged)'}, no {Tag.OFF_TARGET} tags): it cannot be compared with")


def read_champion(name: str, alias: str, cand: dict[str, float], tol: float) -> tuple[Any, list[Gate]]:
    """Inside the promotion lock: the current champion version (None: there is none) and the gates
    against it. Failing to read it fails both champion gates, naming the error (never skips them)."""
    try:
        mv, champ = champion_metrics(name, alias)
    except Exception as exc:
        log.warning("promote: could not read %s of %s: %s: %s", alias, name, type(exc).__name__, exc)
        return None, failed_gates(CHAMPION_GATES, f"candidate vs the current {alias}", exc)
    return mv, champion_gates(cand, champ, tol)


def register(name: str, pick: pd.Series) -> Any:
    """The model version of ``pick``'s policy: reused if this trial was registered before."""
    client = mlflow.MlflowClient()
    found = client.search_model_versions(f"name = '{name}' and tags.`{Tag.TRIAL_RUN}` = '{pick.run_id}'")
    if found:
        return found[0]
    if not pick.model_uri:
        raise PromoteInputError(f"trial {pick.trial} (run {pick.run_id}) logged no model: train with train.log_model=true")
    return mlflow.register_model(str(pick.model_uri), name, tags={Tag.TRIAL_RUN: str(pick.run_id)})


def attach_artifacts(audit_run_id: str | None, eval_run_id: str | None) -> None:
    """Concept report and decisions of the audit, evaluation table of the pick: artifacts of this run."""
    with tempfile.TemporaryDirectory(prefix="prefsculpt-promote-") as tmp:
        for rid, path in ((audit_run_id, "audit/report.html"), (audit_run_id, "audit/decisions.yaml"),
                          (eval_run_id, "evals/summary.json")):
            if not rid:
                continue
            try:
                got = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path, dst_path=tmp)
                mlflow.log_artifact(got, "promote")
            except (mlflow.exceptions.MlflowException, OSError) as exc:
                log.warning("promote: could not attach %s of run %s: %s", path, rid, exc)
