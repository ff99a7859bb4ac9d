"""Every long step reports progress: tiny runs of each, off a terminal, with a line on every advance."""

import logging
import re

import pytest
import torch

from prefsculpt.core import progress as P


@pytest.fixture
def lines(monkeypatch, caplog):
    """Progress records of the test, with stderr treated as a pipe and a line at every advance."""
    monkeypatch.setattr(P, "interactive", lambda: False)
    monkeypatch.setenv(P.INTERVAL_ENV, "1e-9")
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "prefsculpt.progress"]


def assert_step(got: list[str], desc: str, total: int, unit: str) -> None:
    """``desc`` logged periodic lines with done/total and an ETA, and a closing line at total."""
    mine = [x for x in got if x.startswith(f"{desc}: ")]
    periodic = [x for x in mine if re.match(rf"{re.escape(desc)}: \d+/{total} {unit} \(\d+%\), .* ETA ", x)]
    assert periodic, f"no periodic line for {desc!r} in {got}"
    assert mine[-1].startswith(f"{desc}: done {total}/{total} {unit} in "), mine[-1]


def test_activations_and_encoding_report_pairs(lines, tiny_model_dir, tiny_tokenizer, tmp_path):
    from prefsculpt.concepts.activations import collect_activations
    from prefsculpt.concepts.config import EncodeConfig
    from prefsculpt.concepts.encoder import encode_pairs
    from prefsculpt.models.loading import load_model
    from tests.unit.concepts.test_encoder import make_pairs, make_sae

    model, pairs = load_model(tiny_model_dir).eval(), make_pairs(7)
    cache = collect_activations(model, pairs, 1, batch_tokens=40)
    cfg = EncodeConfig(shard_size=3, batch_tokens=40, top_contexts=2, context_window=2)
    encode_pairs(model, make_sae(model.config.hidden_size), pairs, tmp_path / "enc", cfg, 1, activations=cache,
                 tokenizer=tiny_tokenizer)
    got = lines()
    assert_step(got, "activations (layer 1)", 7, "pairs")
    assert_step(got, "encoding", 7, "pairs")


def test_sae_training_reports_tokens(lines):
    from prefsculpt.concepts.config import SAEConfig
    from prefsculpt.concepts.sae import train_sae

    cfg = SAEConfig(expansion=2, k=4, training_tokens=1024, batch_size_tokens=256, dead_feature_window=10,
                    autocast=False, seed=0)
    train_sae(torch.randn(600, 16), cfg)
    assert_step(lines(), "SAE training (topk)", 1024, "tokens")  # 4 steps of 256


def test_eval_scoring_and_generation_report_items(lines, tiny_model_dir):
    from prefsculpt.data.planted import make_probes
    from prefsculpt.evals.capability import known_answer
    from prefsculpt.evals.style import generate_greedy
    from prefsculpt.models.loading import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    with P.scope("eval capability (policy)"):
        known_answer(model, tok, make_probes("known_answer", 5, seed=2), batch_tokens=64)
    generate_greedy(model, tok, ["What is 7 times 8?", "Hello", "Hi there"], max_new_tokens=2, batch_size=2)
    got = lines()
    assert_step(got, "eval capability (policy): scoring", 5, "items")
    assert_step(got, "generating", 3, "prompts")


def test_train_stage_reports_precompute_and_dpo_pairs_with_loss(lines, tiny_model_dir, tmp_path, mlflow_uri):
    import mlflow

    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    out = run_train(train_cfg(tiny_model_dir, tmp_path, train={"max_pairs": 8, "batch_size": 4,
                                                                 "precompute_batch_tokens": 64}))
    got = lines()
    n = out["optimizer_steps"] * 4  # pairs trained (batch 4, one epoch, no accumulation)
    assert n == 8
    assert_step(got, "precompute: reference log-probs", 8, "pairs")
    # the validation pairs' own reference pass is told apart from the training pairs'
    n_val = mlflow.get_run(out["run_id"]).data.metrics["train/val_pairs"]
    assert n_val > 0
    assert_step(got, "precompute (validation): reference log-probs", int(n_val), "pairs")
    assert_step(got, "DPO", 8, "pairs")
    assert any(re.search(r"^DPO: 4/8 pairs .* loss=[0-9.]+$", x) for x in got), got
    assert re.search(r"^DPO: done 8/8 pairs in .* pairs/s\), loss=[0-9.]+$", got[-1]), got


def test_search_worker_reports_trials_and_best_so_far(lines, tmp_path):
    from omegaconf import OmegaConf

    from prefsculpt.search.study import open_storage, open_study, run_worker

    url = f"sqlite:///{tmp_path / 'o.db'}"
    sc = OmegaConf.create({"study_name": "s", "n_trials": 3, "sampler": "random", "seed": 0, "heartbeat_interval": 1,
                           "grace_period": 2, "max_retry": 2, "storage": url})
    storage, lock = open_storage(url, sc)
    study, _ = open_study(sc, storage, lock, [], {})
    values = iter([(0.3, 0.5), (0.1, 0.7), (0.2, 0.9)])  # (off, on): #1 dominates #0; #1 and #2 the front
    run_worker(study, lambda trial: next(values), storage=storage)
    got = lines()
    after = {int(m[1]): x for x in got if (m := re.match(r"search: (\d)/3 trials", x))}
    assert after[1].endswith("pareto=1 best=#0 on=0.5 off=0.3")
    assert after[2].endswith("pareto=1 best=#1 on=0.7 off=0.1")
    assert got[-1].startswith("search: done 3/3 trials") and got[-1].endswith("pareto=2 best=#2 on=0.9 off=0.2")
    assert_step(got, "search", 3, "trials")
