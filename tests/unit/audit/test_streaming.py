"""The audit from a shard store, concept block by concept block, equals the audit on loaded scores."""

import numpy as np
import pandas as pd
import pytest

from prefsculpt.audit import clusters as C
from prefsculpt.audit import stats as St
from prefsculpt.audit import streaming as SS
from prefsculpt.audit.stats import calibrate, test_concepts
from prefsculpt.concepts import shards
from prefsculpt.concepts.scores import SPANS, ConceptScores
from prefsculpt.concepts.store import ScoreStore, block_size


def _fixture(tmp_path, n=90, f=40, shard=25, seed=0):
    """A sparse store of n pairs x f concepts in shards of ``shard`` pairs, and the same as dense scores."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 6))
    fac = rng.integers(6, size=f)

    def side(shift):
        z = factors[:, fac] + 0.8 * rng.normal(size=(n, f)) + shift
        return np.maximum(z - 1.2, 0.0).astype(np.float32)  # co-firing through shared factors, ~20% nonzero

    vals = {}
    for span, shift in (("prompt", 0.0), ("chosen", np.r_[np.full(5, 0.6), np.zeros(f - 5)]), ("rejected", 0.0)):
        mx = side(shift)
        mx[2:, 37] = 0.0  # a rare latent: below min_support / min_nonzero, so untested
        vals[(span, "max")] = mx
        vals[(span, "freq")] = np.where(mx > 0, rng.uniform(0.05, 1.0, size=mx.shape), 0.0).astype(np.float32)
    n_tokens = {s: rng.integers(5, 60, size=n).astype(np.int32) for s in SPANS}
    n_tokens["chosen"] = (n_tokens["rejected"] + (vals[("chosen", "max")][:, 0] > 0) * 10).astype(np.int32)
    names = [f"latent:{j}" for j in range(f - 2)] + ["named:bold", "named:emoji"]
    ids = [f"pair-{i}" for i in range(n)]
    n_shards = -(-n // shard)
    for k in range(n_shards):
        a, b = k * shard, min(n, (k + 1) * shard)
        arrays = {"pair_ids": np.array(ids[a:b])}
        for span in SPANS:
            arrays[f"{span}_max"], arrays[f"{span}_freq"] = vals[(span, "max")][a:b], vals[(span, "freq")][a:b]
            arrays[f"{span}_n_tokens"] = n_tokens[span][a:b]
        shards.write_shard(tmp_path, k, arrays)
    shards.write_manifest(tmp_path, {"layer": 1, "sae_digest": "x", "concept_names": names}, n, n_shards)
    return ScoreStore(tmp_path), ConceptScores(ids, vals, n_tokens, names)


def _keys(n):
    return [f"prompt-{i // 2}" for i in range(n)]


def test_shards_are_stored_sparse_and_read_back_exactly(tmp_path):
    store, dense = _fixture(tmp_path)
    with np.load(tmp_path / "shard-00000.npz") as z:
        assert "chosen_max" in z.files and z["chosen_max"].ndim == 1  # values on the pattern only
        assert len(z["chosen_rows"]) == int((dense.get("chosen")[:25] != 0).sum())
    back = shards.load_scores(tmp_path)
    for key, v in dense.values.items():
        np.testing.assert_array_equal(back.values[key], v)
    assert store.pair_ids == dense.pair_ids and store.n_pairs == 90 and store.n_concepts == 40
    np.testing.assert_array_equal(store.length_diff(), dense.length_diff())


@pytest.mark.parametrize("block", [7, None])
def test_streamed_table_equals_the_in_memory_table(tmp_path, block):
    store, dense = _fixture(tmp_path)
    groups = [[0, 1, 2], [3, 4, 10, 11]]
    kw = dict(stat="max", min_nonzero=5, min_support=0.02, fdr=0.1)
    ref = test_concepts(dense, _keys(90), clusters=groups, extra={"length": dense.length_diff()}, **kw)
    got, _ = SS.test_store(store, _keys(90), clusters=groups, extra={"length": store.length_diff()}, block=block, **kw)
    assert ref["significant"].any() and (~ref["tested"]).any()  # the fixture exercises both branches
    assert got["concept"].tolist() == ref["concept"].tolist()
    # cluster means: the store averages in float64 then rounds to float32, test_concepts in float32
    pd.testing.assert_frame_equal(got, ref, check_exact=False, rtol=1e-5, atol=1e-6)


def test_streamed_calibration_equals_calibrate(tmp_path):
    store, dense = _fixture(tmp_path)
    kw = dict(stat="max", min_nonzero=5, test="wilcoxon")
    ref = calibrate(dense, _keys(90), n_seeds=4, extra={"length": dense.length_diff()}, **kw)
    got = SS.calibrate_store(store, _keys(90), n_seeds=4, extra={"length": store.length_diff()}, block=9, **kw)
    pd.testing.assert_frame_equal(got, ref, check_exact=False, rtol=1e-9)


def test_latent_groups_and_diffs_and_activity_equal_the_dense_versions(tmp_path):
    store, dense = _fixture(tmp_path)
    cols = list(range(38))
    firing = C.firing_matrix(dense, "max")[:, cols]
    ref = C.latent_clusters(firing, top_fraction=0.05, min_size=2, seed=0)
    assert ref  # the fixture has co-firing groups
    assert SS.latent_groups(store, "max", cols, 0.05, 2, 0) == [[cols[i] for i in g] for g in ref]

    names = ["latent:3", "cluster:0", "named:bold", "length"]
    d = SS.concept_diffs(store, names, "max", {"cluster:0": [0, 1, 2]})
    full = dense.diff("max").astype(np.float64)
    np.testing.assert_allclose(d[:, 0], full[:, 3], rtol=1e-6)
    np.testing.assert_allclose(d[:, 1], full[:, [0, 1, 2]].mean(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d[:, 2], full[:, 38], rtol=1e-6)
    np.testing.assert_array_equal(d[:, 3], dense.length_diff())

    sym = SS.symmetric_activity(store, "max", cols)
    ref_sym = (dense.get("chosen") + dense.get("rejected"))[:, cols].astype(np.float64)
    np.testing.assert_array_equal(sym.toarray(), ref_sym)
    np.testing.assert_array_equal(C.active_rows(sym), C.active_rows(ref_sym))
    np.testing.assert_array_equal(C.data_clusters(sym, 3, seed=0), C.data_clusters(ref_sym, 3, seed=0))
    labels = C.data_clusters(ref_sym, 3, seed=0)
    assert C.central_rows(labels, sym) == C.central_rows(labels, ref_sym)


def test_block_size_bounds_the_block_whatever_the_pairs():
    assert block_size(1_000) == 1024 and block_size(100_000) == 40 and block_size(10**9) == 16
    for n in (2_000, 20_000, 200_000):
        assert n * block_size(n) <= 4_000_000


def test_store_names_a_bad_cluster_and_missing_files(tmp_path):
    store, _ = _fixture(tmp_path)
    with pytest.raises(ValueError, match="latent cluster 0"):
        SS.test_store(store, _keys(90), clusters=[[0, 99]])
    (tmp_path / "shard-00001.npz").write_bytes(b"truncated")
    with pytest.raises(shards.ShardStoreError, match="shard-00001.npz"):
        ScoreStore(tmp_path)


def test_latent_structure_and_calibration_cover_every_cluster_family(tmp_path):
    """One pass of co-firing counts gives the Leiden clusters and the near-duplicate groups, and the
    swap nulls computed with the table run over exactly its concepts: latent clusters included."""
    store, dense = _fixture(tmp_path)
    cols = list(range(38))
    groups, dups = SS.latent_structure(store, "max", cols, None, top_fraction=0.05, min_size=2, seed=0,
                                       min_corr=0.3)
    assert groups == SS.latent_groups(store, "max", cols, 0.05, 2, 0)
    firing = C.firing_matrix(dense, "max")[:, cols].astype(np.float64)
    assert dups == C.near_duplicates(firing.T @ firing, firing.sum(axis=0), len(firing), None, 0.3)
    assert SS.latent_structure(store, "max", cols, None, clusters=False, duplicates=False) == ([], [])
    every = groups + dups
    assert every  # the fixture has both kinds or at least one
    table, nulls = SS.test_store(store, _keys(90), clusters=every, flips=St.swap_flips(90, 3), min_nonzero=5)
    assert len(nulls) == 3
    clusters = {f"cluster:{i}" for i in range(len(every))}
    for null in nulls:
        assert set(null["concept"]) == set(table["concept"]) and clusters <= set(null["concept"])
        np.testing.assert_array_equal(null.set_index("concept").loc[sorted(clusters), "tested"],
                                      table.set_index("concept").loc[sorted(clusters), "tested"])
