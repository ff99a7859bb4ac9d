"""Typed configuration: Hydra YAML under ``conf/`` validated against these dataclasses.

Each field is documented here, once. Pipelines call :func:`compose` with the override strings a
user passes (``mlflow run . -P overrides="data.path=x.jsonl train.lr=1e-5"``).
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from prefsculpt.audit.config import AuditConfig
from prefsculpt.concepts.config import EncodeConfig, NamedConceptConfig, SAEConfig
from prefsculpt.core.choices import ModelDType
from prefsculpt.data.planted import PlantedRates
from prefsculpt.evals.config import EvalConfig
from prefsculpt.review.config import ReviewConfig
from prefsculpt.search.config import PromoteConfig, SearchConfig
from prefsculpt.shaping.config import ShapingConfig, TrainConfig

log = logging.getLogger(__name__)

#: ``conf/`` of the checkout this module lives in (src layout), when it is one.
CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"
#: The copy a wheel carries inside the package (setup.py's build hook puts it there).
PACKAGED_CONF = Path(__file__).resolve().parent / "conf"


def conf_dir() -> Path:
    """The config folder: the checkout's top-level ``conf/`` (a checkout or an editable install), else
    the copy inside the installed package (a wheel: ``pip install prefsculpt`` from any folder)."""
    if (CHECKOUT_CONF / "config.yaml").is_file() and (CHECKOUT_CONF.parent / "pyproject.toml").is_file():
        return CHECKOUT_CONF
    if (PACKAGED_CONF / "config.yaml").is_file():
        return PACKAGED_CONF
    raise FileNotFoundError(
        f"prefsculpt's config is neither in a checkout ({CHECKOUT_CONF}) nor in the installed package "
        f"({PACKAGED_CONF}): reinstall prefsculpt (its wheel carries conf/ inside the package)"
    )


#: The config folder found at import (``conf_dir()`` says where, or why there is none).
CONF_DIR = CHECKOUT_CONF if (CHECKOUT_CONF / "config.yaml").is_file() else PACKAGED_CONF


PlantedVariant = StrEnum("PlantedVariant", ["standard", "null", "clean"])


DataFormat = StrEnum("DataFormat", ["auto", "plain", "chat", "hh_rlhf"])


#: ``raise`` is a keyword, so this enum is built by name (OmegaConf matches members by name).
OnError = StrEnum("OnError", {"raise": "raise", "skip": "skip"})


@dataclass
class ModelConfig:
    #: ``smollm2-135m-instruct`` (embedded GGUF), a local HF folder, or a hub name (online only).
    name_or_path: str = "smollm2-135m-instruct"
    #: Where converted models live; null = ``$PREFSCULPT_CACHE/models`` or ``~/.cache/prefsculpt/models``.
    cache_dir: str | None = None
    #: Weights dtype for inference; ``auto`` = bfloat16 on a GPU with bf16, else float32. Training
    #: keeps float32 master weights unless this names a dtype.
    dtype: ModelDType = ModelDType.auto


@dataclass
class PlantedDataConfig:
    n_pairs: int = 1200
    seed: int = 0
    #: standard | null (chosen/rejected swapped at random) | clean (concepts independent of correctness)
    variant: PlantedVariant = PlantedVariant.standard
    #: Planted concept rates; field docs on :class:`prefsculpt.data.planted.PlantedRates`.
    rates: PlantedRates = field(default_factory=PlantedRates)
    #: Pairs in the held-out ``clean`` evaluation split generated beside the standard set (0 = none).
    clean_pairs: int = 300


@dataclass
class SplitConfig:
    """Shares of the data per split (summing to 1): pairs of your own data by prompt hash, facts of
    the planted pool per family (``prefsculpt.data.splits``). ``train`` feeds the audit and DPO,
    ``validation`` early stopping, ``select`` the search and the promotion pick, ``test`` the final
    figures (touched once, after the search)."""

    train: float = 0.7
    validation: float = 0.1
    select: float = 0.1
    test: float = 0.1
    #: Change to draw a different (still deterministic) split.
    salt: str = ""


@dataclass
class TokenizeConfig:
    #: Longer prompts keep their last tokens.
    max_prompt_tokens: int = 256
    #: Longer responses keep their first tokens (the end-of-turn token is always appended).
    max_response_tokens: int = 256


@dataclass
class DataConfig:
    #: Name under which the dataset is logged to MLflow.
    name: str = "planted"
    #: null = the built-in planted set; else a .jsonl/.json/.parquet/.csv file (optionally .gz),
    #: a ``datasets`` folder, a folder of such files, or a hub dataset name (online only).
    path: str | None = None
    #: auto | plain | chat | hh_rlhf
    format: DataFormat = DataFormat.auto
    #: Map our field names (id, prompt, chosen, rejected, chosen_tags, rejected_tags) to your columns.
    columns: dict[str, str] = field(default_factory=lambda: {k: k for k in (
        "id", "prompt", "chosen", "rejected", "chosen_tags", "rejected_tags")})
    #: raise: stop on the first load with every bad row listed; skip: drop them into the skip report.
    on_error: OnError = OnError("raise")
    #: A prompt or response longer than this many characters is an invalid row.
    max_chars: int = 32_000
    #: Split to read from a DatasetDict folder or a hub dataset.
    hub_split: str = "train"
    #: Read at most this many rows (null = all).
    limit: int | None = None
    #: The prepare run whose prepared artifact later stages read (null = the newest prepare run of this
    #: same data, model and code; run one first when there is none). ``main`` sets it to its own.
    prepared_run_id: str | None = None
    #: Rows shown in the MLflow sample table.
    sample_rows: int = 50
    planted: PlantedDataConfig = field(default_factory=PlantedDataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


@dataclass
class TrackingConfig:
    #: null = ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``.
    uri: str | None = None
    #: Experiment used when a stage is started outside ``mlflow run``.
    experiment: str = "prefsculpt"
    #: Optional run name for the stage's run.
    run_name: str | None = None


@dataclass
class PipelineConfig:
    #: Stages the ``main`` entry point runs, in order (a prefix such as [prepare, sae, audit] stops early).
    stages: list[str] = field(
        default_factory=lambda: ["prepare", "sae", "audit", "search", "evaluate", "promote"]
    )
    #: Reuse a stage's earlier complete run when its inputs (config, upstream, code) are unchanged.
    reuse: bool = True


#: What a train run logs as its policy (``train.log_policy``).
PolicyLog = StrEnum("PolicyLog", ["full", "delta", "none"])


@dataclass
class TrainStageConfig(TrainConfig):
    """:class:`prefsculpt.shaping.config.TrainConfig` (every other ``train.*`` field and its doc) plus
    how the policy is stored."""

    #: What the train run logs as its policy. ``full``: an MLflow transformers chat model the registry
    #: can serve (the whole model, ~540 MB for SmolLM2-135M). ``delta``: only the trained parameters
    #: (the top ``train_top_layers`` layers + final norm, safetensors) and a manifest naming the base by
    #: content fingerprint, as the run's ``policy_delta/`` artifact; ``eval.policy=<run id>`` assembles
    #: the full policy from it into the cache. ``none``: nothing (the local policy folder only).
    #: null = ``full`` when ``log_model`` is true, else ``none``; search trials default to ``delta``
    #: (the search logs full models only for its Pareto front and promote for its pick).
    log_policy: PolicyLog | None = None


def policy_log_mode(tc: Any, default_full: str = "full") -> str:
    """``train.log_policy`` resolved: the explicit value, else ``default_full`` when ``train.log_model``
    (the older switch) is true, else ``none``."""
    mode = tc.get("log_policy") if hasattr(tc, "get") else getattr(tc, "log_policy", None)
    if mode is not None:
        return str(getattr(mode, "value", mode))
    return default_full if bool(tc.get("log_model", True)) else "none"


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    #: Concepts named by a regex over response text or by contrastive examples (METHOD §2).
    named_concepts: list[NamedConceptConfig] = field(default_factory=list)
    #: Global seed (torch, numpy, python).
    seed: int = 0
    #: Where every stage runs its models: auto (cuda, then mps, then cpu) | cuda | cuda:1 | mps | cpu.
    #: Training on several GPUs: ``train.strategy`` and ``train.devices``.
    device: str = "auto"
    #: Root of prefsculpt's caches (converted models, encodings, ...); null = ``~/.cache/prefsculpt``.
    cache_dir: str | None = None


def parse_overrides(overrides: str | list[str] | None) -> list[str]:
    """``"a=1 b='x y'"`` -> ``["a=1", "b=x y"]``; MLproject hands overrides over as one string."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return [o for item in overrides for o in shlex.split(item)]


def compose(overrides: str | list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides and validate it against :class:`RootConfig`."""
    # The schema comes first in conf/config.yaml's defaults, so every field exists (with its type)
    # before the YAML groups and the user's overrides are applied: `sae.layer=10` works even when
    # a group's YAML leaves that field at its default.
    ConfigStore.instance().store(name="prefsculpt_schema", node=RootConfig)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    folder = conf_dir()
    log.debug("config from %s", folder)
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=parse_overrides(overrides))
    schema = OmegaConf.structured(RootConfig)
    merged = OmegaConf.merge(schema, cfg)
    OmegaConf.set_struct(merged, True)
    return merged


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
