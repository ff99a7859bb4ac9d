"""Every MLflow tag key and artifact path prefsculpt writes or reads, in one place.

Tags are how runs find each other (a search finds its audit, promotion finds its trials), so a
key spelled twice is a lookup that silently fails; import them from here.
"""

from __future__ import annotations

PREFIX = "prefsculpt."


class Tag:
    """MLflow tag keys (``prefsculpt.*``)."""

    # every stage run
    STAGE = "prefsculpt.stage"
    COMPLETE = "prefsculpt.complete"
    STAGE_KEY = "prefsculpt.stage_key"
    REUSED_FROM = "prefsculpt.reused_from"
    GIT_COMMIT = "prefsculpt.git_commit"
    ERROR = "prefsculpt.error"
    #: Under ``mlflow run`` in another store/experiment than the config's: the project's run id (on the
    #: stage's run), and where the stages logged instead (on the project's run).
    PROJECT_RUN = "prefsculpt.project_run_id"
    LOGGED_TO = "prefsculpt.logged_to"
    #: a killed run this run was reattached to after (count of reattachments)
    REATTACHED = "prefsculpt.reattached"
    #: on a fresh ``mlflow run`` project run that only points to the killed run it resumed
    RESUMED_INTO = "prefsculpt.resumed_into"
    # data and concepts
    DATASET = "prefsculpt.dataset"
    DATA_DIGEST = "prefsculpt.data_digest"
    PREPARE_RUN = "prefsculpt.prepare_run_id"
    SAE_SOURCE = "prefsculpt.sae_source"
    LAYER = "prefsculpt.layer"
    SCORES_RUN = "prefsculpt.scores_run_id"
    AUDIT_RUN = "prefsculpt.audit_run_id"
    DECISIONS_HASH = "prefsculpt.decisions_hash"
    #: the LLM labeller's endpoint failed; the offline labels stand (the error)
    EXPLAIN_ERROR = "prefsculpt.explain_error"
    # training
    RESUMED = "prefsculpt.resumed"
    TRAIN_KEY = "prefsculpt.train_key"
    DEVICE = "prefsculpt.device"
    PRECISION = "prefsculpt.precision"
    #: ``ddp x2``: the strategy and number of devices of a multi-device fit.
    STRATEGY = "prefsculpt.strategy"
    SHAPING = "prefsculpt.shaping"
    #: On a train run: what it logged as its policy (full | delta | none; ``train.log_policy``).
    POLICY_LOG = "prefsculpt.log_policy"
    # evaluation
    POLICY = "prefsculpt.policy"
    POLICY_SOURCE = "prefsculpt.policy_source"
    POLICY_RUN = "prefsculpt.policy_run_id"
    POLICY_DIGEST = "prefsculpt.policy_digest"
    BASE_DIGEST = "prefsculpt.base_digest"
    SHIFT = "prefsculpt.shift"
    SHIFT_SOURCES = "prefsculpt.shift_sources"
    GENAI_ERROR = "prefsculpt.genai_error"
    # search
    STUDY_NAME = "prefsculpt.study_name"
    STUDY_UID = "prefsculpt.study_uid"
    STUDY_CREATOR = "prefsculpt.study_creator"
    #: "true" on the search run of ``search.create_only`` (it created the study and ran no trial).
    CREATE_ONLY = "prefsculpt.create_only"
    STORAGE = "prefsculpt.storage"
    TRIAL_NUMBER = "prefsculpt.trial_number"
    BASELINE = "prefsculpt.baseline"
    RETRY_OF = "prefsculpt.retry_of"
    TRAIN_RUN = "prefsculpt.train_run_id"
    EVAL_RUN = "prefsculpt.eval_run_id"
    MODEL_URI = "prefsculpt.model_uri"
    SEARCH_RUN = "prefsculpt.search_run_id"
    TRIAL_RUN = "prefsculpt.trial_run_id"
    #: On a trial run: COMPLETE or PRUNED (stopped at its first budget: ``search.early_stop``).
    TRIAL_STATE = "prefsculpt.trial_state"
    #: On a pruned trial run: the budget it stopped at, and the trial whose result dominated it.
    PRUNED_AT = "prefsculpt.pruned_at"
    PRUNED_BY = "prefsculpt.pruned_by"
    #: On a trial run: the trial whose parameters it trains in full (halving's late promotion).
    PROMOTED_FROM = "prefsculpt.promoted_from"
    #: On the train and evaluate runs of a trial's first budget: "first".
    BUDGET = "prefsculpt.budget"
    # promotion (on the model version and the promote run)
    PROMOTE_RUN = "prefsculpt.promote_run_id"
    OFF_TARGET = "prefsculpt.off_target"
    ON_TARGET = "prefsculpt.on_target"
    SYC_INCREASE = "prefsculpt.syc_increase"
    BASELINE_SYC_INCREASE = "prefsculpt.baseline_syc_increase"
    BASELINE_ON_TARGET = "prefsculpt.baseline_on_target"
    BASELINE_TRIAL_RUN = "prefsculpt.baseline_trial_run_id"
    GATES = "prefsculpt.gates"
    GATE_PREFIX = "prefsculpt.gate."
    MODEL_NAME = "prefsculpt.model_name"
    MODEL_VERSION = "prefsculpt.model_version"
    PROMOTED = "prefsculpt.promoted"
    REFUSAL = "prefsculpt.refusal"
    #: On the version: "champion" (moved to it) or "refused" (candidate only), decided inside the lock.
    PROMOTE_DECISION = "prefsculpt.promote_decision"
    #: On the version: the champion version read inside the lock when deciding ("none": there was none).
    PREVIOUS_CHAMPION = "prefsculpt.previous_champion"
    #: On the promote run: which lock serialised the promotion (search/lock.py), without credentials.
    PROMOTE_LOCK = "prefsculpt.promote_lock"
    # selection and reporting apart (issue 13)
    #: On an evaluate run: the held-out split its items come from (select | test).
    EVAL_SPLIT = "prefsculpt.eval_split"
    #: On the pipeline's final evaluate runs (the pick's and plain DPO's, on test): "true".
    FINAL_EVAL = "prefsculpt.final_eval"
    #: On the final evaluate run of the pick: the evaluate run of plain DPO on the same test items.
    PLAIN_EVAL_RUN = "prefsculpt.plain_eval_run_id"
    #: On the version: the final evaluate run (the pick on test) its gates and test figures come from.
    FINAL_EVAL_RUN = "prefsculpt.final_eval_run_id"
    #: On the version / promote run: the split the champion gates read (test, or select when the pick
    #: has no test evaluation) and why.
    GATE_SPLIT = "prefsculpt.gate_split"
    #: On the version / promote / main run: gates whose CI is wider than what they must resolve.
    UNDERPOWERED = "prefsculpt.underpowered"
    #: The final evaluation's pick ends below the base on sycophancy beyond its CI (a reversal, not "less").
    OVERSHOOT = "prefsculpt.overshoot"
    #: On the version: the final figures on test, "mean [lo, hi] (n=…)" (and the numbers the next
    #: promote's champion gates compare with).
    TEST_OFF_TARGET = "prefsculpt.test.off_target"
    TEST_ON_TARGET = "prefsculpt.test.on_target"
    TEST_PREFIX = "prefsculpt.test."
    # review
    DECISIONS_LATEST = "prefsculpt.decisions.latest"
    DECISIONS_LATEST_HASH = "prefsculpt.decisions.latest_hash"

    @staticmethod
    def decisions_version_hash(n: int) -> str:
        return f"prefsculpt.decisions.v{n}.hash"


