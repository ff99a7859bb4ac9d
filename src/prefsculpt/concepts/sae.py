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
import uuid
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefsculpt.concepts.config import SAEConfig
from prefsculpt.core.errors import UserError

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")
QUALITY_FILE = "quality.json"
SAE_FILES = ("cfg.json", "sae_weights.safetensors")


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


def training_sae_config(cfg: SAEConfig, d_in: int, device: str = "cpu") -> Any:
    """The sae-lens training config for ``cfg.architecture`` (the registry decides the class)."""
    from sae_lens.registry import get_sae_training_class

    arch = str(cfg.architecture)
    if arch not in ARCHITECTURES:
        raise SAESourceError(f"sae.architecture={arch!r} is not one of {ARCHITECTURES}")
    _, cfg_cls = get_sae_training_class(arch)
    common = {"d_in": d_in, "d_sae": int(cfg.expansion) * d_in, "dtype": "float32", "device": device,
              "normalize_activations": "expected_average_only_in"}
    extra: dict[str, Any] = {
        "topk": {"k": int(cfg.k)},
        "batchtopk": {"k": float(cfg.k)},
        # The quadratic L0 loss (GemmaScope 2) steers to a target L0, so k means the same everywhere.
        "jumprelu": {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(cfg.k),
                     "l0_coefficient": float(cfg.sparsity_coefficient)},
        "standard": {"l1_coefficient": float(cfg.sparsity_coefficient)},
    }[arch]
    return cfg_cls(**common, **extra)


