import os
import signal

import numpy as np
import pytest
import torch

from prefsculpt.concepts import encoder as enc
from prefsculpt.concepts import shards
from prefsculpt.concepts.config import EncodeConfig
from prefsculpt.concepts.encoder import encode_pairs
from prefsculpt.concepts.shards import ShardStoreError, finished_shards, load_scores, merge_top
from prefsculpt.models.loading import load_model
from tests.unit.concepts.test_encoder import LAYER, make_pairs, make_sae


class SimulatedKill(Exception):
    pass


CFG = EncodeConfig(shard_size=3, batch_tokens=1000, top_contexts=3)  # 8 pairs -> shards of 3, 3, 2


@pytest.fixture
def setup(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    return model, make_sae(model.config.hidden_size), make_pairs(8)


@pytest.fixture
def counted(monkeypatch):
    """Pair indices that went through predict_step."""
    seen: list[int] = []
    orig = enc.ConceptEncoder.predict_step

    def step(self, batch, *a, **k):
        seen.extend(batch["pair_index"].tolist())
        return orig(self, batch, *a, **k)

    monkeypatch.setattr(enc.ConceptEncoder, "predict_step", step)
    return seen


def test_killed_run_resumes_without_redoing_finished_shards(setup, tmp_path, counted, monkeypatch):
    model, sae, pairs = setup
    ref = load_scores(encode_pairs(model, sae, pairs, tmp_path / "ref", CFG, LAYER))
    counted.clear()

    real_write = shards.write_shard
    writes = []

    def dying_write(out_dir, k, arrays):
        if writes:  # shard 0 is written, then the process "dies" while writing shard 1
            raise SimulatedKill  # (not KeyboardInterrupt: Lightning turns that into sys.exit)
        writes.append(k)
        return real_write(out_dir, k, arrays)

    monkeypatch.setattr(shards, "write_shard", dying_write)
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        encode_pairs(model, sae, pairs, out, CFG, LAYER)
    assert writes == [0] and finished_shards(out, 3) == {0}
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardStoreError, match="no complete"):
        load_scores(out)

    monkeypatch.setattr(shards, "write_shard", real_write)
    counted.clear()
    encode_pairs(model, sae, pairs, out, CFG, LAYER)
    assert sorted(counted) == list(range(3, 8))  # shard 0 (pairs 0-2) was not recomputed
    got = load_scores(out)
    for key, v in ref.values.items():
        np.testing.assert_array_equal(got.values[key], v)
    assert (out / "top_contexts.parquet").read_bytes() == (tmp_path / "ref" / "top_contexts.parquet").read_bytes()

    counted.clear()  # a complete store is not touched again
    encode_pairs(model, sae, pairs, out, CFG, LAYER)
    assert counted == []


def test_truncated_shard_is_detected_and_redone(setup, tmp_path, counted):
    model, sae, pairs = setup
    out = encode_pairs(model, sae, pairs, tmp_path / "run", CFG, LAYER)
    before = load_scores(out)
    path = out / "shard-00001.npz"
    path.write_bytes(path.read_bytes()[:-100])  # truncated behind our back
    with pytest.raises(ShardStoreError, match="shard-00001.npz"):
        load_scores(out)
    assert finished_shards(out, 3) == {0, 2}
    counted.clear()
    encode_pairs(model, sae, pairs, out, CFG, LAYER)
    assert sorted(counted) == [3, 4, 5]
    np.testing.assert_array_equal(load_scores(out).get("chosen"), before.get("chosen"))


def test_sigterm_stops_the_run_and_the_rerun_resumes(setup, tmp_path, monkeypatch):
    model, sae, pairs = setup
    orig = enc.ConceptEncoder.predict_step
    sent = []

    def step(self, batch, *a, **k):
        if 3 in batch["pair_index"].tolist() and not sent:  # first batch of shard 1
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only records it
        return orig(self, batch, *a, **k)

    monkeypatch.setattr(enc.ConceptEncoder, "predict_step", step)
    out = tmp_path / "run"
    with pytest.raises(enc.EncodeInterrupted, match="SIGTERM"):
        encode_pairs(model, sae, pairs, out, CFG, LAYER)
    assert finished_shards(out, 3) == {0, 1}  # the batch in flight (all of shard 1) completes; then it stops
    seen = []
    monkeypatch.setattr(enc.ConceptEncoder, "predict_step",
                        lambda self, batch, *a, **k: seen.extend(batch["pair_index"].tolist()) or orig(self, batch, *a, **k))
    assert load_scores(encode_pairs(model, sae, pairs, out, CFG, LAYER)).n_pairs == 8
    assert sorted(seen) == [6, 7]


def _fake_shard(n=2, f=3):
    arrays = {"pair_ids": np.array([f"p{i}" for i in range(n)])}
    for span in ("prompt", "chosen", "rejected"):
        arrays[f"{span}_max"] = arrays[f"{span}_freq"] = np.ones((n, f), np.float32)
        arrays[f"{span}_n_tokens"] = np.full(n, 2, np.int32)
    return arrays


def test_shard_without_index_line_is_not_finished(tmp_path):
    for k in range(3):
        shards.write_shard(tmp_path, k, _fake_shard())
    assert finished_shards(tmp_path, 3) == {0, 1, 2}
    lines = (tmp_path / "shards.jsonl").read_text().splitlines()
    # killed after the rename of shard 2 but before its index line was complete
    (tmp_path / "shards.jsonl").write_text("\n".join(lines[:2]) + '\n{"shard": 2, "sha')
    assert finished_shards(tmp_path, 3) == {0, 1}
    (tmp_path / "shard-00000.npz").unlink()
    assert finished_shards(tmp_path, 3) == {1}


def test_missing_manifest_is_not_complete(tmp_path):
    plan = {"layer": 1, "sae_digest": "x", "concept_names": ["latent:0", "latent:1", "latent:2"]}
    for k in range(2):
        shards.write_shard(tmp_path, k, _fake_shard())
    with pytest.raises(ShardStoreError, match="manifest.json"):
        load_scores(tmp_path)
    shards.write_manifest(tmp_path, plan, n_pairs=4, n_shards=2)
    assert load_scores(tmp_path).get("chosen").shape == (4, 3)
    with pytest.raises(ShardStoreError, match="no complete"):
        load_scores(tmp_path / "empty")


def test_changed_plan_starts_over(setup, tmp_path, counted):
    model, sae, pairs = setup
    out = encode_pairs(model, sae, pairs, tmp_path / "run", CFG, LAYER)
    with torch.no_grad():
        sae.W_enc.mul_(2.0)  # another SAE: old shards must not be reused
    counted.clear()
    encode_pairs(model, sae, pairs, out, CFG, LAYER)
    assert sorted(counted) == list(range(8))


def test_merge_top_keeps_the_largest():
    a = (np.array([[5.0, 1.0], [2.0, 0.0]]), np.array([[0, 0], [1, 1]]), np.array([[3, 3], [4, 4]]))
    b = (np.array([[4.0, 7.0]]), np.array([[9, 9]]), np.array([[8, 8]]))
    v, p, pos = merge_top(a, b, 2)
    np.testing.assert_array_equal(v, [[5.0, 7.0], [4.0, 1.0]])
    np.testing.assert_array_equal(p, [[0, 9], [9, 0]])
    np.testing.assert_array_equal(pos, [[3, 8], [8, 3]])
