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


def direct_logprob(model, tok, conv, response: str, prefix: str = "") -> float:
    """log π(response | conv) by definition: chat template + assistant header (+ prefix), the response
    tokenised on its own and appended, one forward pass, the response tokens' log-probs summed."""
    import torch

    from prefsculpt.models.loading import ensure_chat_template

    ensure_chat_template(tok)
    msgs = [{"role": "user", "content": conv}] if isinstance(conv, str) else [dict(m) for m in conv]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + prefix
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)
    return sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
