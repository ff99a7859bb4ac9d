"""The sparse autoencoder at layer ℓ: trained with sae-lens on our own activations, or loaded.

Training drives sae-lens' own ``SAETrainer`` (its loss, TopK auxiliary loss, dead-latent tracking,
LR schedule and normalisation folding) from an in-memory activation iterator, so the model runs
once for both training and encoding (issue 3) instead of a second time inside sae-lens' runner.

Two choices that decide whether the SAE is usable (STACK.md §7: a crude SAE left 97% dead):
- Tokens are filtered before training: special/template tokens, and positions whose residual norm
  is far above the median (SmolLM2's first position has norm ~25,000 against a median ~170: an
  attention sink that would dominate the squared error).
- Inputs are scaled to mean norm sqrt(d) (sae-lens ``expected_average_only_in``) and ``b_dec``
  starts at the data mean (the residual stream has a large shared offset); the scale is folded
  into the weights after training, so the saved SAE reads raw activations.

A saved SAE is a sae-lens inference folder (``cfg.json`` + ``sae_weights.safetensors``) plus our
``quality.json``, readable with ``SAE.load_from_disk``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from prefsculpt.concepts.config import SAEConfig
from prefsculpt.concepts.diskrows import row_norms, take_rows
from prefsculpt.core.device import HOST, bf16_autocast_fast
from prefsculpt.core.errors import UserError
from prefsculpt.core.files import atomic_dir
from prefsculpt.core.progress import progress

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")
QUALITY_FILE = "quality.json"
SAE_FILES = ("cfg.json", "sae_weights.safetensors")


#: How to use a published SAE without hub access (sae-lens' own save/load pair).
OFFLINE_RECIPE = (
    "On a machine with hub access save it once with SAE.from_pretrained(release, sae_id).save_model('<folder>'), "
    "copy the folder here and use sae.source=path sae.path=<folder> (read with SAE.load_from_disk); "
    "or train one here with sae.source=train."
)


class SAESourceError(UserError):
    """The SAE asked for cannot be trained or loaded; the message says what to do instead."""


# ---------------------------------------------------------------- pure pieces (tensors in, out)


def training_token_mask(acts: torch.Tensor, special: torch.Tensor | None, max_norm_ratio: float) -> torch.Tensor:
    """Rows fit to train on: not special, and norm <= ``max_norm_ratio`` x the median norm.

    acts: (N, d); special: (N,) bool or None. Returns (N,) bool.
    """
    norms = acts.norm(dim=-1)  # (N,)
    keep = torch.ones_like(norms, dtype=torch.bool)
    if special is not None:
        keep &= ~special.to(torch.bool)
    if max_norm_ratio > 0 and keep.any():
        keep &= norms <= max_norm_ratio * norms[keep].median()
    return keep


def prefix_duplicate_mask(pair_index: np.ndarray, position: np.ndarray, token_id: np.ndarray,
                          is_prompt: np.ndarray) -> np.ndarray:
    """True for prompt rows whose whole token prefix already occurred in an earlier pair.

    In a causal model identical prefixes give identical activations, and every planted prompt
    starts with the same system message: without this, ~20% of the corpus would be copies of ~20
    vectors. All arrays (N,); returns (N,) bool.
    """
    dup = np.zeros(len(pair_index), dtype=bool)
    rows = np.flatnonzero(is_prompt)
    rows = rows[np.lexsort((position[rows], pair_index[rows]))]  # by pair, then position
    seen: set[int] = set()
    prev_pair, h = None, 0
    for r in rows:
        if pair_index[r] != prev_pair:
            prev_pair, h = pair_index[r], 0
        h = hash((h, int(token_id[r])))  # rolling hash of the prefix up to and including r
        if h in seen:
            dup[r] = True
        seen.add(h)
    return dup


def shuffled_batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs over the rows of x (N, d), reshuffled each epoch; yields (batch_size, d)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n < batch_size:
        raise SAESourceError(f"only {n} training tokens for sae.batch_size_tokens={batch_size}: lower it or add data")
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield x[perm[i : i + batch_size]]


@torch.no_grad()
def sae_quality(sae: Any, acts: torch.Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Explained variance, mean L0 and dead share of ``sae`` on ``acts`` (N, d).

    explained variance = 1 - Σ||x - x̂||² / Σ||x - mean(x)||² (sae-lens' non-legacy definition);
    dead = latents that never fire on these tokens.
    """
    acts = acts.float()
    mean = acts.mean(0)  # (d,)
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size]
        f = sae.encode(x)  # (b, d_sae)
        if f.is_sparse:
            f = f.to_dense()
        x_hat = sae.decode(f)  # (b, d)
        sse += (x_hat - x).pow(2).sum().item()
        sst += (x - mean).pow(2).sum().item()
        active = f != 0
        l0 += active.sum().item()
        fired |= active.any(0)
    n = max(acts.shape[0], 1)
    return {
        "explained_variance": 1.0 - sse / max(sst, 1e-12),
        "l0_mean": l0 / n,
        "dead_share": 1.0 - fired.float().mean().item(),
        "n_tokens": float(acts.shape[0]),
    }


