"""Scoring a top-layers policy from the base's cached trunk gives the same log-probs as the full forward."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from prefsculpt.evals.logprobs import (
    SharedTrunk,
    build_items,
    first_changed_layer,
    score_choices,
    shared_trunk,
)
from prefsculpt.models.loading import load_model

PROMPTS = ["What is 2 + 2?", "Name the capital of France, please.", "Is water wet?", "Say something kind."]
CHOICES = [["4.", "5, I think."], ["Paris.", "Lyon is the capital."], ["Yes.", "No.", "It depends."], ["You are great!"]]


def _perturb(model, layer: int | None = None, embeddings: bool = False):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if embeddings:
            w = out.get_input_embeddings().weight
            w += 0.05 * torch.randn(w.shape, generator=g)
        else:
            for p in out.model.layers[layer].parameters():
                p += 0.05 * torch.randn(p.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def test_first_changed_layer(base):
    n = len(base.model.layers)
    assert first_changed_layer(copy.deepcopy(base), base) == n
    assert first_changed_layer(_perturb(base, layer=n - 1), base) == n - 1
    assert first_changed_layer(_perturb(base, layer=1), base) == 1
    assert first_changed_layer(_perturb(base, embeddings=True), base) == 0


def test_scores_from_the_cached_trunk_equal_the_full_forward_and_are_computed_once(base, tiny_tokenizer, tmp_path):
    n = len(base.model.layers)
    policy = _perturb(base, layer=n - 1)
    items = build_items(tiny_tokenizer, PROMPTS, CHOICES)
    full = score_choices(policy, items, 0, batch_tokens=64)  # small batches: several per item set
    calls = []

    def load_base():
        calls.append(1)
        return base

    src = SharedTrunk(policy, n - 1, load_base, "digest", tmp_path)
    with shared_trunk(src):
        first = score_choices(policy, items, 0, batch_tokens=64)
        again = score_choices(policy, items, 0, batch_tokens=64)
        other = score_choices(base, items, 0, batch_tokens=64)  # another model: its own full forward
    for a, b, c in zip(full, first, again, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
    assert calls == [1]  # the base ran once; the second scoring read the trunk from disk
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert any(not np.allclose(o, f) for o, f in zip(other, full, strict=True))  # the perturbation matters
    # the base's own scoring may reuse the trunk too (``also``): the same as its full forward
    with shared_trunk(SharedTrunk(policy, n - 1, load_base, "digest", tmp_path, also=(base,))):
        base_from_trunk = score_choices(base, items, 0, batch_tokens=64)
    for a, b in zip(other, base_from_trunk, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_a_trunk_claimed_above_a_changed_layer_would_give_other_scores(base, tiny_tokenizer, tmp_path):
    """The guard the evaluator relies on (first_changed_layer) is needed: trusting a wrong start changes the
    log-probs, so the equality above is not trivial."""
    n = len(base.model.layers)
    policy = _perturb(base, layer=0)
    items = build_items(tiny_tokenizer, PROMPTS, CHOICES)
    full = score_choices(policy, items, 0, batch_tokens=64)
    with shared_trunk(SharedTrunk(policy, n - 1, lambda: base, "digest", tmp_path)):
        wrong = score_choices(policy, items, 0, batch_tokens=64)
    assert any(not np.allclose(w, f, atol=1e-4) for w, f in zip(wrong, full, strict=True))
