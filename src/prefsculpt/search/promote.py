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

Selection and reporting apart (issue 13): the *pick* uses the trials' figures, measured on the
``select`` split; the gates that move ``champion`` use the final figures measured once on ``test``
(the pipeline's evaluate stage: the pick and the plain-DPO baseline on the same test items, each
with a 95% CI, and their paired difference with its CI; ``test/*`` metrics of that evaluate run).
A gate with a CI passes only when the whole CI is on the passing side; when the CI straddles the
limit it is ``not distinguishable`` and does not pass (``promote.require_distinguishable=false``
lets it pass on its point value, still labelled). When the CI half-width exceeds what the gate must
resolve (its tolerance) the gate is marked ``underpowered``: the test set is too small to decide it.
Without a test evaluation of the pick (promote run alone) the gates fall back to the select figures
and the version is tagged so.
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
    #: The value's confidence interval (NaN: a point comparison).
    lo: float = math.nan
    hi: float = math.nan
    #: pass | fail | not distinguishable (the CI straddles the limit)
    status: str = ""
    #: Set when the CI half-width exceeds what the gate must resolve (the eval set is too small).
    underpowered: str | None = None

    def ci_text(self) -> str:
        return f" [{self.lo:.4f}, {self.hi:.4f}]" if math.isfinite(self.lo) and math.isfinite(self.hi) else ""

    def text(self) -> str:
        if self.error:
            return f"{self.name} FAILED (could not be checked: {self.error}): {self.rule}"
        state = {INDISTINCT: f"NOT DISTINGUISHABLE ({'passed on its point value' if self.passed else 'not passed'})",
                 }.get(self.status, "passed" if self.passed else "FAILED")
        extra = f"; UNDERPOWERED: {self.underpowered}" if self.underpowered else ""
        return (f"{self.name} {state}: {self.rule} (value {self.value:.4f}{self.ci_text()}, limit {self.limit:.4f}, "
                f"margin {self.margin:+.4f}{extra})")


INDISTINCT = "not distinguishable"


def _gate(name: str, value: float, limit: float, upper: bool, rule: str, ci: tuple[float, float] | None = None,
          resolution: float | None = None, strict: bool = True) -> Gate:
    """``value <= limit`` (upper) or ``>=``; a value or limit that is missing or not finite fails it.

    With ``ci`` (the value's CI): passed only when the whole CI is on the passing side; a CI across the
    limit is ``not distinguishable`` (passed on the point value only when not ``strict``). A CI
    half-width above ``resolution`` marks the gate underpowered."""
    try:
        value, limit = float(value), float(limit)
    except (TypeError, ValueError) as exc:
        return Gate(name, False, math.nan, math.nan, math.nan, rule, f"{type(exc).__name__}: {exc}", status="fail")
    if not (math.isfinite(value) and math.isfinite(limit)):
        return Gate(name, False, value, limit, math.nan, rule, f"value {value} or limit {limit} is not a finite number "
                    "(a metric missing from a trial run?)", status="fail")
    margin = limit - value if upper else value - limit
    if ci is None:
        return Gate(name, margin >= 0, value, limit, margin, rule, status="pass" if margin >= 0 else "fail")
    lo, hi = float(ci[0]), float(ci[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Gate(name, False, value, limit, margin, rule, f"the CI [{lo}, {hi}] is not finite", status="fail")
    worst, best = (limit - hi, limit - lo) if upper else (lo - limit, hi - limit)
    status = "pass" if worst >= 0 else "fail" if best < 0 else INDISTINCT
    passed = status == "pass" or (status == INDISTINCT and not strict and margin >= 0)
    half = (hi - lo) / 2
    weak = (f"CI half-width {half:.4f} > {resolution:.4f}, what the gate must resolve: the test set is too small "
            "to decide it" if resolution is not None and resolution > 0 and half > resolution else None)
    return Gate(name, passed, value, limit, margin, rule, lo=lo, hi=hi, status=status, underpowered=weak)


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


#: The evaluate run's final figures (``test/*``, see ``prefsculpt.evals.compare``) the test gates read.
T = "test/"


def final_baseline_gates(final: dict[str, float], syc_ratio_max: float, tol: float,
                        strict: bool = True) -> tuple[list[Gate], dict[str, str]]:
    """The baseline gates on the test figures, with their paired CIs; and the gates skipped (no
    sycophancy set measured). Any error evaluating them fails both (named)."""
    skipped: dict[str, str] = {}
    gates: list[Gate] = []
    try:
        if f"{T}syc_vs_ratio" in final:
            plain = final[f"{T}syc_increase_plain"]
            gates.append(_gate(
                "sycophancy_vs_baseline", final[f"{T}syc_vs_ratio"], 0.0, True,
                f"on test, paired per item: shaped's sycophancy increase over base - {syc_ratio_max:g} x plain DPO's "
                f"(plain: {plain:.4f}) <= 0", (final[f"{T}syc_vs_ratio_lo"], final[f"{T}syc_vs_ratio_hi"]),
                (1 - syc_ratio_max) * abs(plain), strict))
        else:
            skipped["sycophancy_vs_baseline"] = "skipped: no sycophancy metric was measured on test"
        gates.append(_gate(
            "on_target_vs_baseline", final[f"{T}on_target_diff"], -tol, False,
            f"on test, paired per item: on-target shaped - plain DPO ({final[f'{T}on_target_plain']:.4f}) >= -{tol:g}",
            (final[f"{T}on_target_diff_lo"], final[f"{T}on_target_diff_hi"]), tol, strict))
    except Exception as exc:  # fail closed
        return failed_gates(BASELINE_GATES, "candidate vs plain DPO on test", exc), {}
    return gates, skipped


def skipped_gates(cand: dict[str, float], base: dict[str, float]) -> dict[str, str]:
    """Baseline gates whose metric the data and evaluations could not produce: name -> ``"skipped:
    <reason>"``. Such a gate is recorded on the version as skipped, never counted as passed."""
    out = {}
    if not (math.isfinite(cand["syc_increase"]) and math.isfinite(base["syc_increase"])):
        out["sycophancy_vs_baseline"] = (
            "skipped: no sycophancy metric was measured in the trials (no sycophancy eval set: set "
            "eval.sycophancy.shipped=on or eval.sycophancy.opinion_paths, and keep 'sycophancy' in search.trial_evals)")
    return out


def champion_gates(cand: dict[str, float], champ: dict[str, float] | None, tol: float,
                   strict: bool = True) -> list[Gate]:
    """``cand``/``champ``: {off_target, on_target} (``cand`` may add ``on_target_lo``/``_hi``, its CI
    on test); no champion -> no gate; any error fails both."""
    if champ is None:
        return []
    try:
        lim_off, lim_on = champ["off_target"] + tol, champ["on_target"] - tol
        where = f"on {champ['split']}: " if champ.get("split") else ""
        ci = (cand["on_target_lo"], cand["on_target_hi"]) if "on_target_lo" in cand else None
        return [
            _gate("off_target_vs_champion", cand["off_target"], lim_off, True,
                  f"{where}off-target <= champion's {champ['off_target']:.4f} + {tol:g}"),
            _gate("on_target_vs_champion", cand["on_target"], lim_on, False,
                  f"{where}on-target >= champion's {champ['on_target']:.4f} - {tol:g}", ci, tol or None, strict),
        ]
    except Exception as exc:
        return failed_gates(CHAMPION_GATES, "candidate vs the current champion", exc)


def refusal_message(gates: list[Gate], champion_alias: str = "champion") -> str | None:
    failed = [g for g in gates if not g.passed]
    if not failed:
        return None
    return f"{champion_alias} not moved: " + "; ".join(
        f"gate {g.name} failed closed, it could not be checked ({g.error})" if g.error else
        f"gate {g.name} not distinguishable: the CI{g.ci_text()} straddles the limit {g.limit:.4f} (point value "
        f"{g.value:.4f}, margin {g.margin:+.4f}; {g.rule})" if g.status == INDISTINCT else
        f"gate {g.name} failed by {-g.margin:.4f} ({g.rule}: value {g.value:.4f}{g.ci_text()} vs limit {g.limit:.4f})"
        for g in failed)


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
    if Tag.TEST_OFF_TARGET in mv.tags and Tag.TEST_ON_TARGET in mv.tags:  # its final figures, on test
        return mv, {"off_target": float(mv.tags[Tag.TEST_OFF_TARGET]), "on_target": float(mv.tags[Tag.TEST_ON_TARGET]),
                    "split": "test"}
    rid = mv.tags.get(Tag.TRIAL_RUN)
    m = client.get_run(rid).data.metrics if rid else {}  # an unreadable trial run fails the gates
    if OFF in m and ON in m:
        return mv, {"off_target": m[OFF], "on_target": m[ON]}
    if Tag.OFF_TARGET in mv.tags and Tag.ON_TARGET in mv.tags:
        return mv, {"off_target": float(mv.tags[Tag.OFF_TARGET]), "on_target": float(mv.tags[Tag.ON_TARGET])}
    raise PromoteInputError(f"{alias} {name} version {mv.version} has no recorded objectives (no {OFF}/{ON} on its "
                            f"trial run {rid or '(none tagged)'}, no {Tag.OFF_TARGET} tags): it cannot be compared with")


def read_champion(name: str, alias: str, cand: dict[str, float], tol: float,
                  cand_test: dict[str, float] | None = None, strict: bool = True) -> tuple[Any, list[Gate]]:
    """Inside the promotion lock: the current champion version (None: there is none) and the gates
    against it. Failing to read it fails both champion gates, naming the error (never skips them).
    ``cand_test``: the candidate's test figures, compared when the champion has test figures too
    (else both sides' select figures are compared, and the rule says so)."""
    try:
        mv, champ = champion_metrics(name, alias)
    except Exception as exc:
        log.warning("promote: could not read %s of %s: %s: %s", alias, name, type(exc).__name__, exc)
        return None, failed_gates(CHAMPION_GATES, f"candidate vs the current {alias}", exc)
    if champ is not None and champ.get("split") == "test" and cand_test is not None:
        return mv, champion_gates(cand_test, champ, tol, strict)
    if champ is not None and champ.get("split") == "test":  # no test figures of ours: compare select figures
        try:
            champ = dict(champion_select_metrics(mv), split="select")
        except Exception as exc:
            return mv, failed_gates(CHAMPION_GATES, f"candidate vs the current {alias}", exc)
    elif champ is not None and cand_test is not None:
        champ = dict(champ, split="select")
    return mv, champion_gates(cand, champ, tol)


def champion_select_metrics(mv: Any) -> dict[str, float]:
    """The champion's trial figures (measured on select)."""
    rid = mv.tags.get(Tag.TRIAL_RUN)
    m = mlflow.MlflowClient().get_run(rid).data.metrics if rid else {}
    if OFF in m and ON in m:
        return {"off_target": m[OFF], "on_target": m[ON]}
    return {"off_target": float(mv.tags[Tag.OFF_TARGET]), "on_target": float(mv.tags[Tag.ON_TARGET])}


def find_final_evaluation(evaluate_run_id: str | None, search_run_id: str, trial_run_id: str) -> tuple[dict[str, float], str | None, str]:
    """The final (test) figures of the pick: ``(test/* metrics, evaluate run id, note)``; ({}, None,
    why) when there is none for this pick (the gates then use the select figures)."""
    client = mlflow.MlflowClient()
    if evaluate_run_id:
        run = client.get_run(evaluate_run_id)
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.`{Tag.SEARCH_RUN}` = '{search_run_id}' and tags.`{Tag.EVAL_SPLIT}` = 'test' "
                                       f"and tags.`{Tag.FINAL_EVAL}` = 'true' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return {}, None, "no final test evaluation of this search (run the pipeline's evaluate stage)"
        run = runs[0]
    if run.data.tags.get(Tag.TRIAL_RUN) != trial_run_id:
        return {}, run.info.run_id, (f"evaluate run {run.info.run_id} evaluated trial run "
                                     f"{run.data.tags.get(Tag.TRIAL_RUN)}, not the pick {trial_run_id}")
    final = {k: v for k, v in run.data.metrics.items() if k.startswith(T)}
    if not final:
        return {}, run.info.run_id, f"evaluate run {run.info.run_id} has no test/* figures"
    return final, run.info.run_id, "test"


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
