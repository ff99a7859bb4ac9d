"""Config schemas of the concept stages (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from prefsculpt.core.choices import DType

SAESource = StrEnum("SAESource", ["train", "path", "pretrained"])


SAEArchitecture = StrEnum("SAEArchitecture", ["topk", "batchtopk", "jumprelu", "standard"])


NamedKind = StrEnum("NamedKind", ["regex", "contrastive"])


@dataclass
class SAEConfig:
    #: train (sae-lens on our own activations) | path (a local SAE folder) | pretrained (sae-lens registry; online)
    source: SAESource = SAESource.train
    #: Residual-stream layer ℓ: the output of decoder layer ``model.layers.<layer>`` (METHOD §2). Null: a
    #: loaded SAE's own hook (``blocks.N.hook_resid_post`` -> N), or the model's middle layer for source=train
    #: (15 on SmolLM2's 30). Set on a loaded SAE, it must agree with the SAE's hook.
    layer: int | None = None
    #: topk | batchtopk | jumprelu | standard
    architecture: SAEArchitecture = SAEArchitecture.topk
    #: Latents = expansion * d_model.
    expansion: int = 8
    #: Active latents per token for (batch)topk.
    k: int = 32
    #: For source=path: folder with cfg.json + sae_weights.safetensors.
    path: str | None = None
    #: For source=pretrained: sae-lens release and id.
    release: str | None = None
    sae_id: str | None = None
    #: source=path|pretrained: refuse an SAE whose metadata names another model than model.name_or_path
    #: (false for a local copy of the same weights under another name; d_in is checked regardless).
    check_model: bool = True
    #: Extra training text files (one document per line) added to the pairs' spans.
    extra_text_files: list[str] = field(default_factory=list)
    #: Training steps x batch: the unique tokens are cycled (reshuffled) until this many are seen.
    #: 600k (~10 passes over the planted train split's 58k unique tokens) gave held-out EV 0.94 with 8%
    #: dead latents at expansion 8, k 32, in ~285 CPU-seconds (bf16 autocast).
    training_tokens: int = 600_000
    #: Higher than sae-lens' usual 3e-4: a CPU-sized run has only ~150 steps.
    lr: float = 1e-3
    #: Share of the steps at the end over which the learning rate decays linearly to 0.
    lr_decay_fraction: float = 0.2
    batch_size_tokens: int = 4096
    #: bfloat16 autocast for the SAE's matmuls where the device has fast bf16 (about 1.5x faster on a
    #: CPU with AVX-512/AMX; STACK.md §7); ignored on an AVX2-only CPU, where emulated bf16 is ~60x slower.
    autocast: bool = True
    #: Steps a latent may stay silent before it counts as dead and gets the TopK auxiliary loss.
    dead_feature_window: int = 50
    #: jumprelu: weight of the quadratic L0 loss (target L0 = k); standard: the L1 coefficient.
    sparsity_coefficient: float = 5.0
    #: Train only on non-special tokens (chat-template markers have atypical, large residuals).
    exclude_special: bool = True
    #: Drop tokens whose residual norm exceeds this multiple of the median (attention-sink
    #: positions, ~150x the median in SmolLM2); 0 = keep all.
    max_norm_ratio: float = 10.0
    #: Count a prompt prefix shared by many pairs (the system message) once.
    dedupe_prefixes: bool = True
    #: Most tokens held in memory to train on (and, separately, to measure held-out quality on): a
    #: uniform sample of the qualifying tokens when there are more (0 = all). Bounds the SAE step's
    #: memory whatever the data size: 262,144 x 576 x 4 B = 0.6 GB at SmolLM2's width. The planted
    #: default (~58k unique training tokens) is under it, so nothing is sampled there.
    max_train_tokens: int = 262_144
    #: Keep the layer-ℓ activations under ``<cache_dir>/activations`` so a rerun skips the model.
    cache_activations: bool = True
    seed: int = 0


@dataclass
class EncodeConfig:
    #: Pairs per shard file; a killed run resumes from the last finished shard.
    shard_size: int = 256
    #: Tokens per batch (length-bucketed batches).
    batch_tokens: int = 8192
    #: Compute dtype of the truncated forward (float32 | bfloat16).
    precision: DType = DType.float32
    #: Top-activating contexts kept per latent (for labels).
    top_contexts: int = 8
    #: Tokens either side of a top activation kept as its context.
    context_window: int = 8
    #: torch CPU threads while encoding (null = torch default); on a busy shared box 1 can be faster.
    num_threads: int | None = None


@dataclass
class NamedConceptConfig:
    #: Concept name (unique; referenced by decisions.yaml).
    name: str = ""
    #: regex | contrastive
    kind: NamedKind = NamedKind.regex
    #: For kind=regex: pattern searched in response text.
    pattern: str | None = None
    #: For kind=contrastive: texts with and without the concept.
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    #: Most aligned latents reported for the concept.
    top_latents: int = 5
    #: regex: false = skip the concept (with a warning) when no training response matches, instead of
    #: stopping; for generic surface features that a dataset may simply not contain (emoji, headers).
    required: bool = True
