"""The audit stage end to end on a synthetic ``sae`` run whose latents track the planted concepts.

The sae run is faked (a score store and top contexts logged under a run tagged
``prefsculpt.stage=sae``), so this tests the audit's wiring, outputs and planted check without a
model. Latents 0-3 fire on the side carrying flattery, 4-7 on styling, 8-11 on sycophancy; the
rest are noise.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from prefsculpt.audit.analysis import AuditInputError
from prefsculpt.cli import run_stage
from prefsculpt.concepts import shards
from prefsculpt.config import compose
from prefsculpt.data.prepared import split_source
from prefsculpt.shaping.decisions import load_decisions

pytestmark = pytest.mark.integration

F_LAT = 40
TRACKS = {"flattery": range(0, 4), "styling": range(4, 8), "sycophancy": range(8, 12)}
TOKENS = {"flattery": " wonderful", "styling": "**", "sycophancy": " absolutely"}


def _fake_store(pairs, out: Path, evil_pair: str | None = None) -> None:
    rng = np.random.default_rng(0)
    n = len(pairs)
    names = [f"latent:{i}" for i in range(F_LAT)] + ["named:markdown_bold"]
    vals = {}
    for side in ("prompt", "chosen", "rejected"):
        x = (rng.random((n, F_LAT + 1)) < 0.1) * rng.gamma(2.0, 1.0, (n, F_LAT + 1))  # sparse noise
        if side != "prompt":
            tags = [getattr(p, f"{side}_tags") for p in pairs]
            for concept, cols in TRACKS.items():
                on = np.array([t.get(concept, 0.0) for t in tags]) > 0
                for c in cols:
                    x[on, c] = 4.0 + rng.random(on.sum())
            x[:, F_LAT] = np.array([t.get("style_bold", 0.0) for t in tags]) * 2.0
        vals[(side, "max")] = x.astype(np.float32)
        vals[(side, "freq")] = (x > 0).astype(np.float32) * 0.3
    ntok = {"prompt": np.full(n, 20), "chosen": np.array([len(p.chosen.split()) for p in pairs]),
            "rejected": np.array([len(p.rejected.split()) for p in pairs])}
    arrays = {"pair_ids": np.array([p.id for p in pairs])}
    arrays.update({f"{s}_{st}": v for (s, st), v in vals.items()})
    arrays.update({f"{s}_n_tokens": v.astype(np.int32) for s, v in ntok.items()})
    out.mkdir(parents=True)
    shards.write_shard(out, 0, arrays)
    rows = []
    for concept, cols in TRACKS.items():
        for c in cols:
            for rank, p in enumerate([p for p in pairs if p.chosen_tags.get(concept)][:6]):
                tok = TOKENS[concept]
                right = f" {'<script>window.__pwned=1</script>' if p.id == evil_pair else 'x'}"
                rows.append(dict(concept=f"latent:{c}", rank=rank, value=5.0 - rank * 0.1, pair_id=p.id,
                                 span="chosen", position=3, token=tok, left="That's", right=right))
    pd.DataFrame(rows).to_parquet(out / "top_contexts.parquet", index=False)
    shards.write_manifest(out, {"layer": 3, "sae_digest": "fake", "concept_names": names}, n, 1)


@pytest.fixture
def sae_run(mlflow_uri, tmp_path):
    cfg = compose("experiment=tiny")
    pairs = split_source(cfg.data)[0].all_pairs()  # what the sae stage scores: train + validation
    evil = next(p for p in pairs if p.chosen_tags.get("flattery"))  # its context shows in a label
    _fake_store(pairs, tmp_path / "scores", evil_pair=evil.id)
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name="sae", tags={"prefsculpt.stage": "sae"}) as run:
        mlflow.log_artifacts(str(tmp_path / "scores"), "scores")
    return run.info.run_id


def _download(run_id, path):
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def test_audit_finds_planted_latents_and_writes_everything(sae_run):
    res = run_stage("audit", "experiment=tiny audit.latent_clusters=true")
    assert res["scores_run_id"] == sae_run
    rid = res["run_id"]
    out = _download(rid, "audit")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"hypotheses.parquet", "hypotheses.json", "decisions.yaml", "report.html", "plots/volcano.png",
            "plots/top_effects.png", "planted.json"} <= names
    table = pd.read_parquet(out / "hypotheses.parquet")
    # latents, named, co-firing clusters, near-duplicate groups, length
    assert len(table) == F_LAT + 1 + 1 + res["n_latent_clusters"] + res["n_duplicate_groups"]
    hyp = table[table["rank"].notna()].sort_values("rank")
    # the 4 co-firing latents of each planted concept count once (as their cluster or alone)
    planted = pd.DataFrame(json.loads((out / "planted.json").read_text()))
    for concept in ("flattery", "styling", "sycophancy", "length"):
        row = planted[planted["planted concept"] == concept].iloc[0]
        assert row["captured"], row.to_dict()
        assert row["rank"] <= 10 and row["q"] < 0.05
    flat = planted[planted["planted concept"] == "flattery"].iloc[0]
    assert "' wonderful'" in flat["label"]
    # near-duplicate latents (the 4 of a planted concept fire together on the same tokens): one row each
    dup = table[table["cluster_type"] == "near_duplicate"]
    assert len(dup) == res["n_duplicate_groups"] >= 3
    groups = [sorted(m) for m in dup["members"]]
    assert all(sorted(f"latent:{c}" for c in cols) in groups for cols in TRACKS.values())
    # each planted group reaches the reader once: as its group row, or (when only one member passes BH
    # and the group sits just above q = 0.05) as that member alone, never as several member rows
    shown = hyp["concept"].map(lambda c: next((g for g, m in zip(dup["concept"], groups, strict=True)
                                               if c in m), c))
    assert not shown.duplicated().any(), hyp[["concept", "q"]].to_string()
    assert hyp["concept"].isin([f"latent:{i}" for i in range(12)]).sum() <= 1
    records = json.loads((out / "hypotheses.json").read_text())
    by = {r["concept"]: r for r in records}
    assert all(len(by[c]["members"]) == 4 for c in dup["concept"] if c in by)
    assert "length_carriers" in by["length"] and {"q", "q_raw", "significant_raw"} <= set(by["length"])
    noise = hyp[hyp["concept"].isin([f"latent:{i}" for i in range(12, F_LAT)])]
    assert len(noise) <= 2  # noise latents rarely pass BH + replication
    # decisions: every shown hypothesis, all allowed, valid against the audit's concepts
    dec = load_decisions(out / "decisions.yaml", table["concept"])
    assert [d.concept for d in dec.entries] == hyp["concept"].head(20).tolist()
    assert all(d.action == "allow" for d in dec.entries)
    assert yaml.safe_load((out / "decisions.yaml").read_text())["audit_run_id"] == rid
    # report: escaped dataset text, the table, the firing tokens marked
    html = (out / "report.html").read_text()
    assert html.count("<script>") == 1 and "&lt;script&gt;window.__pwned=1" in html
    assert '<table id="hyp-table"' in html and "<mark>" in html
    m = mlflow.get_run(rid).data.metrics
    assert m["planted/captured"] == 4 and m["n_hypotheses"] == len(hyp)
    assert m["n_significant"] == table["significant"].sum() and m["n_significant_raw"] >= m["n_significant"]
    assert m["calibration/seeds"] == 3 and m["calibration/failed"] == 0  # the tiny audit's 3 null seeds
    assert 'id="calibration-banner"' in html and "Calibration passed" in html
    assert mlflow.get_run(rid).data.tags["prefsculpt.scores_run_id"] == sae_run


def test_audit_without_sae_run_says_what_to_do(mlflow_uri):
    with pytest.raises(AuditInputError, match=r"run the sae stage first: mlflow run \. -e sae"):
        run_stage("audit", "experiment=tiny")


def test_audit_rejects_scores_of_other_data(sae_run):
    with pytest.raises(AuditInputError, match="not in the data"):
        run_stage("audit", "experiment=tiny data.planted.seed=5")


def test_audit_explains_top_labels_via_endpoint(sae_run, tmp_path):
    from tests.unit.audit.test_labels import _Server

    server = _Server()
    try:
        res = run_stage("audit", f"experiment=tiny audit.explain_base_url={server.url} audit.explain_model=stub "
                                 f"audit.explain_top=2 cache_dir={tmp_path / 'cache'}")
    finally:
        server.close()
    # identical top contexts (latents of one synthetic concept) make one request: the cache key is the content
    assert 1 <= len(server.requests) <= 2
    assert len(list((tmp_path / "cache" / "explanations").glob("*.json"))) == len(server.requests)
    html = (_download(res["run_id"], "audit/report.html")).read_text()
    assert html.count('<p class="expl">agreement with the user</p>') == 2


def test_audit_survives_a_failing_label_endpoint(sae_run, tmp_path):
    """An endpoint that always answers 500: retried, then the audit finishes on offline labels and
    records why (warning, tag, metric) instead of failing."""
    from tests.unit.audit.test_labels import _Server

    server = _Server("500")
    try:
        res = run_stage("audit", f"experiment=tiny audit.explain_base_url={server.url} audit.explain_model=stub "
                                 f"audit.explain_top=2 audit.explain_retries=1 audit.explain_backoff_s=0.01 "
                                 f"cache_dir={tmp_path / 'cache'}")
    finally:
        server.close()
    assert len(server.requests) == 2  # one concept, tried twice, then the calls stop
    run = mlflow.MlflowClient().get_run(res["run_id"])
    assert "HTTP 500" in run.data.tags["prefsculpt.explain_error"]
    assert run.data.metrics["labels/explained"] == 0 and run.data.metrics["labels/explain_failed"] == 2
    assert run.data.tags["prefsculpt.complete"] == "true"
    html = (_download(res["run_id"], "audit/report.html")).read_text()
    assert '<p class="expl">' not in html
