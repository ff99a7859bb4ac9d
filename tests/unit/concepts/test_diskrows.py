"""Activations streamed to disk: same values as in RAM, read in bounded pieces, capped samples."""

import gc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefsculpt.concepts import sae as S
from prefsculpt.concepts.activations import ActivationCache, collect_activations
from prefsculpt.concepts.config import EncodeConfig, SAEConfig
from prefsculpt.concepts.diskrows import DiskRows, row_norms, take_rows
from prefsculpt.concepts.encoder import encode_pairs
from prefsculpt.concepts.shards import load_scores
from prefsculpt.models.loading import load_model
from tests.unit.concepts.test_encoder import LAYER, make_pairs, make_sae


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def test_streamed_cache_equals_the_in_memory_one(model, tmp_path):
    pairs = make_pairs(9)
    mem = collect_activations(model, pairs, LAYER, batch_tokens=30, special_ids=[2])
    disk = collect_activations(model, pairs, LAYER, batch_tokens=30, special_ids=[2], path=tmp_path / "a.safetensors")
    assert isinstance(disk.acts, DiskRows) and disk.acts.shape == tuple(mem.acts.shape)
    torch.testing.assert_close(disk.acts.read(), mem.acts, rtol=0, atol=0)
    for name in ("pair_index", "span", "position", "token_id", "special"):
        assert torch.equal(getattr(disk, name), getattr(mem, name)), name
    # the file is a plain safetensors file, readable eagerly and lazily
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["acts"], mem.acts)
    lazy = ActivationCache.load(tmp_path / "a.safetensors", lazy=True)
    assert lazy.pair_ids == mem.pair_ids and lazy.layer == LAYER
    torch.testing.assert_close(ActivationCache.load(tmp_path / "a.safetensors").acts, mem.acts, rtol=0, atol=0)
    # packed batches read from disk equal those from RAM
    for key, v in lazy.select([3, 0, 8]).items():
        assert torch.equal(v, mem.select([3, 0, 8])[key]), key
    # views: a mask, then rows in any order (reads span several windows when READ_ROWS is small)
    keep = mem.span == 1
    view = lazy.acts[keep]
    rows = np.array([5, 0, 3, 1])
    torch.testing.assert_close(view.read(rows), mem.acts[keep][torch.from_numpy(rows)], rtol=0, atol=0)
    torch.testing.assert_close(row_norms(lazy.acts), mem.acts.norm(dim=1))
    assert not list(tmp_path.glob(".a.safetensors.tmp-*"))  # the temporary name was renamed away


def test_encoder_reads_the_disk_cache(model, tmp_path):
    pairs = make_pairs(7)
    sae = make_sae(model.config.hidden_size)
    cfg = EncodeConfig(shard_size=3, batch_tokens=40, top_contexts=2)
    disk = collect_activations(model, pairs, LAYER, batch_tokens=40, path=tmp_path / "acts.safetensors")
    a = load_scores(encode_pairs(model, sae, pairs, tmp_path / "disk", cfg, LAYER, activations=disk))
    b = load_scores(encode_pairs(model, sae, pairs, tmp_path / "model", cfg, LAYER))
    for key, v in a.values.items():
        np.testing.assert_allclose(v, b.values[key], rtol=0, atol=1e-5, err_msg=str(key))


def test_temporary_file_goes_with_the_cache(model, tmp_path):
    path = tmp_path / "tmp.safetensors"
    cache = collect_activations(model, make_pairs(3), LAYER, path=path, keep_file=False)
    view = cache.acts[torch.ones(cache.n_tokens, dtype=torch.bool)]
    del cache
    gc.collect()
    assert path.exists()  # a view still reads it
    del view
    gc.collect()
    assert not path.exists()


def test_take_rows_caps_with_a_uniform_sample():
    x = torch.arange(1000, dtype=torch.float32).reshape(500, 2)
    rows = np.arange(0, 500, 2)
    np.testing.assert_array_equal(take_rows(x, rows).numpy(), x[rows].numpy())  # under the cap: all, in order
    got = take_rows(x, rows, cap=40, seed=3)[:, 0].numpy() / 2
    assert len(got) == 40 and len(set(got)) == 40 and set(got) <= set(rows) and (np.diff(got) > 0).all()
    assert np.array_equal(got, take_rows(x, rows, cap=40, seed=3)[:, 0].numpy() / 2)  # seeded
    # uniform: over many seeds each row is drawn about cap / len(rows) of the time
    hits = np.zeros(500)
    for seed in range(300):
        hits[(take_rows(x, rows, cap=50, seed=seed)[:, 0].numpy() / 2).astype(int)] += 1
    assert abs(hits[rows].mean() - 300 * 50 / 250) < 1e-9 and hits[rows].std() < 12


def test_sae_training_tokens_are_capped(model, tmp_path):
    cache = collect_activations(model, make_pairs(30, seed=2), LAYER, path=tmp_path / "a.safetensors")
    cfg = SAEConfig(max_norm_ratio=0.0, dedupe_prefixes=False, exclude_special=True)
    all_rows = S.select_training_tokens(cache, SAEConfig(**{**cfg.__dict__, "max_train_tokens": 0}))
    assert len(all_rows) == int((~cache.special).sum())
    capped = S.select_training_tokens(cache, SAEConfig(**{**cfg.__dict__, "max_train_tokens": 25}))
    assert capped.shape == (25, cache.d_model)
    # every sampled row is one of the qualifying rows
    assert (capped[:, None, :] == all_rows[None, :, :]).all(dim=-1).any(dim=1).all()
