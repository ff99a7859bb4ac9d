"""Tiny things for the eval tests: a composed config with the eval group, a sharp tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from prefsculpt.evals.config import EvalConfig

CONF = Path(__file__).resolve().parents[3] / "conf" / "eval"


def eval_cfg(model_dir, tmp_path, eval_over: dict[str, Any] | None = None, extra: dict[str, Any] | None = None):
    """``experiment=tiny`` + ``conf/eval/tiny.yaml`` on the tiny llama, with an isolated cache."""
    from prefsculpt.config import compose

    base = compose("experiment=tiny")
    OmegaConf.set_struct(base, False)
    tiny = {k: v for k, v in yaml.safe_load((CONF / "tiny.yaml").read_text()).items() if k != "defaults"}
    ev = base.get("eval") or OmegaConf.structured(EvalConfig)
    ev = OmegaConf.merge(ev, tiny, eval_over or {})
    cfg = OmegaConf.merge(base, {"eval": ev, "model": {"name_or_path": str(model_dir)},
                                 "cache_dir": str(tmp_path / "cache"), "sae": {"layer": 2}},
                          {"data": {"planted": {"n_pairs": 60, "clean_pairs": 20}}}, extra or {})
    OmegaConf.set_struct(cfg, False)
    return cfg


def sharpen(model, std: float = 0.5, seed: int = 0):
    """Re-draw the weights with a large spread, so a random tiny model's greedy output depends on its
    input (the default init gives near-uniform logits and one repeated token)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
