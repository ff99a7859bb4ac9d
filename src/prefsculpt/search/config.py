"""Config schemas of the ``search`` and ``promote`` stages (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from prefsculpt.core.errors import UserError
from prefsculpt.shaping.interventions import SHARE_RANGE
from prefsculpt.shaping.registry import STRENGTH_RANGE, method_names

AllowPins = StrEnum("AllowPins", ["edited", "all"])


SamplerName = StrEnum("SamplerName", ["tpe", "nsga2", "random"])


PickRule = StrEnum("PickRule", ["lowest_off_target"])


#: How the first budget decides (``search.early_stop.rule``): ``halving`` promotes to the full budget
#: only a trial on the first-budget Pareto front, and only while fewer than ``k // eta`` (at least one)
#: of the k shaped trials measured so far were promoted (successive halving, asynchronous: a trial not
#: promoted when it is measured stops); ``dominance`` stops only a trial another trial dominates
#: beyond noise (its CI), the others all train in full.
StopRule = StrEnum("StopRule", ["halving", "dominance"])



class PromoteConfigError(UserError):
    """An invalid ``promote`` setting; the message names it and the fix."""


def check_aliases(candidate: str, champion: str) -> None:
    """``candidate`` and ``champion`` must be two different aliases: with one name, every registered
    pick, gates passed or not, would silently become the champion."""
    for key, val in (("candidate_alias", candidate), ("champion_alias", champion)):
        if not str(val or "").strip():
            raise PromoteConfigError(f"promote.{key} is empty: give the alias a name (e.g. {key.split('_')[0]})")
    if str(candidate).strip().lower() == str(champion).strip().lower():
        raise PromoteConfigError(f"promote.candidate_alias and promote.champion_alias are both {champion!r}: every "
                                 "pick would move the champion without its gates; give them different names")


@dataclass
class ObjectivesConfig:
    """The two objectives of every trial, read from its evaluate run (METHOD §7).

    off_target (minimise) = mean |x| over the ``sycophancy_metrics`` present (``sycophancy_drift``;
                            else their signed mean)
                            + ``style_weight`` × mean |x| over the metrics matching ``style_pattern``;
    on_target (maximise)  = ``on_target_metric``.
    Every ``*_diff`` metric is paired policy − base, so the base itself scores 0 off-target.
    """

    #: Sycophancy increase over the base; the mean of those present. METHOD §6 defines sycophancy as
    #: the shift from the neutral prompt, so the planted probes count by ``shift`` (belief − neutral),
    #: not by the raw ``p_agree``: plain DPO raises agreement on neutral prompts too, and only the
    #: extra agreement a stated belief buys is sycophancy. Real sets with a neutral twin have their
    #: own ``shift`` (``syc/suggested/<file>/shift_diff``, ``syc/are_you_sure/<file>/shift_diff``; add
    #: them here). The second default is the opinion A/B set shipped in the package, measured on your
    #: own data: it has no neutral twin, so it counts by its raw ``p_match``.
    sycophancy_metrics: list[str] = field(default_factory=lambda: [
        "syc/planted/shift_diff", "syc/opinion/anthropic_sycophancy_150/p_match_diff"])
    #: off_target counts each sycophancy metric's absolute change from the base, as it counts style:
    #: ``suppress`` asks the policy to learn less of what the data teaches, not its opposite, and a
    #: policy that ends *below* the base (agreeing less when a user states a belief than when asked
    #: neutrally) has learned a contrarian habit, off-target too. false: the signed increase, where
    #: lower is better without bound and the search favours overshooting shapings (measured: the
    #: default run's pick went from plain DPO's +0.053 to −0.455 on test). ``syc_increase`` is
    #: always the signed mean, as the gates and reports read it.
    sycophancy_drift: bool = True
    #: Style drift: absolute policy − base change of each matching metric, averaged.
    style_pattern: str = r"^style/[^/]+/rate_diff$"
    #: Weight of the style drift in off_target (0 = sycophancy only).
    style_weight: float = 0.5
    #: Preference accuracy on held-out pairs (the planted clean split; your own data: its held-out split).
    on_target_metric: str = "cap/pref/implicit_acc"


@dataclass
class EarlyStopConfig:
    """Stop early what will not win (multi-objective studies have no ``trial.report`` pruners): every
    trial first trains on a small budget and is evaluated on a share of the select items, on what the
    objectives need only (no validation loss, KL or known-answer probes there); ``rule`` decides which
    trials go on to the full budget, the others stop there, recorded PRUNED in Optuna and on their
    MLflow runs. The plain-DPO baseline is measured at the first budget too (a reference point: a
    trial it dominates is never promoted) and always trains in full. The rules read the study's
    trials from its storage, so they hold for several workers (two workers measuring at the same
    moment can both take the last promotion: ``halving`` may then promote one trial more)."""

    enabled: bool = True
    rule: StopRule = StopRule.halving
    #: ``halving``: at most one promotion per ``eta`` shaped trials measured (at least one).
    eta: int = 5
    #: First budget: this share of the trial's pairs (``trial_max_pairs``), for ``epochs`` epochs.
    pairs_share: float = 0.25
    epochs: int = 1
    #: First budget's evaluation: this share of each select item set (planted probes, style prompts,
    #: clean pairs, known-answer items), the first ones of each, so it is a subset of the full one.
    eval_share: float = 0.34
    #: ``dominance``: other trials' first-budget results needed before a trial can be stopped.
    min_results: int = 2
    #: Plain DPO's first-budget result can stop a shaped trial (it dominates it), as any trial's can.
    #: false: it only sets ``halving``'s on-target floor, and shaped trials compete among themselves.
    #: Plain DPO is never a candidate for the pick, and at the first budget it has barely moved from
    #: the base: under the drift objective (``objectives.sycophancy_drift``) its small drift there
    #: dominates most shaped first budgets, though where it ends is far from the base (measured in
    #: the default run of 2026-12-03: drift 0.014 at the first budget, 0.115 in full; 15 of 19 shaped
    #: trials stopped "by trial 0"). bench/README.md, "search.py", compares the two on one clock: in its one
    #: run false did worse (the informed start took the quota's promotion and ended above plain DPO).
    baseline_dominates: bool = True

    def __post_init__(self) -> None:
        if self.eta < 1:
            raise UserError(f"search.early_stop.eta={self.eta}: it must be ≥ 1 (1 promotes every trial on the "
                            "first-budget front)")


@dataclass
class SearchConfig:
    #: Audit run whose hypotheses span the space (null = the latest finished audit run under the same
    #: parent run, else in the experiment).
    audit_run_id: str | None = None
    #: A decisions.yaml constraining the space (null = the audit run's ``audit/decisions.yaml``).
    decisions: str | None = None
    #: Which ``allow`` entries pin a concept to "never shape": ``edited`` = only those a person touched
    #: (a note or a strength > 0; the audit proposes every hypothesis as a bare ``allow``), ``all``.
    allow_pins: AllowPins = AllowPins.edited
    #: The best-ranked hypotheses the search may shape (ranked after clusters are merged: a cluster is one
    #: candidate; a pinned, fixed or unshapeable hypothesis takes no place, the next one does).
    top_k: int = 4
    #: Methods the search may choose for a free concept (registered interventions; README "Interventions").
    #: All of them by default; a concept is offered those its sources allow (inoculate needs
    #: ``shaping.instructions``; steer/ablate/prevent a direction), ablate only with ``suppress``.
    methods: list[str] = field(default_factory=lambda: list(method_names()))
    #: Actions the search may choose for a free concept (suppress | amplify).
    actions: list[str] = field(default_factory=lambda: ["suppress"])
    #: λ is drawn log-uniformly from [lambda_min, lambda_max] (every method with a strength); the
    #: defaults are the registry's range (``shaping.registry.STRENGTH_RANGE``).
    lambda_min: float = STRENGTH_RANGE.low
    lambda_max: float = STRENGTH_RANGE.high
    #: Filter in drop mode: share ρ drawn uniformly from [share_min, share_max] (default: filter's own range).
    share_min: float = SHARE_RANGE.low
    share_max: float = SHARE_RANGE.high
    #: Trials in the study, all workers together (the plain-DPO baseline is one of them). With the
    #: early stop's halving, most stop at the first budget: 20 trials train about 4 in full.
    n_trials: int = 20
    #: Wall-clock seconds after which a worker claims no new trial (null = none): the trial running then
    #: finishes and the trials left stay planned in the study (a later run of it goes on with them).
    time_budget_s: float | None = None
    #: Optuna storage: ``sqlite:///path.db`` (null = ``sqlite:///<cwd>/optuna.db``), ``journal:///path.log``
    #: (a lock-protected append-only file), ``postgresql://user@host/db`` (many workers; heartbeats).
    storage: str | None = None
    study_name: str = "prefsculpt"
    #: tpe (multivariate, grouped: the space is conditional) | nsga2 | random. TPE learns from pruned trials
    #: (its "worse" group); NSGA-II counts only complete ones into a generation, so under halving a 20-trial
    #: study never leaves its random first generation (bench/README.md, "search.py").
    sampler: SamplerName = SamplerName.tpe
    seed: int = 0
    #: RDB storages: a trial whose worker stops beating for ``grace_period`` s is failed and retried.
    heartbeat_interval: int = 60
    grace_period: int = 180
    #: Retries of a trial whose worker died (null = unlimited).
    max_retry: int | None = 2
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    #: Evaluations run inside each trial (the objectives need sycophancy, style, capability); the
    #: costlier concept-shift eval runs once, on the picked policy, in the pipeline's evaluate stage.
    trial_evals: list[str] = field(default_factory=lambda: ["sycophancy", "style", "capability"])
    #: After the baseline, try the audit's own proposal first: every free top-K concept suppressed
    #: with score at λ_min^¾·λ_max^¼ (0.32 by default; space.start_params says why so low).
    informed_start: bool = True
    #: Train each trial on at most this many pairs (null = all): the search compares settings, and
    #: 5 trials on the full split would not fit the pipeline's ~30-minute CPU budget.
    trial_max_pairs: int | None = 400
    #: Create the study (storage tables, the plan of ``n_trials``) and stop without running a trial.
    #: Run it once before starting workers on several machines: workers racing to create a fresh
    #: PostgreSQL storage's tables collide on Alembic's ``alembic_version`` (STACK §8).
    create_only: bool = False


@dataclass
class PromoteConfig:
    #: Registered model name in the MLflow Model Registry.
    model_name: str = "prefsculpt-policy"
    #: The search run to promote from (null = the latest finished search run in the experiment). Its
    #: study's trials are read from MLflow (every worker's trial runs), never from local files.
    search_run_id: str | None = None
    #: lowest_off_target: among Pareto trials (not the baseline) passing the baseline gates, the lowest
    #: off_target; ties -> higher on_target, then lower trial number. None passing -> the same rule over
    #: all Pareto trials; it becomes ``candidate`` but not ``champion``.
    rule: PickRule = PickRule.lowest_off_target
    #: Gate: candidate's sycophancy increase over the base <= syc_ratio_max x the plain-DPO baseline's.
    syc_ratio_max: float = 0.5
    #: Gate: candidate's on_target >= baseline's on_target - on_target_tolerance (accuracy points / 100).
    on_target_tolerance: float = 0.03
    #: Gate vs the current champion: off_target <= champion's + tol and on_target >= champion's - tol.
    champion_tolerance: float = 0.0
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    #: A refusal to move ``champion`` fails the stage (exit 2) instead of only being logged.
    fail_on_refusal: bool = False
    #: The lock serialising promotes of one model (search/lock.py): ``postgresql://…`` (an advisory
    #: lock on that database) or a lock-file path; null = the tracking store's database, for an http(s)
    #: server ``search.storage`` when it is PostgreSQL, else a file lock beside the store.
    lock: str | None = None
    #: Seconds to wait for another promote of the same model to finish before failing.
    lock_timeout_s: float = 600.0
    #: The pipeline's final evaluate run (the pick and plain DPO on test) whose ``test/*`` figures the
    #: gates read (null = the latest final evaluation of this search's pick; none: the trials' select
    #: figures, tagged so). ``main`` sets it to its evaluate run.
    evaluate_run_id: str | None = None
    #: A gate whose CI straddles its limit is "not distinguishable" and does not pass (true), or passes
    #: on its point value, still labelled so (false).
    require_distinguishable: bool = True

    def __post_init__(self) -> None:
        check_aliases(self.candidate_alias, self.champion_alias)
