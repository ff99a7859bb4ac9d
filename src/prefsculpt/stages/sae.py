"""The ``sae`` stage: layer-ℓ activations once -> SAE (trained, cached or loaded) -> named
concept directions -> span scores of every pair.

Artifacts of the run: ``sae/`` (cfg.json, sae_weights.safetensors, quality.json; a sae-lens
folder), ``scores/`` (the encoder's shard store with manifest and ``top_contexts.parquet``; read
with ``prefsculpt.concepts.shards.load_scores``), ``named/concepts.json`` (per named concept: bias,
most aligned latents, separation) and ``named/directions.safetensors`` ({``named:<name>``: (d,)},
the format ``shaping.directions_path`` reads). Metrics: held-out SAE quality (``sae/*``) and
timings (``time/*``). The SAE is trained on the train split and judged on the validation split.

Caches under ``cache_dir`` (content-addressed, written atomically): ``activations/<key>.safetensors``
(so a rerun does not run the model), ``saes/<key>/`` and ``scores/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import AutoConfig

from prefsculpt.concepts.collect import extra_text_activations, get_activations, subset
from prefsculpt.concepts.encoder import encode_pairs, pairs_digest_tokens, sae_digest
from prefsculpt.concepts.named import as_directions, build_named_concepts, validate_concepts
from prefsculpt.concepts.sae import (
    SAESourceError,
    get_or_train_sae,
    load_sae,
    sae_quality,
    select_training_tokens,
)
from prefsculpt.concepts.sae_model import check_sae_fits, default_train_layer, resolve_layer
from prefsculpt.core.device import resolve_dtype, select_device
from prefsculpt.core.faults import fault_point
from prefsculpt.core.files import json_digest, model_fingerprint, scratch_dir
from prefsculpt.core.names import Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.data.prepared import Prepared
from prefsculpt.data.source import dataset_name
from prefsculpt.data.splits import LEARN_SPLITS
from prefsculpt.data.tokenize import tokenize_pairs
from prefsculpt.models.loading import load_model, load_tokenizer, resolve_model_dir, tokenizer_fingerprint
from prefsculpt.stages.prepare import prepared_data
from prefsculpt.tracking.inputs import resolve_input
from prefsculpt.tracking.runs import log_pairs_input, stage_run

log = logging.getLogger(__name__)


def run_sae(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage inside its MLflow run; returns run id, metrics and local paths."""
    validate_concepts(list(cfg.named_concepts))  # fail before any model runs
    prepared, prepare_run = prepared_data(cfg)
    with stage_run(cfg, "sae") as run:
        mlflow.set_tag(Tag.PREPARE_RUN, prepare_run)
        return _sae(cfg, run.info.run_id, prepared)


