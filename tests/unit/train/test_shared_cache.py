"""What search trials share is computed once: a second trial on the same pairs reads the reference
log-probs and the trunk from the content-addressed cache; another base model or other trained layers
rebuild them (issue 17.1)."""

from __future__ import annotations

import pytest

from prefsculpt.train import precompute as P


@pytest.fixture
def counted(monkeypatch):
    """Counts the reference passes (RefContext._logps over the training pairs) and the trunk passes."""
    calls = {"ref": 0, "trunk": 0}
    logps, trunk = P.RefContext._logps, P.RefContext.trunk

    def count_logps(self, tokenized, hooks, capture=None):
        if hooks is None and tokenized is self.tokenized:
            calls["ref"] += 1
        return logps(self, tokenized, hooks, capture)

    def count_trunk(self, edits=()):
        if self._trunk is None or edits:
            calls["trunk"] += 1
        return trunk(self, edits)

    monkeypatch.setattr(P.RefContext, "_logps", count_logps)
    monkeypatch.setattr(P.RefContext, "trunk", count_trunk)
    return calls


def _train(model_dir, tmp_path, cache, top_layers=2, concepts=(), **shaping):
    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    cfg = train_cfg(model_dir, tmp_path, train={"max_pairs": 8, "train_top_layers": top_layers, "val_pairs": 0},
                    shaping={"concepts": list(concepts), **shaping}, extra={"cache_dir": str(cache)})
    return run_train(cfg)


def test_a_second_trial_reuses_the_cache_and_a_new_base_or_layers_rebuild_it(tiny_model_dir, tmp_path, mlflow_uri,
                                                                              counted):
    from tests.tiny import make_model_dir

    cache = tmp_path / "shared-cache"
    _train(tiny_model_dir, tmp_path / "t1", cache)
    first = dict(counted)
    assert first["ref"] == 1  # the reference pass also captured the trunk (no separate trunk pass)
    # another trial: other shaping, same pairs and base -> nothing recomputed
    _train(tiny_model_dir, tmp_path / "t2", cache,
           concepts=[{"concept": "length", "method": "score", "action": "suppress", "strength": 0.5}])
    assert counted == first
    # a method whose ΔA compares hooked log-probs with the reference (steer) reads the cached reference too
    import torch
    from safetensors.torch import save_file

    dirs = tmp_path / "dirs.safetensors"
    save_file({"named:marker": torch.randn(32)}, str(dirs))
    _train(tiny_model_dir, tmp_path / "t2s", cache, layer=3, directions_path=str(dirs),
           concepts=[{"concept": "named:marker", "method": "steer", "action": "suppress", "strength": 0.5}])
    assert counted["ref"] == first["ref"]
    first = dict(counted)
    entries = set((cache / "precompute").glob("*.safetensors"))
    # other trained layers: the trunk (input of another layer) is rebuilt, the reference is reused
    _train(tiny_model_dir, tmp_path / "t3", cache, top_layers=1)
    assert counted["ref"] == first["ref"] and counted["trunk"] == first["trunk"] + 1
    assert len(set((cache / "precompute").glob("*.safetensors")) - entries) == 1
    # another base model: everything is rebuilt
    other = make_model_dir(tmp_path / "other-base", seed=1)
    _train(other, tmp_path / "t4", cache, top_layers=1)
    assert counted["ref"] == first["ref"] + 1
