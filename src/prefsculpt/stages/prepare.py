"""The ``prepare`` stage: load, validate, split and tokenise the pairs; log what a person needs to see.

Artifacts of the run (read by later stages):
``data/{train,validation,test[,clean]}.parquet``, ``data/stats.json``, ``data/skipped.json``,
``data/sample.json`` (an MLflow table), ``config/config.yaml``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig

from prefsculpt.core.faults import fault_point
from prefsculpt.core.files import scratch_dir
from prefsculpt.core.names import Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.data.planted import planted_tag_rates
from prefsculpt.data.prepare import tag_stats, write_split
from prefsculpt.data.source import dataset_name, load_clean_split, load_source
from prefsculpt.data.splits import SPLITS, split_pairs
from prefsculpt.data.tokenize import TRUNCATION_POLICY, token_stats, tokenize_pairs
from prefsculpt.models.loading import load_tokenizer, resolve_model_dir
from prefsculpt.tracking.runs import log_pairs_input, pairs_frame, stage_run

log = logging.getLogger(__name__)


def run_prepare(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage inside its MLflow run; returns metrics, the run id and local artifact paths."""
    with stage_run(cfg, "prepare") as run:
        return _prepare(cfg, run.info.run_id)


def _prepare(cfg: DictConfig, run_id: str) -> dict[str, Any]:
    loaded = load_source(cfg.data)
    name = dataset_name(cfg.data)
    fractions = {s: float(cfg.data.split[s]) for s in SPLITS}
    splits = split_pairs(loaded.pairs, fractions, salt=str(cfg.data.split.salt))
    clean = load_clean_split(cfg.data)
    if clean:
        train_keys = {p.prompt_key() for p in splits["train"]}
        n_overlap = sum(p.prompt_key() in train_keys for p in clean)
        log.info("clean split: %d pairs, %d share a prompt with train", len(clean), n_overlap)

    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    tok = load_tokenizer(model_dir)
    tcfg = cfg.data.tokenize
    stats: dict[str, Any] = {
        "source": loaded.source,
        "dataset": name,
        "rows_read": loaded.n_rows,
        "rows_valid": len(loaded.pairs),
        "rows_skipped": len(loaded.skipped),
        "skipped_by_reason": loaded.skip_counts(),
        "truncation_policy": TRUNCATION_POLICY,
        "max_prompt_tokens": int(tcfg.max_prompt_tokens),
        "max_response_tokens": int(tcfg.max_response_tokens),
        "splits": {},
    }
    metrics: dict[str, float] = {
        "rows_read": loaded.n_rows,
        "rows_valid": len(loaded.pairs),
        "rows_skipped": len(loaded.skipped),
    }
    named = {**splits, **({"clean": clean} if clean else {})}
    for split, pairs in named.items():
        toks = tokenize_pairs(pairs, tok, int(tcfg.max_prompt_tokens), int(tcfg.max_response_tokens))
        ts = token_stats(toks)
        st = {"n_pairs": len(pairs), "n_prompts": len({p.prompt_key() for p in pairs}), **ts, **tag_stats(pairs)}
        stats["splits"][split] = st
        metrics[f"{split}/n_pairs"] = len(pairs)
        for k in ("tokens_prompt_mean", "tokens_chosen_mean", "tokens_rejected_mean",
                  "truncated_prompt", "truncated_chosen", "truncated_rejected"):
            if k in ts:
                metrics[f"{split}/{k}"] = ts[k]
        for k, v in st.items():
            if k.startswith("tag_") and k.endswith("_chosen_gt_rejected"):
                metrics[f"{split}/{k}"] = v
    if not cfg.data.path:
        stats["planted_tag_rates"] = planted_tag_rates(loaded.pairs)
        metrics.update({f"planted_rate/{k}": v for k, v in stats["planted_tag_rates"].items()})

    with scratch_dir(cache_root(cfg.cache_dir), "prepare") as tmp:
        out = Path(tmp) / "data"
        out.mkdir()
        for split, pairs in named.items():
            write_split(pairs, out / f"{split}.parquet")
        (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
        (out / "skipped.json").write_text(json.dumps([e.to_dict() for e in loaded.skipped], indent=2))
        mlflow.log_artifacts(str(out), "data")
    fault_point("prepare", "logged")
    mlflow.log_metrics(metrics)
    if loaded.skipped:
        mlflow.log_table(pd.DataFrame([e.to_dict() for e in loaded.skipped]), "data/skip_report.json")
    sample = pairs_frame(splits["train"][: int(cfg.data.sample_rows)])
    mlflow.log_table(sample, "data/sample.json")
    source = str(cfg.data.path) if cfg.data.path else None
    digests = {}
    for split, pairs in named.items():
        if pairs:
            digests[split] = log_pairs_input(pairs, f"{name}-{split}", context=split, source=source)
    mlflow.set_tags({Tag.DATASET: name, Tag.DATA_DIGEST: digests.get("train", "")})
    log.info("prepare: %d valid of %d rows (%d skipped); splits %s", len(loaded.pairs), loaded.n_rows,
             len(loaded.skipped), {s: len(p) for s, p in named.items()})
    return {"run_id": run_id, "metrics": metrics, "stats": stats, "digests": digests,
            "splits": {s: len(p) for s, p in named.items()}}
