import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from prefsculpt.audit.clusters import (
    binary_nmi,
    cluster_scores,
    data_clusters,
    firing_matrix,
    latent_clusters,
    where_it_holds,
)
from prefsculpt.audit.stats import half_assignment, test_concepts
from prefsculpt.concepts.scores import ConceptScores


def _planted_data(rng, n=600, k=3, block=20):
    """Pairs in k topics; each topic lights its own block of latents (symmetric activity)."""
    truth = rng.integers(k, size=n)
    f = k * block + 10
    sym = np.abs(rng.normal(0, 0.2, size=(n, f)))
    for j in range(k):
        rows = truth == j
        sym[np.ix_(rows, np.arange(j * block, (j + 1) * block))] += rng.exponential(2.0, size=(rows.sum(), block))
    sym *= rng.uniform(0.2, 5.0, size=(n, 1))  # response size varies: cosine clustering must ignore it
    return truth, sym


def test_data_clusters_recover_planted_topics_deterministically():
    rng = np.random.default_rng(0)
    truth, sym = _planted_data(rng)
    labels = data_clusters(sym, k=3, seed=1)
    assert adjusted_rand_score(truth, labels) > 0.99
    assert (data_clusters(sym, k=3, seed=1) == labels).all()
    assert np.bincount(labels)[0] >= np.bincount(labels)[1] >= np.bincount(labels)[2]  # numbered by size
    sym[5] = 0.0  # a pair with no activity at all
    assert data_clusters(sym, k=3, seed=1)[5] == -1
    with pytest.raises(ValueError, match="k=1000"):
        data_clusters(sym, k=1000)


def test_where_it_holds_finds_the_cluster_with_the_effect():
    rng = np.random.default_rng(1)
    truth, sym = _planted_data(rng)
    labels = data_clusters(sym, k=3, seed=0)
    n = len(truth)
    d = rng.normal(size=(n, 5))
    target = labels[np.flatnonzero(truth == 2)[0]]
    d[labels == target, 3] += 1.0  # concept 3 separates the pair only inside one data cluster
    half = half_assignment([f"k{i}" for i in range(n)])
    res = where_it_holds(d, labels, half, min_size=30, concept_index=[10, 11, 12, 13, 14])
    assert len(res) == 3 * 5 and set(res["cluster"]) == {0, 1, 2}
    top = res.loc[res["welch_z"].abs().idxmax()]
    assert top["concept_index"] == 13 and top["cluster"] == target
    assert top["welch_z"] > 8 and top["cohen_d"] > 0.7 and top["agree_halves"]
    others = res[res["concept_index"] != 13]
    assert others["welch_z"].abs().max() < 4
    # a cluster below the minimum size is not reported
    assert target not in set(where_it_holds(d, labels, half, min_size=(labels == target).sum() + 1)["cluster"])


def test_binary_nmi_matches_sklearn():
    rng = np.random.default_rng(2)
    x = rng.random((300, 6)) < np.array([0.05, 0.3, 0.5, 0.3, 0.9, 0.0])
    x[:, 3] = x[:, 1] ^ (rng.random(300) < 0.1)  # a noisy copy of column 1
    co, cnt = x.T.astype(float) @ x, x.sum(axis=0)
    nmi = binary_nmi(co, cnt, cnt, 300)
    for i in range(5):
        for j in range(5):
            assert nmi[i, j] == pytest.approx(normalized_mutual_info_score(x[:, i], x[:, j]), abs=1e-9)
    assert (nmi[5] == 0).all()  # a latent that never fires shares nothing
    assert nmi[1, 3] > 0.4 > nmi[0, 2]


def test_latent_clusters_group_noisy_copies_of_hidden_factors():
    rng = np.random.default_rng(3)
    m = 2000
    factors = rng.random((m, 3)) < 0.15  # three hidden concepts
    copies = [factors[:, g] & (rng.random(m) > 0.1) | (rng.random(m) < 0.02) for g in range(3) for _ in range(8)]
    noise = [rng.random(m) < rng.uniform(0.02, 0.3) for _ in range(40)]
    firing = np.stack(copies + noise, axis=1)  # (m, 64): latents 0-7, 8-15, 16-23 copy factors 0, 1, 2
    # 4% of the 2,016 pairs = 81 edges, about the 84 within-factor pairs (the paper keeps 1% of far more)
    perm = rng.permutation(firing.shape[1])
    clusters = latent_clusters(firing[:, perm], top_fraction=0.04, min_size=4, seed=0)
    groups = sorted(sorted(int(perm[i]) for i in c) for c in clusters)
    assert groups == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert latent_clusters(np.zeros((10, 6), bool)) == []


