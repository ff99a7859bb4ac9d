"""A policy delta (the trained top layers against a reference to the base) reproduces the trained
policy exactly, and refuses any other base naming both fingerprints."""

import json

import pytest
import torch

from prefsculpt.core.files import model_fingerprint
from prefsculpt.models.delta import (
    MANIFEST,
    WEIGHTS,
    DeltaBaseMismatch,
    DeltaError,
    assemble_policy,
    changed_parameters,
    find_delta_dir,
    load_delta,
    save_delta,
)
from prefsculpt.models.loading import load_model, load_tokenizer
from prefsculpt.train.module import freeze_below


def _train_top(model_dir, top: int):
    """The base with its top ``top`` layers (+ final norm) moved as a few optimizer steps would."""
    model = load_model(model_dir)
    freeze_below(model, top)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_reproduces_the_trained_policy_exactly(tiny_model_dir, tmp_path):
    trained = _train_top(tiny_model_dir, 2)
    full = tmp_path / "full"
    trained.save_pretrained(str(full), safe_serialization=True)
    load_tokenizer(tiny_model_dir).save_pretrained(str(full))
    man = save_delta(trained, tmp_path / "delta", tiny_model_dir, "tiny", extra={"note": "x"})
    assert man["layers"] == [2, 3] and man["others"] == ["model.norm.weight"]
    assert man["base"]["fingerprint"] == model_fingerprint(tiny_model_dir) and man["extra"] == {"note": "x"}
    state, _ = load_delta(tmp_path / "delta")
    assert not any(".layers.0." in n or ".layers.1." in n or "embed" in n for n in state)
    assert man["n_parameters"] < man["n_base_parameters"] / 2

    out = assemble_policy(tmp_path / "delta", tiny_model_dir, tmp_path / "assembled")
    ids = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(load_model(out), ids), _logits(load_model(full), ids))
    assert not torch.equal(_logits(load_model(tiny_model_dir), ids), _logits(load_model(full), ids))
    # the same weights and config, byte for byte: the same content fingerprint as the trained folder
    assert model_fingerprint(out) == model_fingerprint(full)
    assert find_delta_dir(tmp_path) == tmp_path / "delta"


def test_a_frozen_parameter_that_moved_is_kept_too(tiny_model_dir):
    model = _train_top(tiny_model_dir, 1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)  # frozen, yet changed
    names = set(changed_parameters(model, tiny_model_dir))
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" not in names


def test_a_wrong_base_is_refused_naming_both_fingerprints(tiny_model_dir, tmp_path):
    from tests.tiny import make_model_dir

    save_delta(_train_top(tiny_model_dir, 1), tmp_path / "delta", tiny_model_dir, "tiny")
    other = make_model_dir(tmp_path / "other", seed=7)  # same architecture, other weights
    with pytest.raises(DeltaBaseMismatch) as e:
        assemble_policy(tmp_path / "delta", other, tmp_path / "assembled")
    msg = str(e.value)
    assert model_fingerprint(tiny_model_dir) in msg and model_fingerprint(other) in msg and "'tiny'" in msg
    assert not (tmp_path / "assembled").exists()


def test_a_tampered_delta_is_refused(tiny_model_dir, tmp_path):
    save_delta(_train_top(tiny_model_dir, 1), tmp_path / "d", tiny_model_dir, "tiny")
    man = json.loads((tmp_path / "d" / MANIFEST).read_text())
    man["sha256"] = "0" * 64
    (tmp_path / "d" / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(DeltaError, match="corrupt"):
        load_delta(tmp_path / "d")
    (tmp_path / "d" / WEIGHTS).unlink()
    with pytest.raises(DeltaError, match="not a policy delta"):
        load_delta(tmp_path / "d")
