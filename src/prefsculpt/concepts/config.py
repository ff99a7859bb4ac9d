"""Config schemas of the concept stages (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SAEConfig:
    #: train (sae-lens on our own activations) | path (a local SAE folder) | pretrained (sae-lens registry; online)
    source: str = "train"
    #: Residual-stream layer ℓ: the output of decoder layer ``model.layers.<layer>`` (METHOD §2).
    layer: int = 15
    #: topk | batchtopk | jumprelu | standard
    architecture: str = "topk"
    #: Latents = expansion * d_model.
    expansion: int = 8
    #: Active latents per token for (batch)topk.
    k: int = 32
    #: For source=path: folder with cfg.json + sae_weights.safetensors.
    path: str | None = None
    #: For source=pretrained: sae-lens release and id.
    release: str | None = None
    sae_id: str | None = None
    #: Extra training text files (one document per line) added to the pairs' spans.
    extra_text_files: list[str] = field(default_factory=list)
    training_tokens: int = 2_000_000
    lr: float = 3e-4
    batch_size_tokens: int = 4096
    seed: int = 0


@dataclass
class EncodeConfig:
    #: Pairs per shard file; a killed run resumes from the last finished shard.
    shard_size: int = 256
    #: Tokens per batch (length-bucketed batches).
    batch_tokens: int = 8192
    #: Compute dtype of the truncated forward (float32 | bfloat16).
    precision: str = "float32"
    #: Top-activating contexts kept per latent (for labels).
    top_contexts: int = 8
    #: Tokens either side of a top activation kept as its context.
    context_window: int = 8


@dataclass
class NamedConceptConfig:
    #: Concept name (unique; referenced by decisions.yaml).
    name: str = ""
    #: regex | contrastive
    kind: str = "regex"
    #: For kind=regex: pattern searched in response text.
    pattern: str | None = None
    #: For kind=contrastive: texts with and without the concept.
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    #: Most aligned latents reported for the concept.
    top_latents: int = 5
