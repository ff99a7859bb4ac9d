import json
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from prefsculpt.concepts.shards import load_scores
from prefsculpt.config import compose
from prefsculpt.data.prepared import split_source

pytestmark = pytest.mark.integration


def test_sae_stage_tiny_on_smollm2(smollm2_dir, mlflow_uri, tmp_path):
    cfg = compose(["experiment=tiny", f"cache_dir={tmp_path / 'cache'}"])
    from prefsculpt.stages.sae import run_sae

    out = run_sae(cfg)
    m = out["metrics"]
    for k in ("sae/explained_variance", "sae/l0_mean", "sae/dead_share", "time/collect_seconds",
              "time/train_seconds", "time/encode_seconds", "time/total_seconds"):
        assert k in m, k
    assert 0.0 < m["sae/explained_variance"] <= 1.0 and m["sae/l0_mean"] == pytest.approx(16, abs=0.5)
    assert m["cache/sae_hit"] == 0.0 and m["cache/activations_hit"] == 0.0

    run = mlflow.get_run(out["run_id"])
    assert run.data.tags["prefsculpt.stage"] == "sae"
    assert run.data.metrics["sae/explained_variance"] == pytest.approx(m["sae/explained_variance"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])}
    assert {"sae", "scores", "named", "config"} <= arts
    dst = Path(mlflow.artifacts.download_artifacts(run_id=out["run_id"], dst_path=str(tmp_path / "dl")))
    assert {"cfg.json", "sae_weights.safetensors", "quality.json"} <= {p.name for p in (dst / "sae").iterdir()}
    assert (dst / "scores" / "top_contexts.parquet").exists()

    scores = load_scores(dst / "scores")
    # the train + validation pairs only: select and test stay out of everything learnt
    learn = split_source(cfg.data)[0].all_pairs()
    assert 0 < len(learn) < 120 and scores.pair_ids == [p.id for p in learn]
    named = [n for n in scores.concept_names if n.startswith("named:")]
    assert named == [f"named:{c.name}" for c in cfg.named_concepts]
    assert len(scores.concept_names) == 2 * 576 + len(named)
    dirs = load_file(str(dst / "named" / "directions.safetensors"))
    assert set(dirs) == set(named) and all(v.shape == (576,) for v in dirs.values())
    info = json.loads((dst / "named" / "concepts.json").read_text())
    assert all(len(c["top_latents"]) == 5 for c in info)

    # A second run reuses the activations, the SAE and the scores from the cache.
    again = run_sae(cfg)["metrics"]
    assert again["cache/sae_hit"] == 1.0 and again["cache/activations_hit"] == 1.0
    assert again["sae/explained_variance"] == pytest.approx(m["sae/explained_variance"])
