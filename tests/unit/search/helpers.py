"""Shared bits of the search/promote tests: a fake audit run, a composed config, a cheap runner."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from omegaconf import OmegaConf

from prefsculpt.search.config import PromoteConfig, SearchConfig
from prefsculpt.search.objective import Outcome

HYPOTHESES = pd.DataFrame({
    "concept": ["named:stock_flattery", "length", "cluster:0", "latent:5", "latent:9"],
    "kind": ["named", "builtin", "cluster", "latent", "latent"],
    "rank": [1.0, 2.0, 3.0, 4.0, None],
    "direction": [1, 1, 1, -1, 1],
})


def compose_cfg(tmp_path: Path, **search):
    """The sections search/promote read, typed by their schemas (Hydra composition is left to the
    integration test: it costs seconds per call)."""
    from prefsculpt.concepts.config import NamedConceptConfig
    from prefsculpt.config import TrackingConfig
    from prefsculpt.shaping.config import ShapingConfig

    cfg = OmegaConf.create({
        "tracking": OmegaConf.structured(TrackingConfig(experiment="search-test")),
        "shaping": OmegaConf.structured(ShapingConfig),
        "named_concepts": [OmegaConf.structured(NamedConceptConfig(name="stock_flattery", kind="regex",
                                                                   pattern="(?i)great question"))],
        "search": OmegaConf.merge(OmegaConf.structured(SearchConfig), {
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "n_trials": 4, "top_k": 4,
            "methods": ["score", "filter"], "heartbeat_interval": 1, "grace_period": 3,
            # the study mechanics are tested one runner call per trial; test_early_stop turns it on
            "early_stop": {"enabled": False}, **search}),
        "promote": OmegaConf.structured(PromoteConfig),
        "cache_dir": str(tmp_path / "cache"), "seed": 0})
    return cfg


def fake_audit_run(tmp_path: Path, decisions: dict | None = None, experiment: str = "search-test") -> str:
    """A finished run tagged as an audit, with audit/hypotheses.parquet (+ decisions.yaml)."""
    mlflow.set_experiment(experiment)
    d = tmp_path / "audit-art" / "audit"
    d.mkdir(parents=True, exist_ok=True)
    HYPOTHESES.to_parquet(d / "hypotheses.parquet", index=False)
    if decisions is not None:
        (d / "decisions.yaml").write_text(json.dumps(decisions))  # JSON is YAML
    with mlflow.start_run(run_name="audit", tags={"prefsculpt.stage": "audit"}) as run:
        mlflow.log_artifacts(str(d), "audit")
    return run.info.run_id


def synthetic_metrics(concepts: list[dict]) -> dict[str, float]:
    """Shaping lowers sycophancy and costs a little accuracy (per unit λ); plain DPO: +0.2 / 0.80."""
    lam = sum(float(c["strength"]) if c.get("share") is None else 10 * float(c["share"]) for c in concepts)
    # the objective reads the belief − neutral shift; the raw p(agree) rises more (neutral agreement too)
    return {"syc/planted/shift_diff": 0.2 - 0.03 * lam, "syc/planted/p_agree_diff": 0.3 - 0.03 * lam,
            "style/emoji/rate_diff": 0.1,
            "style/emoji/rate_diff_lo": 0.0, "cap/pref/implicit_acc": 0.8 - 0.004 * lam}


class FakeRunner:
    """Stands in for train + evaluate: logs two child runs like the real stages, fails on request."""

    def __init__(self, fail_calls: tuple[int, ...] = ()):
        self.calls = 0
        self.fail_calls = fail_calls

    def __call__(self, cfg) -> Outcome:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError(f"synthetic failure in call {self.calls}")
        concepts = OmegaConf.to_container(cfg.shaping.concepts)
        with mlflow.start_run(run_name="train", nested=True, tags={"prefsculpt.stage": "train"}) as tr:
            mlflow.log_dict({"concepts": concepts}, "shaping/interventions.json")
        m = synthetic_metrics(concepts)
        with mlflow.start_run(run_name="evaluate", nested=True, tags={"prefsculpt.stage": "evaluate"}) as ev:
            mlflow.log_metrics(m)
        return Outcome(tr.info.run_id, ev.info.run_id, f"runs:/{tr.info.run_id}/policy", m)
