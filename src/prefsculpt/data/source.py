"""One entry for "the pairs this config means": the planted generator or a loaded source."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefsculpt.data.loaders import LoadResult, load_pairs


def planted_config(cfg_data: DictConfig, variant: str | None = None, n_pairs: int | None = None):
    from prefsculpt.data.planted import PlantedConfig, PlantedRates

    p = cfg_data.planted
    return PlantedConfig(
        n_pairs=int(n_pairs if n_pairs is not None else p.n_pairs),
        seed=int(p.seed),
        variant=variant or str(p.variant),
        rates=PlantedRates(**{k: float(v) for k, v in p.rates.items()}),
    )


def dataset_name(cfg_data: DictConfig) -> str:
    if cfg_data.path and cfg_data.name == "planted":
        return Path(str(cfg_data.path)).name.split(".")[0]
    return str(cfg_data.name)


def load_source(cfg_data: DictConfig) -> LoadResult:
    """Pairs for ``cfg.data``: planted (``data.path`` null) or the file/folder/hub source."""
    if not cfg_data.path:
        from prefsculpt.data.planted import generate_planted

        pc = planted_config(cfg_data)
        pairs = generate_planted(pc)
        return LoadResult(
            pairs=pairs, skipped=[], source=f"planted(variant={pc.variant}, seed={pc.seed}, n={pc.n_pairs})",
            n_rows=len(pairs),
        )
    return load_pairs(
        str(cfg_data.path),
        fmt=str(cfg_data.format),
        columns=dict(cfg_data.columns),
        on_error=str(cfg_data.on_error),
        max_chars=int(cfg_data.max_chars),
        hub_split=str(cfg_data.hub_split),
        limit=cfg_data.limit,
    )


def load_clean_split(cfg_data: DictConfig):
    """The planted ``clean`` evaluation pairs (concepts independent of correctness), or [] for real data."""
    if cfg_data.path or int(cfg_data.planted.clean_pairs) <= 0:
        return []
    from prefsculpt.data.planted import generate_planted

    return generate_planted(planted_config(cfg_data, variant="clean", n_pairs=int(cfg_data.planted.clean_pairs)))