class Attr:
    """Optuna study / trial user-attribute keys."""

    UID = "prefsculpt.uid"
    PLANNED = "prefsculpt.planned"
    AUDIT_RUN = Tag.AUDIT_RUN
    DECISIONS_HASH = Tag.DECISIONS_HASH
    BASELINE = Tag.BASELINE
    INFORMED_START = "prefsculpt.informed_start"
    UNPLANNED = "prefsculpt.unplanned"
    #: A trial enqueued to train trial n's parameters in full (halving's late promotion): n.
    PROMOTED_FROM = Tag.PROMOTED_FROM


class Artifact:
    """Artifact paths inside a stage's run."""

    CONFIG = "config/config.yaml"
    DATA_DIR = "data"
    PREPARED = "data/prepared"
    SAE_DIR = "sae"
    SCORES_DIR = "scores"
    NAMED_DIR = "named"
    TOP_CONTEXTS = "top_contexts.parquet"
    AUDIT_DIR = "audit"
    HYPOTHESES = "audit/hypotheses.parquet"
    DECISIONS = "audit/decisions.yaml"
    REPORT = "audit/report.html"
    POLICY_DIR = "policy"
    #: A train run's trained parameters + manifest (``train.log_policy=delta``; models/delta.py).
    POLICY_DELTA = "policy_delta"
