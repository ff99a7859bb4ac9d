"""One entry for "the pairs this config means": the planted generator or a loaded source."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefsculpt.data.loaders import LoadResult, load_pairs
from prefsculpt.data.planted import PlantedConfig, PlantedRates, fact_keys, generate_planted
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.splits import EVAL_SPLITS, SPLITS, split_facts


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


def planted_fact_splits(data_cfg: Any) -> dict[str, str]:
    """Planted fact key -> split (``data.split`` fractions of each family's facts; see ``splits.py``)."""
    fractions = {sp: float(getattr(data_cfg.split, sp)) for sp in SPLITS}
    return split_facts(fact_keys(), fractions, salt=str(data_cfg.split.salt))


def load_clean_splits(data_cfg: Any, fact_split: Mapping[str, str]) -> dict[str, list[PreferencePair]]:
    """The planted ``clean`` evaluation pairs (concepts independent of correctness) as ``clean_select``
    and ``clean_test``: ``data.planted.clean_pairs`` shared between the two by their split fractions,
    each part asking only about its own split's facts (so none about a fact a training pair asks
    about, and none shared between select and test); {} for your own data."""
    n = int(data_cfg.planted.clean_pairs)
    if data_cfg.path or n <= 0:
        return {}
    shares = {sp: float(getattr(data_cfg.split, sp)) for sp in EVAL_SPLITS}
    total = sum(shares.values())
    out: dict[str, list[PreferencePair]] = {}
    n_select = round(n * shares["select"] / total) if total > 0 else 0
    for sp, k in (("select", n_select), ("test", n - n_select if total > 0 else 0)):
        facts = [f for f, s in fact_split.items() if s == sp]
        if k <= 0 or not facts:
            out[f"clean_{sp}"] = []
            continue
        pairs = generate_planted(planted_config(data_cfg, variant="clean", n_pairs=k), facts=facts)
        # ids name the part: the ids of every split of one prepared artifact are unique
        out[f"clean_{sp}"] = [dataclasses.replace(p, id=p.id.replace("planted-clean-", f"planted-clean-{sp}-", 1))
                              for p in pairs]
    return out