# ---------------------------------------------------------------- training


def training_sae_config(cfg: SAEConfig, d_in: int, device: str = HOST) -> Any:
    """The sae-lens training config for ``cfg.architecture`` (the registry decides the class)."""
    from sae_lens.registry import get_sae_training_class  # optional: heavy, used only here

    arch = cfg.architecture
    if arch not in ARCHITECTURES:
        raise SAESourceError(f"sae.architecture={arch!r} is not one of {ARCHITECTURES}")
    _, cfg_cls = get_sae_training_class(arch)
    common = {"d_in": d_in, "d_sae": cfg.expansion * d_in, "dtype": "float32", "device": device,
              "normalize_activations": "expected_average_only_in"}
    extra: dict[str, Any] = {
        "topk": {"k": cfg.k},
        "batchtopk": {"k": float(cfg.k)},
        # The quadratic L0 loss (GemmaScope 2) steers to a target L0, so k means the same everywhere.
        "jumprelu": {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(cfg.k),
                     "l0_coefficient": cfg.sparsity_coefficient},
        "standard": {"l1_coefficient": cfg.sparsity_coefficient},
    }[arch]
    return cfg_cls(**common, **extra)


def select_training_rows(activations: Any, cfg: SAEConfig) -> np.ndarray:
    """Ascending row indices of a tensor or ActivationCache fit to train (or evaluate) the SAE on."""
    if isinstance(activations, torch.Tensor):
        return np.flatnonzero(training_token_mask(activations.float(), None, cfg.max_norm_ratio).numpy())

    special = activations.special.bool() if cfg.exclude_special else torch.zeros(len(activations.special), dtype=torch.bool)
    keep = ~special
    ratio = cfg.max_norm_ratio
    if ratio > 0 and keep.any():
        norms = row_norms(activations.acts)  # (N,), read block by block from a disk cache
        keep &= norms <= ratio * norms[keep].median()
    if cfg.dedupe_prefixes:
        dup = prefix_duplicate_mask(
            np.asarray(activations.pair_index), np.asarray(activations.position),
            np.asarray(activations.token_id), np.asarray(activations.span) == 0,
        )
        keep &= torch.from_numpy(~dup)
    return np.flatnonzero(keep.numpy())


def select_training_tokens(activations: Any, cfg: SAEConfig) -> torch.Tensor:
    """The rows of a tensor or ActivationCache the SAE trains (or is evaluated) on, (M, d).

    At most ``cfg.max_train_tokens`` of them (0 = no cap): a uniform sample without replacement
    (seeded by ``cfg.seed``, kept in row order) when more qualify, so memory is bounded whatever
    the number of pairs. Under the cap every qualifying row is kept, as before the cap existed.
    """

    rows = select_training_rows(activations, cfg)
    cap = int(getattr(cfg, "max_train_tokens", 0) or 0) or None
    if cap is not None and len(rows) > cap:
        log.info("SAE tokens: a uniform sample of %d of the %d qualifying rows (sae.max_train_tokens)", cap, len(rows))
    acts = activations if isinstance(activations, torch.Tensor) else activations.acts
    return take_rows(acts, rows, cap, cfg.seed)