def _sae(cfg: DictConfig, run_id: str, prepared: Prepared) -> dict[str, Any]:
    t_start, c_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    root = cache_root(cfg.cache_dir)

    pairs = prepared.all_pairs()
    splits = {s: prepared.split(s) for s in LEARN_SPLITS}  # never select / test: held out from everything learnt
    index = {p.id: i for i, p in enumerate(pairs)}
    rows = {s: [index[p.id] for p in ps] for s, ps in splits.items()}
    if not rows["train"]:
        raise SAESourceError("the train split is empty: the SAE and named concepts are fitted on it")
    held_split = "validation" if rows["validation"] else "train"
    if held_split == "train":
        log.warning("no validation pairs: SAE quality is measured on the training tokens")
    name = prepared.meta.get("dataset") or dataset_name(cfg.data)
    digest = log_pairs_input(splits["train"], f"{name}-train", context="train",
                             source=str(cfg.data.path) if cfg.data.path else None)

    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    model_id = model_fingerprint(model_dir)
    tok = load_tokenizer(model_dir)
    shape = AutoConfig.from_pretrained(str(model_dir)).get_text_config()  # the SAE is checked before the weights load
    n_layers, requested = int(shape.num_hidden_layers), cfg.sae.layer
    if cfg.sae.source == "train":
        layer = default_train_layer(n_layers) if requested is None else int(requested)
        if not 0 <= layer < n_layers:
            raise SAESourceError(f"sae.layer={layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    else:  # a published or saved SAE says itself which layer it reads, and must fit this model
        sae_cfg = OmegaConf.to_object(cfg.sae)
        if sae_cfg.path:
            sae_cfg.path = str(resolve_input(sae_cfg.path, root / "inputs", what="sae.path"))
        sae = load_sae(sae_cfg)
        layer = resolve_layer(requested, sae, n_layers)
        check_sae_fits(sae, int(shape.hidden_size),
                       [cfg.model.name_or_path, model_dir.name, model_id], cfg.sae.check_model)
    log.info("sae stage: residual of decoder layer %d (model.layers.%d)", layer, layer)
    device = select_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_model(model_dir, dtype).eval().to(device)
    tcfg = cfg.data.tokenize
    tokenized = prepared.tokens_for(pairs, tokenizer_fingerprint(model_dir), tcfg.max_prompt_tokens,
                                    tcfg.max_response_tokens) or tokenize_pairs(
        pairs, tok, tcfg.max_prompt_tokens, tcfg.max_response_tokens)

    t0 = time.perf_counter()
    cache, act_hit = get_activations(model, tokenized, tok, layer, cfg.encode.batch_tokens,
                                      cfg.sae.cache_activations, root,
                                      model_id if dtype == "float32" else f"{model_id}:{dtype}")
    timings["time/collect_seconds"] = time.perf_counter() - t0
    fault_point("sae", "activations")
    train_cache, held_cache = subset(cache, rows["train"]), subset(cache, rows[held_split])

    t0 = time.perf_counter()
    if cfg.sae.source == "train":
        extra = list(cfg.sae.extra_text_files)
        extra_digest = [hashlib.sha256(Path(f).expanduser().read_bytes()).hexdigest() for f in extra
                        if Path(f).expanduser().is_file()]

        def training_data() -> Any:
            if not extra:
                return train_cache
            more = extra_text_activations(model, tok, extra, layer, tcfg.max_response_tokens)
            return torch.cat([select_training_tokens(train_cache, cfg.sae), more])

        data_key = json_digest(digest, tcfg.max_prompt_tokens, tcfg.max_response_tokens, extra_digest)
        sae_cfg = OmegaConf.to_object(cfg.sae)
        sae_cfg.layer = layer
        sae, sae_metrics, sae_dir, sae_hit = get_or_train_sae(
            training_data, sae_cfg, root, model_id, data_key, held_out=held_cache, device=str(device))
    else:
        sae_metrics = {f"sae/{k}": v for k, v in
                       sae_quality(sae, select_training_tokens(held_cache, OmegaConf.to_object(cfg.sae))).items()}
        sae_dir, sae_hit = None, True
    timings["time/train_seconds"] = time.perf_counter() - t0

    named = build_named_concepts(list(cfg.named_concepts), cache=cache, pairs=pairs, pair_rows=rows["train"],
                                 tokenizer=tok, model=model, layer=layer, sae=sae)
    directions = as_directions(named)

    t0 = time.perf_counter()
    scores_key = json_digest(sae_digest(sae), pairs_digest_tokens(tokenized), layer,
                         [(c.name, c.bias, c.vector.tolist()) for c in named])
    scores_dir = encode_pairs(model, sae, tokenized, root / "scores" / scores_key, cfg.encode, layer, device=device,
                              extra_directions=directions, activations=cache, tokenizer=tok)
    timings["time/encode_seconds"] = time.perf_counter() - t0

    with scratch_dir(root, "sae") as tmp:
        sae_art = Path(tmp) / "sae"
        if sae_dir is not None:
            mlflow.log_artifacts(str(sae_dir), "sae")
        else:
            sae.save_model(str(sae_art))
            (sae_art / "quality.json").write_text(json.dumps({"metrics": sae_metrics}, indent=2))
            mlflow.log_artifacts(str(sae_art), "sae")
        if named:
            nd = Path(tmp) / "named"
            nd.mkdir()
            save_file({f"named:{c.name}": c.vector.contiguous() for c in named}, str(nd / "directions.safetensors"))
            (nd / "concepts.json").write_text(json.dumps([c.summary() for c in named], indent=2))
            mlflow.log_artifacts(str(nd), "named")
        mlflow.log_artifacts(str(scores_dir), "scores")  # manifest last in the store, complete by now

    timings["time/total_seconds"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads): on a shared machine the wall time above is inflated
    # by other processes; cpu/threads approximates the wall time on an idle one.
    timings["time/cpu_seconds"] = time.process_time() - c_start
    metrics = {
        **sae_metrics, **timings,
        "n_pairs": float(len(pairs)), "n_tokens": float(cache.n_tokens),
        "cache/activations_hit": float(act_hit), "cache/sae_hit": float(sae_hit),
        **{f"named/{c.name}/separation": c.separation for c in named},
    }
    mlflow.log_metrics(metrics)
    mlflow.set_tags({Tag.DATASET: name, Tag.DATA_DIGEST: digest,
                     Tag.SAE_SOURCE: cfg.sae.source, Tag.LAYER: str(layer)})
    log.info("sae stage: EV %.3f, L0 %.1f, dead %.1f%% (held-out %s); %d pairs scored in %.0f s total",
             metrics.get("sae/explained_variance", float("nan")), metrics.get("sae/l0_mean", float("nan")),
             100 * metrics.get("sae/dead_share", float("nan")), held_split, len(pairs), timings["time/total_seconds"])
    return {"run_id": run_id, "metrics": metrics,
            "paths": {"sae": str(sae_dir) if sae_dir else None, "scores": str(scores_dir),
                      "activations": str(root / "activations")},
            "named": [c.summary() for c in named]}
