"""The Lightning ``ConceptEncoder``: pairs -> per-pair span scores of every SAE latent, streamed to shards.

``Trainer.predict`` runs over length-bucketed batches of packed pairs (``activations.pack_pairs``:
the prompt is computed once for both responses). Each batch is either token ids (truncated forward
to layer ℓ, nothing above it computed) or pre-computed layer-ℓ activations from an
``ActivationCache`` (the same activations the SAE was trained on: no second forward pass). The SAE
encodes every token; ``span_scores`` gives max / firing frequency over the prompt, chosen and
rejected tokens (METHOD §2). Named concepts given as directions are scored like latents with the
per-token score relu(h·v − b). A ``ShardWriter`` callback writes each finished shard of pairs
(``shards.py``), so memory does not grow with the dataset and a rerun skips finished shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from prefsculpt.concepts import shards as store
from prefsculpt.concepts.activations import (
    CHOSEN,
    PROMPT,
    REJECTED,
    ActivationCache,
    length_buckets,
    pack_pairs,
    packed_forward,
    packed_length,
)
from prefsculpt.concepts.config import EncodeConfig
from prefsculpt.concepts.sae_model import sae_codes
from prefsculpt.concepts.scores import SPANS, span_scores
from prefsculpt.core.device import HOST, accelerator
from prefsculpt.core.faults import fault_point
from prefsculpt.core.progress_bar import StepProgress
from prefsculpt.data.tokenize import TokenizedPair

log = logging.getLogger(__name__)

SEGMENT_OF = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}


@dataclass
class NamedDirections:
    """K named concept directions at layer ℓ, scored per token as relu(h·v_k − b_k)."""

    names: list[str]
    vectors: torch.Tensor  # (K, d)
    bias: torch.Tensor  # (K,)

    def __post_init__(self) -> None:
        k = len(self.names)
        if self.vectors.dim() != 2 or self.vectors.shape[0] != k or self.bias.shape != (k,):
            raise ValueError(
                f"named directions: {k} names need vectors (K, d) and bias (K,), got {tuple(self.vectors.shape)} "
                f"and {tuple(self.bias.shape)}"
            )


def directional_scores(h: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(h·v − b): (B, T, d), (K, d), (K,) -> (B, T, K)."""
    return torch.relu(h @ vectors.to(h.dtype).T - bias.to(h.dtype))


def top_candidates(acts: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per concept the ``n`` strongest masked tokens: values, batch row, column, each (k, F), k <= n."""
    b, t, f = acts.shape
    flat = (acts * mask.to(acts.dtype).unsqueeze(-1)).reshape(b * t, f)  # (B*T, F); masked-out -> 0
    vals, idx = flat.topk(min(n, b * t), dim=0)  # (k, F)
    return vals, idx // t, idx % t


class ConceptEncoder(L.LightningModule):
    """``predict_step(batch) -> dict`` of per-pair span scores (numpy) for every concept."""

    def __init__(self, model: Any, sae: Any, layer: int, extra: NamedDirections | None = None, top_n: int = 8):
        super().__init__()
        self.model, self.sae, self.layer, self.top_n = model, sae, layer, top_n
        self.extra = extra
        if extra is not None:
            self.register_buffer("extra_vectors", extra.vectors.float(), persistent=False)
            self.register_buffer("extra_bias", extra.bias.float(), persistent=False)

    @property
    def concept_names(self) -> list[str]:
        names = [f"latent:{i}" for i in range(int(self.sae.cfg.d_sae))]
        return names + [f"named:{n}" for n in (self.extra.names if self.extra else [])]

    def concept_acts(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) residuals -> (B, T, F) non-negative concept activations (latents, then named)."""
        a = sae_codes(self.sae, h)  # sae-lens' own encode: its activation and normalisation
        if self.extra is not None:
            a = torch.cat([a, directional_scores(h, self.extra_vectors, self.extra_bias).to(a.dtype)], dim=-1)
        return a.float()  # span statistics in fp32 also under bf16 autocast

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Any]:
        h = batch["acts"] if "acts" in batch else packed_forward(self.model, batch, self.layer)  # (B, T, d)
        a = self.concept_acts(h)  # (B, T, F)
        seg = batch["segment"]
        out: dict[str, Any] = {"shard": batch["shard"], "pair_index": batch["pair_index"].cpu().numpy()}
        for span in SPANS:
            mask = seg == SEGMENT_OF[span]  # (B, T)
            mx, freq = span_scores(a, mask)  # (B, F) each
            out[f"{span}_max"], out[f"{span}_freq"] = mx.cpu().numpy(), freq.cpu().numpy()
            out[f"{span}_n_tokens"] = mask.sum(1).cpu().numpy().astype(np.int32)
        top = {}
        for span in store.TOP_SPANS:
            vals, row, col = top_candidates(a, seg == SEGMENT_OF[span], self.top_n)
            pair = batch["pair_index"][row]  # (k, F) global pair index
            pos = batch["position_ids"][row, col]  # (k, F) position in prompt + response
            top[span] = (vals.cpu().numpy(), pair.cpu().numpy().astype(np.int32), pos.cpu().numpy().astype(np.int32))
        out["top"] = top
        return out


