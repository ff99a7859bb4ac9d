import re

import numpy as np
import pytest
import torch

from prefsculpt.concepts import named as N
from prefsculpt.concepts.activations import ActivationCache
from prefsculpt.concepts.config import NamedConceptConfig
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.tokenize import tokenize_pairs
from prefsculpt.models.loading import load_model

D = 32
BOLD = r"\*\*[^*\n]+\*\*"


def unit(d=D, seed=3):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_mean_difference_recovers_a_planted_direction():
    u = unit()
    neg = torch.randn(400, D)
    pos = torch.randn(300, D) + 3 * u
    v, b, acc = N.mean_difference_direction(pos, neg)
    assert float(v @ u) > 0.95 and v.norm().item() == pytest.approx(1, abs=1e-5)
    assert b == pytest.approx(1.5, abs=0.3)  # midpoint of the projections 0 and 3
    assert acc > 0.9
    with pytest.raises(N.NamedConceptError, match="same mean"):
        N.mean_difference_direction(neg, neg)


def test_aligned_latents_rank_by_cosine():
    u = unit()
    w = torch.randn(20, D) * 0.1
    w[7] = 5 * u  # norm must not matter, only direction
    w[3] = u + 0.5 * unit(seed=9)
    top, cos = N.aligned_latents(u, w, 2)
    assert top == [7, 3] and cos[0] == pytest.approx(1, abs=1e-5) and cos[1] < cos[0]


def test_regex_token_labels_mark_overlapping_tokens():
    text = "So **Paris** it is"
    offsets = [(0, 2), (2, 5), (5, 10), (10, 13), (13, 16), (16, 19)]  # "So", " **", "Paris", "** ", "it ", "is"
    labels = N.regex_token_labels(text, offsets, re.compile(BOLD))
    assert labels.tolist() == [False, True, True, True, False, False]


def synthetic_cache(pairs, tokenizer, u, strength=4.0):
    """Random activations in the cache layout, with ``strength * u`` added on tokens inside a bold match."""
    tok = tokenize_pairs(pairs, tokenizer, 64, 64)
    g = torch.Generator().manual_seed(0)
    acts, pair_index, span, position, token_id = [], [], [], [], []
    for i, (p, t) in enumerate(zip(pairs, tok, strict=True)):
        for sid, ids in ((0, t.prompt_ids), (1, t.chosen_ids), (2, t.rejected_ids)):
            a = torch.randn(len(ids), D, generator=g)
            if sid:
                text = p.chosen if sid == 1 else p.rejected
                offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                lab = N.regex_token_labels(text, offs, re.compile(BOLD))
                a[: len(lab)][torch.from_numpy(lab[: len(ids)])] += strength * u
            acts.append(a)
            pair_index += [i] * len(ids)
            span += [sid] * len(ids)
            start = 0 if sid == 0 else len(t.prompt_ids)  # both responses follow the prompt
            position += list(range(start, start + len(ids)))
            token_id += ids
    return ActivationCache(
        acts=torch.cat(acts), pair_index=torch.tensor(pair_index), span=torch.tensor(span, dtype=torch.int8),
        position=torch.tensor(position), token_id=torch.tensor(token_id, dtype=torch.int32),
        special=torch.zeros(len(token_id), dtype=torch.bool), pair_ids=[p.id for p in pairs], layer=1,
    )


@pytest.fixture
def styled_pairs():
    return [
        PreferencePair(f"p{i}", f"What is the capital? {i}",
                       "The answer is **Paris** today." if i % 2 else "The answer is Paris.",
                       "It is **Paris** I think." if i % 3 == 0 else "Water boils at 100 degrees.")
        for i in range(24)
    ]


