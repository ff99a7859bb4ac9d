"""One entry for "the pairs this config means": the planted generator or a loaded source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefsculpt.data.loaders import LoadResult, load_pairs
from prefsculpt.data.planted import PlantedConfig, PlantedRates, generate_planted


def planted_config(data_cfg: Any, variant: str | None = None, n_pairs: int | None = None) -> PlantedConfig:
    """The generator's config from ``data.planted`` (a typed section or its DictConfig)."""
    p = data_cfg.planted
    rates = p.rates if isinstance(p.rates, PlantedRates) else PlantedRates(**dict(p.rates))
    return PlantedConfig(n_pairs=n_pairs if n_pairs is not None else p.n_pairs, seed=p.seed,
                         variant=str(variant or p.variant), rates=rates)


def dataset_name(data_cfg: Any) -> str:
    if data_cfg.path and data_cfg.name == "planted":
        return Path(str(data_cfg.path)).name.split(".")[0]
    return str(data_cfg.name)


def load_source(data_cfg: Any) -> LoadResult:
    """Pairs for ``data``: planted (``data.path`` null) or the file/folder/hub source."""
    if not data_cfg.path:
        pc = planted_config(data_cfg)
        pairs = generate_planted(pc)
        return LoadResult(
            pairs=pairs, skipped=[], source=f"planted(variant={pc.variant}, seed={pc.seed}, n={pc.n_pairs})",
            n_rows=len(pairs),
        )
    return load_pairs(str(data_cfg.path), fmt=str(data_cfg.format), columns=dict(data_cfg.columns),
                      on_error=str(data_cfg.on_error), max_chars=data_cfg.max_chars, hub_split=data_cfg.hub_split,
                      limit=data_cfg.limit)


def load_clean_split(data_cfg: Any) -> list:
    """The planted ``clean`` evaluation pairs (concepts independent of correctness), or [] for real data."""
    if data_cfg.path or data_cfg.planted.clean_pairs <= 0:
        return []
    return generate_planted(planted_config(data_cfg, variant="clean", n_pairs=data_cfg.planted.clean_pairs))
