"""A tiny hand-made audit: the artifacts the audit stage writes, small enough to build in a test.

``n_latents`` latents of which latents 0-5 are significant hypotheses (0-2: the chosen side has
more; 3-5: less), a co-firing cluster of latents 6-9, a named regex concept and the built-in
``length``. One label carries a ``<script>`` payload that must show as text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from prefsculpt.audit.decisions import propose_decisions, write_decisions

EVIL = "<script>window.__pwned=1</script>"


def audit_table(n_latents: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = [f"latent:{i}" for i in range(n_latents)] + ["cluster:0", "named:exclamation", "length"]
    kinds = ["latent"] * n_latents + ["cluster", "named", "builtin"]
    n = len(names)
    sig = np.zeros(n, bool)
    sig[:6] = True
    sig[n_latents] = True  # cluster:0
    sig[-1] = True  # length
    direction = np.where(rng.random(n) < 0.5, 1, -1)
    direction[:3], direction[3:6], direction[n_latents], direction[-1] = 1, -1, 1, 1
    d_z = np.where(sig, direction * rng.uniform(0.3, 0.9, n), rng.normal(0, 0.05, n))
    q = np.where(sig, rng.uniform(1e-6, 0.01, n), rng.uniform(0.2, 1.0, n))
    members = [None] * n
    members[n_latents] = [f"latent:{i}" for i in range(6, 10)]
    member_of = [None] * n
    for i in range(6, 10):
        member_of[i] = "cluster:0"
    t = pd.DataFrame({
        "concept": names, "kind": kinds, "n": 120, "support": rng.uniform(0.05, 0.6, n), "tested": True,
        "mean_diff": d_z * 0.8, "d_z": d_z, "share_chosen_more": 0.5 + d_z / 3, "share_rejected_more": 0.5 - d_z / 3,
        "ci_low": d_z * 0.8 - 0.2, "ci_high": d_z * 0.8 + 0.2, "p": q / 10, "q": q, "half_a": d_z * 1.1,
        "half_b": d_z * 0.9, "replicated": sig, "length_effect": d_z * 0.7, "length_p": q, "direction": direction,
        "significant": sig, "members": members, "member_of": member_of,
    })
    t = t.iloc[np.argsort(~sig, kind="stable")].reset_index(drop=True)
    t["rank"] = np.where(t["significant"] & t["member_of"].isna(), np.cumsum(t["significant"] & t["member_of"].isna()),
                         np.nan)
    t["label"] = None
    labels = {"latent:0": "' absolutely' · ' right'", "latent:1": "'.' · ',' — “…, not X.” in chosen 6/6, rejected 0/4",
              "latent:2": f"'!' {EVIL}", "latent:3": "' Actually'", "latent:4": "' however'", "latent:5": "'**'",
              "cluster:0": "' wonderful' · ' great'", "length": "length", "named:exclamation": "exclamation"}
    t["label"] = t["concept"].map(labels)
    return t


def detail_records(table: pd.DataFrame) -> list[dict]:
    """hypotheses.json entries of the significant rows: label detail and one example each."""
    out = []
    for r in table[table["significant"]].to_dict("records"):
        c = r["concept"]
        ctx = {"pair_id": "p1", "span": "chosen", "token": ".", "left": "It is a feature, not bugs",
               "right": f" Then {EVIL}", "value": 5.0}
        label = {"concept": c, "label": r["label"], "tokens_chosen": [[".", 6]], "tokens_rejected": [[".", 1]],
                 "contexts_chosen": [ctx], "contexts_rejected": [], "explanation": None,
                 "phrase": "…, not X." if c == "latent:1" else None,
                 "phrase_counts": {"side": "chosen", "other": "rejected", "k_side": 6, "n_side": 6, "k_other": 0,
                                   "n_other": 4} if c == "latent:1" else None, "phrase_contexts": []}
        example = {"pair_id": "p1", "d": 1.5,
                   "prompt": [{"text": "Is it a bug?", "mark": False}],
                   "chosen": [{"text": "It is a feature, not bugs", "mark": False}, {"text": ".", "mark": True},
                              {"text": f" {EVIL}", "mark": False}],
                   "rejected": [{"text": "It is a bug.", "mark": False}]}
        rec = {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        rec.update(label_detail=label, where_detail=[{"cluster": 1, "n": 40, "mean_in": 1.2, "mean_out": 0.1,
                                                      "welch_z": 3.4, "about": "e.g. “Is it a bug?”"}],
                   example_pairs=["p1"], examples=[example])
        out.append(rec)
    return out


def write_audit_artifacts(out: Path, table: pd.DataFrame, run_id: str | None = None) -> Path:
    """``out/audit/{hypotheses.parquet, hypotheses.json, decisions.yaml}`` as the audit writes them."""
    a = out / "audit"
    a.mkdir(parents=True)
    table.to_parquet(a / "hypotheses.parquet", index=False)
    (a / "hypotheses.json").write_text(json.dumps(detail_records(table), ensure_ascii=False, default=str))
    hyp = table[table["rank"].notna()].sort_values("rank")
    write_decisions(propose_decisions(hyp, None, audit_run_id=run_id), a / "decisions.yaml")
    return a


def log_tiny_audit(tmp_path: Path, n_latents: int = 300, experiment: str = "prefsculpt",
                   top_contexts: pd.DataFrame | None = None) -> str:
    """A FINISHED run tagged ``prefsculpt.stage=audit`` holding the tiny audit's artifacts; with
    ``top_contexts``, also the sae run it read (``scores/top_contexts.parquet``)."""
    import mlflow

    mlflow.set_experiment(experiment)
    tags = {"prefsculpt.stage": "audit"}
    if top_contexts is not None:
        (tmp_path / "scores").mkdir()
        top_contexts.to_parquet(tmp_path / "scores" / "top_contexts.parquet", index=False)
        with mlflow.start_run(run_name="sae", tags={"prefsculpt.stage": "sae"}) as sae:
            mlflow.log_artifacts(str(tmp_path / "scores"), "scores")
        tags["prefsculpt.scores_run_id"] = sae.info.run_id
    with mlflow.start_run(run_name="audit", tags=tags) as run:
        folder = write_audit_artifacts(tmp_path / "tiny-audit", audit_table(n_latents), run.info.run_id)
        mlflow.log_artifacts(str(folder), "audit")
    return run.info.run_id
