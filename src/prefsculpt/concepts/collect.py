"""Layer-ℓ activations of the pairs, once: from the on-disk cache or one truncated forward pass.

Also the extra plain-text documents an SAE may be trained on (``sae.extra_text_files``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefsculpt.concepts.activations import ActivationCache, collect_activations
from prefsculpt.concepts.encoder import pairs_digest_tokens
from prefsculpt.concepts.sae import SAESourceError
from prefsculpt.core.device import model_device
from prefsculpt.core.files import json_digest, tmp_beside
from prefsculpt.models.hooks import truncated_forward

log = logging.getLogger(__name__)


def subset(cache: ActivationCache, pair_rows: Sequence[int]) -> ActivationCache:
    """The rows of the pairs ``pair_rows`` (pair_index still indexes the full pair list)."""
    keep = torch.isin(cache.pair_index, torch.as_tensor(list(pair_rows), dtype=cache.pair_index.dtype))
    return ActivationCache(
        acts=cache.acts[keep], pair_index=cache.pair_index[keep], span=cache.span[keep],
        position=cache.position[keep], token_id=cache.token_id[keep], special=cache.special[keep],
        pair_ids=cache.pair_ids, layer=cache.layer,
    )


def get_activations(model: Any, tokenized: Sequence[Any], tok: Any, layer: int, batch_tokens: int,
                    use_cache: bool, root: Path, model_id: str) -> tuple[ActivationCache, bool]:
    """Layer-ℓ activations of all pairs from the on-disk cache, or by running the model once."""
    path = root / "activations" / f"{json_digest(model_id, layer, pairs_digest_tokens(tokenized))}.safetensors"
    if path.exists():
        try:
            cache = ActivationCache.load(path, lazy=True)
            if cache.pair_ids == [t.id for t in tokenized] and cache.layer == layer:
                log.info("activations from cache %s", path)
                return cache, True
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            log.warning("ignoring unreadable activation cache %s (%s)", path, exc)
    # streamed to disk either way; a temporary file (use_cache false) is removed after use
    cache = collect_activations(model, tokenized, layer, batch_tokens=batch_tokens,
                                special_ids=tok.all_special_ids, pad_id=int(tok.pad_token_id or 0),
                                path=path if use_cache else tmp_beside(path), keep_file=use_cache)
    return cache, False


def extra_text_activations(model: Any, tok: Any, files: Sequence[str], layer: int, max_tokens: int,
                           batch: int = 16) -> torch.Tensor:
    """(M, d) layer-ℓ activations of extra training documents (one per line), special tokens and
    position 0 dropped (as for the pairs)."""
    docs: list[str] = []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise SAESourceError(f"sae.extra_text_files: {str(p)!r} does not exist (one document per line)")
        docs += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not docs:
        raise SAESourceError(f"sae.extra_text_files {list(files)} hold no non-empty lines")
    special = set(tok.all_special_ids)
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(docs), batch):
            enc = tok(docs[i : i + batch], add_special_tokens=False, truncation=True, max_length=max_tokens,
                      padding=True, return_tensors="pt")
            dev = model_device(model)
            h = truncated_forward(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), layer).float().cpu()
            keep = enc["attention_mask"].bool()
            keep[:, 0] = False
            keep &= ~torch.isin(enc["input_ids"], torch.tensor(sorted(special)))
            out.append(h[keep])
    log.info("extra text: %d documents, %d tokens", len(docs), sum(len(o) for o in out))
    return torch.cat(out)