def test_cluster_scores_and_testing_clusters_like_latents():
    rng = np.random.default_rng(4)
    n, f = 300, 12
    vals = {(s, t): rng.exponential(size=(n, f)).astype(np.float32)
            for s in ("prompt", "chosen", "rejected") for t in ("max", "freq")}
    vals[("chosen", "max")][:, [2, 5, 7]] += 0.6  # a concept spread over three latents
    sc = ConceptScores([f"p{i}" for i in range(n)], vals,
                       {s: np.full(n, 40) for s in ("prompt", "chosen", "rejected")}, [f"latent:{j}" for j in range(f)])
    out = cluster_scores(sc, [[2, 5, 7], [0, 1]])
    assert out.concept_names[-2:] == ["cluster:0", "cluster:1"]
    np.testing.assert_allclose(out.get("chosen", "freq")[:, f], vals[("chosen", "freq")][:, [2, 5, 7]].mean(1), rtol=1e-6)
    assert firing_matrix(sc).shape == (2 * n, f)
    df = test_concepts(sc, [f"k{i}" for i in range(n)], clusters=[[2, 5, 7], [0, 1]], extra={}).set_index("concept")
    assert df.loc["cluster:0", "kind"] == "cluster" and df.loc["cluster:0", "index"] == 0
    assert df.loc["cluster:0", "significant"] and not df.loc["cluster:1", "significant"]
    # the mean of three shifted latents is a stronger signal than any one of them
    assert df.loc["cluster:0", "d_z"] > df.loc[["latent:2", "latent:5", "latent:7"], "d_z"].max()
    with pytest.raises(ValueError, match="latent cluster 0"):
        cluster_scores(sc, [[3, 99]])


def _dup_world(rng, m=600):
    """Binary firing over m responses: latents 0-2 are one feature learned three times (fire together,
    same top activations); 3 and 4 fire together but on other tokens; 5 and 6 fire on almost every
    response, independently, with the same top tokens; 7-9 independent."""
    f = 10
    fire = rng.random((m, f)) < 0.15
    base = rng.random(m) < 0.2
    for j in (0, 1, 2):
        fire[:, j] = base ^ (rng.random(m) < 0.02)  # ~2% disagreement
    other = rng.random(m) < 0.3
    fire[:, 3], fire[:, 4] = other, other ^ (rng.random(m) < 0.02)
    fire[:, 5] = rng.random(m) < 0.97
    fire[:, 6] = rng.random(m) < 0.97
    names = [f"latent:{j}" for j in range(f)]
    rows = []
    for j in range(f):
        for k in range(8):
            # the duplicates' top activations sit on the same tokens (0-2: positions 0-7 of p0-p7, half
            # of them drawn from other occurrences of ' quite' for latent 2); 3 and 4 on different tokens
            pos = k if j in (0, 1) or (j == 2 and k < 4) else 100 * j + k
            tok = {0: " quite", 1: " quite", 2: " quite", 3: " very", 4: ".", 5: ".", 6: "."}.get(j, f"t{j}")
            rows.append(dict(concept=names[j], pair_id=f"p{k}", span="chosen", position=pos, token=tok))
    rows.append(dict(concept="latent:0", pair_id="p0", span="prompt", position=0, token="x"))
    return fire, names, pd.DataFrame(rows)


def test_near_duplicates_group_latents_that_fire_together_on_the_same_tokens():
    from prefsculpt.audit.clusters import context_keys, context_overlap, firing_correlation, near_duplicates

    fire, names, top = _dup_world(np.random.default_rng(0))
    x = fire.astype(np.float64)
    co, cnt, m = x.T @ x, x.sum(axis=0), len(x)
    prof = context_keys(top, names)
    assert context_overlap(prof[0], prof[2]) == 1.0 and context_overlap(prof[3], prof[4]) == 0.0
    assert near_duplicates(co, cnt, m, prof) == [[0, 1, 2]]  # 2 shares half its positions, all its tokens
    # firing alone would merge 3 and 4 (the context test keeps them apart); 5 and 6 never: they fire
    # everywhere but not together (the correlation is ~0 where a Jaccard index would be ~0.94)
    assert near_duplicates(co, cnt, m, None) == [[0, 1, 2], [3, 4]]
    phi = firing_correlation(co, cnt, cnt, m)
    assert phi[0, 1] > 0.9 and abs(phi[5, 6]) < 0.15
    assert near_duplicates(co, cnt, m, prof, min_corr=0.99) == []