def train_sae(
    activations: Any, cfg: SAEConfig, d_in: int | None = None, held_out: Any = None, device: str = HOST
) -> tuple[Any, dict[str, float]]:
    """Train an SAE on ``activations`` ((N, d) tensor or ActivationCache); returns (inference SAE, metrics).

    Training runs on ``device`` (sae-lens moves each batch there); the returned SAE is on the CPU.

    Quality is measured on ``held_out`` (same kinds) when given, else on the training tokens.
    """
    from sae_lens import SAE, SAETrainer  # optional: heavy, used only here
    from sae_lens.config import SAETrainerConfig  # optional: heavy, used only here
    from sae_lens.registry import get_sae_training_class  # optional: heavy, used only here

    x = select_training_tokens(activations, cfg)  # (M, d)
    d_in = int(d_in or x.shape[1])
    if x.shape[1] != d_in:
        raise SAESourceError(f"activations have width {x.shape[1]} but d_in={d_in}")
    torch.manual_seed(cfg.seed)
    sae_cfg = training_sae_config(cfg, d_in, device)
    sae = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)
    batch = min(cfg.batch_size_tokens, x.shape[0])
    steps = max(1, cfg.training_tokens // batch)
    use_autocast = bool(cfg.autocast) and bf16_autocast_fast(torch.device(device))
    if cfg.autocast and not use_autocast:
        log.info("sae.autocast: off, %s has no fast bf16 matmuls (emulated bf16 is far slower than fp32)", device)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=cfg.lr, lr_end=cfg.lr,
        lr_warm_up_steps=min(10, steps // 10), lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        # A latent silent this many steps counts as dead and gets the TopK auxiliary loss. The sae-lens
        # default (1000 steps) exceeds a whole CPU-sized run, where the aux loss would never act.
        dead_feature_window=cfg.dead_feature_window, feature_sampling_window=max(steps, 1), device=device,
        autocast=use_autocast,
    )
    # Every training step draws exactly one batch (the scale is set below, so sae-lens draws none to
    # estimate it): counting the draws counts the steps.
    with progress(steps * batch, f"SAE training ({cfg.architecture})", "tokens") as bar:
        counted = (bar.advance(len(b)) or b for b in shuffled_batches(x, batch, cfg.seed))
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=counted)
        with torch.no_grad():
            # Scale to mean norm sqrt(d) ourselves (sae-lens would draw 1000 batches for the estimate) and
            # start b_dec at the mean; fit() folds the scale into the weights at the end.
            scale = math.sqrt(d_in) / x.norm(dim=-1).mean().item()
            trainer.activation_scaler.scaling_factor = scale
            sae.b_dec.data.copy_((x.mean(0) * scale).to(sae.b_dec.device))
        t0 = time.perf_counter()
        log.info("training %s SAE: d_sae=%d k=%s on %d tokens (%d steps of %d)",
                 cfg.architecture, sae_cfg.d_sae, cfg.k, x.shape[0], steps, batch)
        trained = trainer.fit()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)  # batchtopk becomes jumprelu with the learnt threshold
        inference = SAE.load_from_disk(tmp, device=HOST)
    inference.eval()
    if held_out is not None:
        # quality needs far fewer tokens than training: a quarter of the cap bounds both held at once
        cap = int(getattr(cfg, "max_train_tokens", 0) or 0)
        ev_on = select_training_tokens(held_out, replace(cfg, max_train_tokens=max(cap // 4, 1)) if cap else cfg)
    else:
        ev_on = x
    metrics = {f"sae/{k}": v for k, v in sae_quality(inference, ev_on).items()}
    metrics.update({"sae/train_seconds": seconds, "sae/train_tokens_unique": float(x.shape[0]),
                    "sae/train_steps": float(steps), "sae/tokens_per_second": steps * batch / max(seconds, 1e-9)})
    log.info("SAE trained in %.0f s: EV %.3f, L0 %.1f, dead %.1f%%", seconds, metrics["sae/explained_variance"],
             metrics["sae/l0_mean"], 100 * metrics["sae/dead_share"])
    return inference, metrics


# ---------------------------------------------------------------- loading


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_sae(cfg: SAEConfig) -> Any:
    """The SAE of ``sae.source=path`` (a local sae-lens folder) or ``sae.source=pretrained``."""
    from sae_lens import (
        SAE,  # optional: heavy (transformer-lens, wandb); only where an SAE is trained or loaded
    )

    if cfg.source == "path":
        if not cfg.path:
            raise SAESourceError("sae.source=path needs sae.path=<folder with cfg.json + sae_weights.safetensors>")
        folder = Path(str(cfg.path)).expanduser()
        missing = [f for f in SAE_FILES if not (folder / f).is_file()]
        if missing:
            raise SAESourceError(
                f"sae.path={str(folder)!r} lacks {missing}: it must be a sae-lens SAE folder "
                "(SAE.save_model / the sae/ artifact of an sae run)"
            )
        try:
            sae = SAE.load_from_disk(str(folder), device=HOST)
        except Exception as exc:  # sae-lens raises KeyError/ValueError/TypeError on foreign folders
            raise SAESourceError(f"sae.path={str(folder)!r}: sae-lens could not load it ({exc!r})") from exc
    elif cfg.source == "pretrained":
        if not cfg.release or not cfg.sae_id:
            raise SAESourceError("sae.source=pretrained needs sae.release=<sae-lens release> and sae.sae_id=<id>")
        if _hub_offline():
            raise SAESourceError(
                f"sae.source=pretrained (release {cfg.release!r}, id {cfg.sae_id!r}) downloads from the Hugging Face "
                f"hub, but hub access is off (HF_HUB_OFFLINE=1). {OFFLINE_RECIPE}"
            )
        try:
            sae = SAE.from_pretrained(str(cfg.release), str(cfg.sae_id), device=HOST)
        except Exception as exc:
            raise SAESourceError(
                f"sae.source=pretrained: loading release {cfg.release!r} id {cfg.sae_id!r} failed ({exc!r}). "
                f"Without hub access: {OFFLINE_RECIPE}"
            ) from exc
    else:
        raise SAESourceError(f"sae.source={cfg.source!r} is not one of train, path, pretrained (use load_sae for the latter two)")
    sae.eval()
    return sae


# ---------------------------------------------------------------- content-addressed cache


def _plain(cfg: Any) -> dict[str, Any]:
    if is_dataclass(cfg):
        return asdict(cfg)

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


#: SAEConfig fields that do not change the trained SAE (where it comes from is the key's other part).
_NOT_IN_KEY = ("source", "path", "release", "sae_id", "check_model")


def sae_cache_key(model_id: str, layer: int, data_digest: str, cfg: Any) -> str:
    """sha256 of (model, layer, training data, training config): same inputs, same SAE."""
    train_cfg = {k: v for k, v in sorted(_plain(cfg).items()) if k not in _NOT_IN_KEY}
    blob = json.dumps({"model": model_id, "layer": int(layer), "data": data_digest, "sae": train_cfg,
                       "format": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def is_complete_sae_dir(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*SAE_FILES, QUALITY_FILE))


def save_sae_dir(sae: Any, target: Path, quality: dict[str, Any]) -> Path:
    """Write ``target`` (cfg.json, sae_weights.safetensors, quality.json) atomically: files go to a
    temporary sibling folder that is renamed into place, so a crash never leaves a folder that looks
    complete. If another process won the race with a complete folder, its copy is kept."""
    with atomic_dir(target, is_complete=is_complete_sae_dir) as tmp:
        sae.save_model(str(tmp))
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2, sort_keys=True))  # written last
    return target


def load_cached_sae(folder: Path) -> tuple[Any, dict[str, Any]] | None:
    """(SAE, quality) from a complete cache folder, else None (an incomplete one is removed)."""
    if not folder.exists():
        return None
    if not is_complete_sae_dir(folder):
        log.warning("%s is incomplete (an interrupted write?); training again", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    from sae_lens import (
        SAE,  # optional: heavy (transformer-lens, wandb); only where an SAE is trained or loaded
    )

    sae = SAE.load_from_disk(str(folder), device=HOST)
    sae.eval()
    return sae, json.loads((folder / QUALITY_FILE).read_text())


def get_or_train_sae(
    activations: Any, cfg: SAEConfig, cache_root: Path, model_id: str, data_digest: str, held_out: Any = None,
    device: str = HOST,
) -> tuple[Any, dict[str, float], Path, bool]:
    """The trained SAE for these inputs from ``<cache_root>/saes/<key>/``, training it on a miss.

    ``activations``: what ``train_sae`` takes, or a callable returning it (called on a miss only).
    ``data_digest`` must identify the training data. Returns (SAE, metrics, folder, cache_hit).
    """
    if cfg.layer is None:
        raise ValueError("get_or_train_sae needs cfg.layer set (the sae stage resolves a null sae.layer first)")
    folder = Path(cache_root) / "saes" / sae_cache_key(model_id, int(cfg.layer), data_digest, cfg)
    hit = load_cached_sae(folder)
    if hit is not None:
        log.info("SAE cache hit: %s", folder)
        return hit[0], {k: float(v) for k, v in hit[1].get("metrics", {}).items()}, folder, True
    data = activations() if callable(activations) else activations
    sae, metrics = train_sae(data, cfg, held_out=held_out, device=device)
    sae.cfg.metadata.hook_name = f"model.layers.{int(cfg.layer)}"
    sae.cfg.metadata.model_name = model_id
    save_sae_dir(sae, folder, {"metrics": metrics, "model": model_id, "layer": int(cfg.layer), "data": data_digest})
    return sae, metrics, folder, False
