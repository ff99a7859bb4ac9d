"""Trials store what they changed (issue 17.4): a train run with ``train.log_policy=delta`` logs its
trained layers and a manifest, no whole model; ``eval.policy=<that run>`` assembles the exact trained
policy; the search's Pareto front and promote's pick get a full, registrable model on demand."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from prefsculpt.core.files import model_fingerprint
from prefsculpt.core.names import Tag
from prefsculpt.models.delta import save_delta
from prefsculpt.models.loading import load_model
from prefsculpt.tracking.models import PolicyMeta, delta_extra, log_policy, log_policy_delta
from prefsculpt.tracking.policies import PolicySourceError, resolve_policy
from prefsculpt.train.module import freeze_below


def _bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _all_artifacts(run_id: str, path: str | None = None) -> list:
    client, out = mlflow.MlflowClient(), []
    for a in client.list_artifacts(run_id, path):
        out += _all_artifacts(run_id, a.path) if a.is_dir else [a]
    return out


def _logits(model_dir, ids):
    with torch.no_grad():
        return load_model(model_dir).eval()(input_ids=ids).logits


def test_a_delta_train_run_logs_no_whole_model_and_resolves_to_the_trained_policy(tiny_model_dir, tmp_path,
                                                                                   mlflow_uri):
    from prefsculpt.stages.train import run_train
    from tests.tiny import make_model_dir
    from tests.unit.train.helpers import train_cfg

    cfg = train_cfg(tiny_model_dir, tmp_path, train={"max_pairs": 4, "train_top_layers": 1, "log_policy": "delta"})
    out = run_train(cfg)
    rid = out["run_id"]
    assert out["model_uri"] is None and out["delta_uri"] == f"runs:/{rid}/policy_delta"
    run = mlflow.get_run(rid)
    assert run.data.tags[Tag.POLICY_LOG] == "delta" and run.data.metrics["train/policy_delta_mb"] > 0
    arts = _all_artifacts(rid)
    weights = [a.path for a in arts if a.path.endswith(".safetensors")]
    assert weights == ["policy_delta/delta.safetensors"]  # the only weights the run stores
    assert not any(a.path.endswith("MLmodel") for a in arts)
    assert not mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{rid}'", output_format="list")

    # before: the whole model the train stage used to log per trial (train.log_policy=full); after: the delta
    with mlflow.start_run(run_name="full-for-size"):
        full_info = log_policy(out["policy_dir"], PolicyMeta("tiny", rid))
    full_b = _bytes(mlflow.artifacts.download_artifacts(full_info.model_uri, dst_path=str(tmp_path / "dl-full")))
    delta_b = _bytes(mlflow.artifacts.download_artifacts(out["delta_uri"], dst_path=str(tmp_path / "dl-delta")))
    print(f"\nartifact bytes per trial on the tiny model: full {full_b}, delta {delta_b} ({delta_b / full_b:.1%})")
    assert delta_b < full_b / 3

    # another machine (a fresh cache, no local policy folder) resolves the run to the same policy
    cache = tmp_path / "elsewhere"
    got = resolve_policy(rid, tiny_model_dir, cache)
    assert got.source == "run" and got.path.name.startswith("delta-") and str(got.path).startswith(str(cache))
    assert got.digest == model_fingerprint(out["policy_dir"])  # same weights + config: same evaluation keys
    ids = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(got.path, ids), _logits(out["policy_dir"], ids))
    assert resolve_policy(rid, tiny_model_dir, cache).path == got.path  # assembled once, then reused

    other = make_model_dir(tmp_path / "other-base", seed=5)
    with pytest.raises(PolicySourceError) as e:
        resolve_policy(rid, other, tmp_path / "third")
    assert model_fingerprint(tiny_model_dir) in str(e.value) and model_fingerprint(other) in str(e.value)


def _delta_train_run(tiny_model_dir, tmp_path) -> str:
    """A finished train run that logged only a delta (as a search trial does): the top layer moved."""
    model = load_model(tiny_model_dir)
    freeze_below(model, 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    with mlflow.start_run(run_name="train", tags={Tag.STAGE: "train"}) as run:
        save_delta(model, tmp_path / "delta", tiny_model_dir, str(tiny_model_dir),
                   extra=delta_extra(PolicyMeta("tiny", run.info.run_id, "d" * 64, "a" * 32,
                                                [{"name": "score/named:x", "lambda": 0.5}])))
        log_policy_delta(tmp_path / "delta")
    return run.info.run_id


def _search_with(uid: str, trials: list[tuple]) -> dict[int, str]:
    """A finished search run whose trial runs name their train run but no model (delta-only trials)."""
    ids = {}
    with mlflow.start_run(run_name="search", tags={Tag.STAGE: "search", Tag.STUDY_UID: uid}):
        for num, base, off, on, syc, train_id in trials:
            tags = {Tag.STAGE: "trial", Tag.STUDY_UID: uid, Tag.TRIAL_NUMBER: str(num), Tag.BASELINE: str(base).lower(),
                    Tag.SHAPING: "plain DPO" if base else "score/named:x λ=0.5", Tag.TRAIN_RUN: train_id}
            with mlflow.start_run(run_name=f"trial-{num}", nested=True, tags=tags) as t:
                mlflow.log_metrics({"search/off_target": off, "search/on_target": on, "search/syc_increase": syc})
            ids[num] = t.info.run_id
    return ids


def test_promote_of_a_delta_only_trial_logs_a_full_model_and_registers_it(tiny_model_dir, tmp_path, mlflow_uri):
    from prefsculpt.stages.promote import run_promote
    from tests.unit.search.helpers import compose_cfg

    cfg = compose_cfg(tmp_path)
    OmegaConf.set_struct(cfg, False)
    cfg.model = {"name_or_path": str(tiny_model_dir), "cache_dir": None}
    mlflow.set_experiment("search-test")
    train_id = _delta_train_run(tiny_model_dir, tmp_path)
    trial_ids = _search_with("s1", [(0, True, 0.25, 0.80, 0.20, train_id), (1, False, 0.08, 0.79, 0.06, train_id)])

    r = run_promote(cfg)
    assert r["promoted"] and r["trial"] == 1
    client = mlflow.MlflowClient()
    mv = client.get_model_version(str(cfg.promote.model_name), r["version"])
    uri = client.get_run(trial_ids[1]).data.tags[Tag.MODEL_URI]  # the trial now names its full model
    assert uri.startswith("models:/m-")
    lm = mlflow.get_logged_model(uri.removeprefix("models:/"))
    assert lm.source_run_id == r["run_id"] and lm.tags[Tag.TRAIN_RUN] == train_id  # logged by promote, for the trial
    assert lm.tags[Tag.DECISIONS_HASH] == "d" * 64 and "score/named:x" in lm.tags[Tag.SHAPING]
    assert lm.model_id in mv.source or mv.model_id == lm.model_id  # the version registered is that model
    # the registered model is the full assembled policy: what the resolver reads back by alias
    served = resolve_policy(f"models:/{cfg.promote.model_name}@champion", "/unused", tmp_path / "c2")
    assembled = resolve_policy(train_id, tiny_model_dir, tmp_path / "c3")
    assert served.digest == assembled.digest != model_fingerprint(tiny_model_dir)


def test_the_search_logs_full_models_for_its_pareto_front_only(tiny_model_dir, tmp_path, mlflow_uri):
    from prefsculpt.stages.search import log_front_policies

    mlflow.set_experiment("search-test")
    train_id = _delta_train_run(tiny_model_dir, tmp_path)
    trial_ids = _search_with("s2", [(0, True, 0.25, 0.80, 0.20, train_id), (1, False, 0.30, 0.70, 0.2, train_id)])
    df = pd.DataFrame([
        {"trial": 0, "state": "COMPLETE", "pareto": True, "model_uri": "", "train_run_id": train_id,
         "mlflow_run_id": trial_ids[0]},
        {"trial": 1, "state": "COMPLETE", "pareto": False, "model_uri": "", "train_run_id": train_id,
         "mlflow_run_id": trial_ids[1]}])
    cfg = OmegaConf.create({"model": {"name_or_path": str(tiny_model_dir), "cache_dir": None}})
    with mlflow.start_run(run_name="search-worker"):
        got = log_front_policies(df, cfg, tmp_path / "cache")
        assert list(got) == [0]
        assert log_front_policies(df, cfg, tmp_path / "cache") == got  # the same model, not logged twice
    client = mlflow.MlflowClient()
    assert client.get_run(trial_ids[0]).data.tags[Tag.MODEL_URI] == got[0]
    assert Tag.MODEL_URI not in client.get_run(trial_ids[1]).data.tags  # off the front: its delta only


def test_search_trials_default_to_delta_and_the_train_stage_keeps_full(monkeypatch):
    import prefsculpt.stages.search as S
    from prefsculpt.config import compose, policy_log_mode

    seen = []
    monkeypatch.setattr(S, "run_train", lambda c: seen.append(policy_log_mode(c.train)) or {"run_id": "r"})
    monkeypatch.setattr(S, "run_evaluate", lambda c: {"run_id": "e", "metrics": {}})
    cfg = compose("experiment=tiny")
    assert policy_log_mode(cfg.train) == "full"  # the standalone train stage
    for key, val in ((None, None), ("train.log_model", False), ("train.log_policy", "full")):
        c = cfg.copy()
        if key:
            OmegaConf.update(c, key, val)
        S.train_and_evaluate(c)
    assert seen == ["delta", "none", "full"]
    assert cfg.train.log_policy is None  # the caller's config is left as it was