class PairBatches(torch.utils.data.Sampler):
    """Precomputed batches of pair indices, shard by shard (each batch within one shard)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PackedCollate:
    """Pair indices -> a packed batch (token ids, or cached activations) plus shard bookkeeping."""

    def __init__(self, tokenized: Sequence[TokenizedPair], shard_size: int, pad_id: int, cache: ActivationCache | None):
        self.tokenized, self.shard_size, self.pad_id, self.cache = tokenized, shard_size, pad_id, cache
        self.offsets = cache.offsets() if cache is not None else None

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        if self.cache is not None:
            batch = self.cache.select(idx, self.offsets)
        else:
            batch = pack_pairs([self.tokenized[i] for i in idx], self.pad_id)
        batch["pair_index"] = torch.tensor(idx, dtype=torch.long)
        batch["shard"] = idx[0] // self.shard_size
        return batch


class EncodeInterrupted(RuntimeError):
    """The encoder got SIGTERM; finished shards are kept and a rerun resumes after them."""


class ShardWriter(BasePredictionWriter):
    """Collects batch outputs per shard; writes a shard when all its pairs are in.

    Lightning's predict loop notes SIGTERM (``trainer.received_sigterm``) but runs on to the end,
    so ``kill <pid>`` would not stop an encode: the writer stops it after the current batch.
    """

    def __init__(self, out_dir: Path, pair_ids: list[str], shard_size: int, n_concepts: int, top_n: int):
        super().__init__(write_interval="batch")
        self.out_dir, self.pair_ids, self.shard_size = out_dir, pair_ids, shard_size
        self.n_concepts, self.top_n = n_concepts, top_n
        self.buffers: dict[int, dict[str, Any]] = {}

    def _shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, len(self.pair_ids))

    def _buffer(self, k: int) -> dict[str, Any]:
        if k not in self.buffers:
            a, b = self._shard_range(k)
            n = b - a
            buf: dict[str, Any] = {"filled": 0, "top": {s: None for s in store.TOP_SPANS}}
            for span in SPANS:
                buf[f"{span}_max"] = np.zeros((n, self.n_concepts), np.float32)
                buf[f"{span}_freq"] = np.zeros((n, self.n_concepts), np.float32)
                buf[f"{span}_n_tokens"] = np.zeros(n, np.int32)
            self.buffers[k] = buf
        return self.buffers[k]

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        k = prediction["shard"]
        buf = self._buffer(k)
        rows = prediction["pair_index"] - self._shard_range(k)[0]
        for span in SPANS:
            for key in (f"{span}_max", f"{span}_freq", f"{span}_n_tokens"):
                buf[key][rows] = prediction[key]
        for span, cand in prediction["top"].items():
            buf["top"][span] = store.merge_top(buf["top"][span], cand, self.top_n)
        buf["filled"] += len(rows)
        a, b = self._shard_range(k)
        if buf["filled"] == b - a:
            arrays = {key: v for key, v in buf.items() if key not in ("filled", "top")}
            arrays["pair_ids"] = np.array(self.pair_ids[a:b])
            arrays.update(store.top_arrays(buf["top"]))
            store.write_shard(self.out_dir, k, arrays)
            del self.buffers[k]
            log.debug("wrote shard %d (%d pairs)", k, b - a)
            fault_point("sae", "shard")
        if getattr(trainer, "received_sigterm", False):
            raise EncodeInterrupted(f"stopped by SIGTERM; finished shards in {self.out_dir} are kept, rerun to resume")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def sae_digest(sae: Any) -> str:
    return tensor_digest(dict(sae.state_dict())) + f":{type(sae).__name__}"


def pairs_digest_tokens(tokenized: Sequence[TokenizedPair]) -> str:
    h = hashlib.sha256()
    for t in tokenized:
        h.update(repr((t.id, t.prompt_ids, t.chosen_ids, t.rejected_ids)).encode())
    return h.hexdigest()


def encode_plan(
    tokenized: Sequence[TokenizedPair], sae: Any, layer: int, cfg: EncodeConfig, encoder: ConceptEncoder
) -> dict[str, Any]:
    """What the shards depend on; a store is reused only under the same plan."""
    extra = encoder.extra
    return {
        "format": 1, "pairs_digest": pairs_digest_tokens(tokenized), "n_pairs": len(tokenized),
        "shard_size": cfg.shard_size, "layer": int(layer), "sae_digest": sae_digest(sae),
        "extra_digest": tensor_digest({"v": extra.vectors, "b": extra.bias}) if extra else None,
        "precision": cfg.precision, "top_contexts": cfg.top_contexts, "concept_names": encoder.concept_names,
    }


def encode_pairs(
    model: Any,
    sae: Any,
    tokenized: Sequence[TokenizedPair],
    out_dir: str | os.PathLike,
    cfg: EncodeConfig,
    layer: int,
    extra_directions: NamedDirections | None = None,
    activations: ActivationCache | None = None,
    tokenizer: Any = None,
    pad_id: int | None = None,
    num_threads: int | None = None,
    device: torch.device | None = None,
) -> Path:
    """Score every pair into the sharded store at ``out_dir``; finished shards are not redone.

    With ``activations`` (an ``ActivationCache`` of these pairs at ``layer``) no forward pass runs.
    ``tokenizer`` decodes the top contexts (token ids are written if it is None). ``num_threads``
    (or ``cfg.num_threads`` if the config has it) sets torch's CPU threads for the run: on a shared
    machine 1 thread can be several times faster than 2 (bench/README.md). ``device`` (default the
    CPU) is where Lightning runs the model and the SAE.
    """
    out_dir = Path(out_dir)
    if not tokenized:
        raise ValueError("encode_pairs got no pairs")
    if cfg.shard_size < 1 or cfg.batch_tokens < 1:
        raise ValueError("encode.shard_size and encode.batch_tokens must be >= 1")
    if cfg.precision not in ("float32", "bfloat16"):
        raise ValueError(f"encode.precision={cfg.precision!r}: use float32 or bfloat16")
    pair_ids = [t.id for t in tokenized]
    if activations is not None and (activations.pair_ids != pair_ids or activations.layer != layer):
        raise ValueError(
            f"the activation cache holds other pairs or layer {activations.layer} (want layer {layer}); "
            "recollect it for these pairs, or pass activations=None to run the model"
        )
    encoder = ConceptEncoder(model, sae, layer, extra_directions, top_n=cfg.top_contexts)
    plan = encode_plan(tokenized, sae, layer, cfg, encoder)
    if store.prepare_store(out_dir, plan):
        log.info("%s already holds the complete scores; nothing to do", out_dir)
        return out_dir
    n_shards = -(-len(tokenized) // cfg.shard_size)
    done = store.finished_shards(out_dir, n_shards)
    lengths = [packed_length(t) for t in tokenized]
    batches = []
    for k in range(n_shards):
        if k not in done:
            idx = range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(tokenized)))
            batches += length_buckets(lengths, idx, cfg.batch_tokens)
    log.info("encoding %d pairs: %d/%d shards to do, %d batches", len(tokenized), n_shards - len(done), n_shards, len(batches))
    dev = device or torch.device(HOST)
    if batches:
        pad = pad_id if pad_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
        loader = torch.utils.data.DataLoader(
            list(range(len(tokenized))), batch_sampler=PairBatches(batches),
            collate_fn=PackedCollate(tokenized, cfg.shard_size, pad, activations), num_workers=0,
        )
        writer = ShardWriter(out_dir, pair_ids, cfg.shard_size, len(encoder.concept_names), cfg.top_contexts)
        trainer = L.Trainer(
            accelerator=accelerator(dev), devices=[dev.index] if dev.index is not None else 1, logger=False,
            enable_progress_bar=True, enable_model_summary=False, enable_checkpointing=False,
            callbacks=[writer, StepProgress("encoding", "pairs", size_of=lambda b: len(b["pair_index"]),
                                            total=sum(map(len, batches)))],
            precision="bf16-mixed" if cfg.precision == "bfloat16" else "32-true",
        )
        threads = num_threads or getattr(cfg, "num_threads", None)
        prev_threads = torch.get_num_threads()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # ours yields every pair
            try:
                if threads:
                    torch.set_num_threads(int(threads))
                trainer.predict(encoder, dataloaders=loader, return_predictions=False)
            finally:
                torch.set_num_threads(prev_threads)
    missing = set(range(n_shards)) - store.finished_shards(out_dir, n_shards)
    if missing:
        raise store.ShardStoreError(f"{out_dir}: shards {sorted(missing)} were not written; run the encoder again")
    top = store.merged_top(out_dir, n_shards, cfg.top_contexts)
    decode = tokenizer.decode if tokenizer is not None else (lambda ids: " ".join(map(str, ids)))

    def sequence(i: int, span: str) -> list[int]:
        return tokenized[i].sequence(span)[0]

    store.write_top_contexts(out_dir, top, encoder.concept_names, pair_ids, sequence, decode, cfg.context_window)
    store.write_manifest(out_dir, plan, len(tokenized), n_shards)
    return out_dir