def _matrix(activations: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(acts (N, d) float32, special (N,) bool | None) from a tensor or an ActivationCache."""
    if isinstance(activations, torch.Tensor):
        return activations.float(), None
    acts = torch.as_tensor(activations.acts).float()
    special = getattr(activations, "special", None)
    return acts, (torch.as_tensor(special).bool() if special is not None else None)


def select_training_tokens(activations: Any, cfg: SAEConfig) -> torch.Tensor:
    """The rows of a tensor or ActivationCache the SAE trains (or is evaluated) on, (M, d)."""
    acts, special = _matrix(activations)
    keep = training_token_mask(acts, special if cfg.exclude_special else None, float(cfg.max_norm_ratio))
    if cfg.dedupe_prefixes and not isinstance(activations, torch.Tensor):
        dup = prefix_duplicate_mask(
            np.asarray(activations.pair_index), np.asarray(activations.position),
            np.asarray(activations.token_id), np.asarray(activations.span) == 0,
        )
        keep &= torch.from_numpy(~dup)
    return acts[keep]


def train_sae(
    activations: Any, cfg: SAEConfig, d_in: int | None = None, held_out: Any = None, device: str = "cpu"
) -> tuple[Any, dict[str, float]]:
    """Train an SAE on ``activations`` ((N, d) tensor or ActivationCache); returns (inference SAE, metrics).

    Training runs on ``device`` (sae-lens moves each batch there); the returned SAE is on the CPU.

    Quality is measured on ``held_out`` (same kinds) when given, else on the training tokens.
    """
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    x = select_training_tokens(activations, cfg)  # (M, d)
    d_in = int(d_in or x.shape[1])
    if x.shape[1] != d_in:
        raise SAESourceError(f"activations have width {x.shape[1]} but d_in={d_in}")
    torch.manual_seed(int(cfg.seed))
    sae_cfg = training_sae_config(cfg, d_in, device)
    sae = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)
    batch = min(int(cfg.batch_size_tokens), x.shape[0])
    steps = max(1, int(cfg.training_tokens) // batch)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=float(cfg.lr), lr_end=float(cfg.lr),
        lr_warm_up_steps=min(10, steps // 10), lr_decay_steps=int(steps * float(cfg.lr_decay_fraction)),
        # A latent silent this many steps counts as dead and gets the TopK auxiliary loss. The sae-lens
        # default (1000 steps) exceeds a whole CPU-sized run, where the aux loss would never act.
        dead_feature_window=int(cfg.dead_feature_window), feature_sampling_window=max(steps, 1), device=device,
        autocast=bool(cfg.autocast),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=shuffled_batches(x, batch, int(cfg.seed)))
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
        inference = SAE.load_from_disk(tmp, device="cpu")
    inference.eval()
    ev_on = select_training_tokens(held_out, cfg) if held_out is not None else x
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
    from sae_lens import SAE

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
            sae = SAE.load_from_disk(str(folder), device="cpu")
        except Exception as exc:  # sae-lens raises KeyError/ValueError/TypeError on foreign folders
            raise SAESourceError(f"sae.path={str(folder)!r}: sae-lens could not load it ({exc!r})") from exc
    elif cfg.source == "pretrained":
        if not cfg.release or not cfg.sae_id:
            raise SAESourceError("sae.source=pretrained needs sae.release=<sae-lens release> and sae.sae_id=<id>")
        if _hub_offline():
            raise SAESourceError(
                f"sae.source=pretrained (release {cfg.release!r}, id {cfg.sae_id!r}) downloads from the Hugging Face "
                "hub, but hub access is off (HF_HUB_OFFLINE=1). On a machine with access, save it once with "
                "SAE.from_pretrained(release, sae_id).save_model('<folder>'), then use sae.source=path "
                "sae.path=<folder>; or train one here with sae.source=train."
            )
        try:
            sae = SAE.from_pretrained(str(cfg.release), str(cfg.sae_id), device="cpu")
        except Exception as exc:
            raise SAESourceError(
                f"sae.source=pretrained: loading release {cfg.release!r} id {cfg.sae_id!r} failed ({exc!r})"
            ) from exc
    else:
        raise SAESourceError(f"sae.source={cfg.source!r} is not one of train, path, pretrained (use load_sae for the latter two)")
    sae.eval()
    return sae


def check_sae_fits(sae: Any, d_model: int, layer: int) -> None:
    """A loaded SAE must read residuals of this model's width (and warn if it names another hook)."""
    if int(sae.cfg.d_in) != d_model:
        raise SAESourceError(f"the SAE reads d_in={sae.cfg.d_in} but the model's residual width is {d_model}: "
                             "it was trained for another model")
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if hook and hook != f"model.layers.{layer}":
        log.warning("the SAE was trained at hook %r, but sae.layer=%d (model.layers.%d)", hook, layer, layer)


# ---------------------------------------------------------------- content-addressed cache


def _plain(cfg: Any) -> dict[str, Any]:
    if is_dataclass(cfg):
        return asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


#: SAEConfig fields that do not change the trained SAE (where it comes from is the key's other part).
_NOT_IN_KEY = ("source", "path", "release", "sae_id")


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        sae.save_model(str(tmp))
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2, sort_keys=True))  # written last
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete_sae_dir(target):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_cached_sae(folder: Path) -> tuple[Any, dict[str, Any]] | None:
    """(SAE, quality) from a complete cache folder, else None (an incomplete one is removed)."""
    if not folder.exists():
        return None
    if not is_complete_sae_dir(folder):
        log.warning("%s is incomplete (an interrupted write?); training again", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device="cpu")
    sae.eval()
    return sae, json.loads((folder / QUALITY_FILE).read_text())


def get_or_train_sae(
    activations: Any, cfg: SAEConfig, cache_root: Path, model_id: str, data_digest: str, held_out: Any = None,
    device: str = "cpu",
) -> tuple[Any, dict[str, float], Path, bool]:
    """The trained SAE for these inputs from ``<cache_root>/saes/<key>/``, training it on a miss.

    ``activations``: what ``train_sae`` takes, or a callable returning it (called on a miss only).
    ``data_digest`` must identify the training data. Returns (SAE, metrics, folder, cache_hit).
    """
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