def test_regex_concept_recovers_the_direction_at_matching_tokens(styled_pairs, tiny_tokenizer):
    u = unit()
    cache = synthetic_cache(styled_pairs, tiny_tokenizer, u)
    w_dec = torch.randn(16, D)
    w_dec[11] = u

    class FakeSAE:
        W_dec = w_dec

    cfg = NamedConceptConfig(name="bold", kind="regex", pattern=BOLD, top_latents=3)
    (c,) = N.build_named_concepts([cfg], cache=cache, pairs=styled_pairs, pair_rows=range(24),
                                  tokenizer=tiny_tokenizer, sae=FakeSAE())
    assert float(c.vector @ u) > 0.9
    assert c.top_latents[0] == 11 and c.top_cosines[0] > 0.9
    assert c.separation > 0.9 and c.n_positive > 0 and c.n_negative > 0
    # The bias sits between the classes: matching tokens score above it, the rest mostly below.
    h = cache.acts @ c.vector
    assert c.bias == pytest.approx(2.0, abs=0.6)
    assert (h > c.bias).float().mean() < 0.5
    d = N.as_directions([c])
    assert d.vectors.shape == (1, D) and d.names == ["bold"]


def test_regex_without_matches_or_contrast_is_an_error(styled_pairs, tiny_tokenizer):
    cache = synthetic_cache(styled_pairs, tiny_tokenizer, unit())
    kw = dict(cache=cache, pairs=styled_pairs, pair_rows=range(24), tokenizer=tiny_tokenizer)
    with pytest.raises(N.NamedConceptError, match="'emoji'.*matches none of the 48"):
        N.build_named_concepts([NamedConceptConfig(name="emoji", pattern="\U0001F600")], **kw)
    with pytest.raises(N.NamedConceptError, match="'any'.*matches every"):
        N.build_named_concepts([NamedConceptConfig(name="any", pattern="a")], **kw)
    # A generic surface feature the data lacks can be marked optional: skipped, the others still built.
    got = N.build_named_concepts([NamedConceptConfig(name="emoji", pattern="\U0001F600", required=False),
                                  NamedConceptConfig(name="bold", pattern=BOLD)], **kw)
    assert [c.name for c in got] == ["bold"]


@pytest.mark.parametrize(
    "cfgs, msg",
    [
        ([NamedConceptConfig(name="x", kind="vibes")], "'x': unknown kind 'vibes'"),
        ([NamedConceptConfig(name="x", kind="regex")], "'x' .kind regex. has no pattern"),
        ([NamedConceptConfig(name="x", pattern="(")], "'x': invalid regex"),
        ([NamedConceptConfig(name="x", kind="contrastive", positive=["a"])], "'x' .kind contrastive. needs"),
        ([NamedConceptConfig(name="x", pattern="a"), NamedConceptConfig(name="x", pattern="b")], "'x' is defined twice"),
        ([NamedConceptConfig(pattern="a")], "has no name"),
    ],
)
def test_bad_configs_name_the_concept(cfgs, msg):
    with pytest.raises(N.NamedConceptError, match=msg):
        N.validate_concepts(cfgs)


def test_contrastive_concept_on_the_tiny_model(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir).eval()
    pos = ["What a great question! You're right!", "You're right! What a great question!"]
    neg = ["Water boils at 100 degrees Celsius.", "There are 8 planets in the solar system."]
    means = N.text_means(model, tiny_tokenizer, pos + neg, layer=1)
    assert means.shape == (4, D) and torch.isfinite(means).all()
    cfg = NamedConceptConfig(name="praise", kind="contrastive", positive=pos, negative=neg)
    (c,) = N.build_named_concepts([cfg], cache=None, pairs=[], pair_rows=[], tokenizer=tiny_tokenizer,
                                  model=model, layer=1)
    expected = means[:2].mean(0) - means[2:].mean(0)
    assert torch.allclose(c.vector, expected / expected.norm(), atol=1e-5)
    assert c.separation == 1.0  # two texts per side, separated by construction of the midpoint
    assert np.isfinite(c.bias) and c.top_latents == []
