"""Config schemas of concept shaping and DPO training (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefsculpt.shaping.interventions import FilterParams, SteerParams


@dataclass
class ConceptSpec:
    """One concept to shape, given directly in config (same fields as a ``decisions.yaml`` entry)."""

    #: Concept name as the audit writes it: ``latent:<i>``, ``cluster:<i>``, ``named:<name>``.
    concept: str = ""
    #: A registered intervention (METHOD §5; README.md "Interventions" lists them and their parameters).
    method: str = "score"
    #: suppress (λ = +strength) | amplify (λ = −strength) | allow (not shaped): ``audit.decisions.Action``.
    action: str = "suppress"
    #: ≥ 0; what it means per method (λ, κ, α or unused) is in README.md's "Interventions" table.
    strength: float = 1.0
    #: filter, drop mode: share ρ of pairs dropped (null = ``shaping.filter_share``).
    share: float | None = None
    #: inoculate: the instruction C_u appended to the prompt (null = ``shaping.instructions[concept]``).
    instruction: str | None = None
    #: steer: multiplier m of the direction added to the reference's residual (null = ``shaping.steer_multiplier``).
    multiplier: float | None = None
    #: The audit's direction of the hypothesis: 1 = the preferred side has more of the concept, −1 = less
    #: (``hypotheses.json``'s ``direction``; the search fills it in). Suppress removes the learning signal
    #: along it, amplify adds to it (``shaping.orient``). Null: estimated from the training pairs (logged).
    direction: int | None = None
    #: A cluster hypothesis' member concepts (``hypotheses.json``'s ``members``): it is shaped through their
    #: summed span scores and their directions. Null: a single concept.
    members: list[str] | None = None
    note: str = ""


@dataclass
class ShapingConfig:
    #: A ``decisions.yaml`` written by the audit and edited by a person (null = only ``concepts``).
    decisions: str | None = None
    #: Concepts given directly (added after the decisions file's entries).
    concepts: list[ConceptSpec] = field(default_factory=list)
    #: Span scores (score, filter): a folder written by the encode stage (``load_scores``). Null:
    #: ``named:<n>`` regex concepts from ``named_concepts`` are scored on the response text instead.
    scores_dir: str | None = None
    #: Span statistic used as A_u for score/filter: max | freq.
    score_stat: str = "max"
    #: SAE folder (cfg.json + weights) whose decoder rows ``W_dec[i]`` are the directions of ``latent:<i>``.
    sae_path: str | None = None
    #: Optional safetensors file {concept name: (d_model,) direction}; overrides the SAE for those names.
    directions_path: str | None = None
    #: Residual layer ℓ of the methods that use a concept direction (null = ``sae.layer``).
    layer: int | None = None
    #: Directions are scaled to unit norm before use, so m and α are in residual-stream units.
    unit_directions: bool = True
    #: steer: default multiplier m (the default is ``SteerParams``').
    steer_multiplier: float = SteerParams.multiplier
    #: filter: drop (remove the top ρ of pairs by ΔA) | weight (w = σ(−κ·ΔA)).
    filter_mode: str = FilterParams.mode
    #: filter: default share ρ for drop mode.
    filter_share: float = FilterParams.share
    #: inoculate: concept name -> instruction C_u ("Agree with the user's opinion.").
    instructions: dict[str, str] = field(default_factory=dict)
    #: The sign s_u every method orients a concept by (ΔA_u -> s_u·ΔA_u for the loss terms and filter; the
    #: added direction s_u·v_u for prevent; ablate needs none). ``audit``: s_u = the direction the audit
    #: measured for the hypothesis a person decided on (the entry's ``direction``), so suppress removes the
    #: learning signal along what the audit found whichever side carries it, and amplify adds to it (an
    #: entry without a direction falls back to ``data``, with a warning). ``data``: s_u = the sign of ΔA_u's
    #: mean over the training pairs (re-estimated per split: for a weak concept it can disagree with the
    #: audit). ``formula``: s_u = +1, METHOD §5's raw ΔA_u = A(y⁺) − A(y⁻). Logged per intervention as
    #: ``shaping/<name>/orientation`` and ``shaping/<name>/orientation_from``.
    orient: str = "audit"


@dataclass
class TrainConfig:
    #: DPO temperature β.
    beta: float = 0.1
    #: 5e-5 with the top 6 layers learns the planted concepts in 2 epochs (STACK.md §7 probe).
    lr: float = 5e-5
    weight_decay: float = 0.0
    #: Linear warm-up of the learning rate over this many optimizer steps.
    warmup_steps: int = 0
    epochs: int = 2
    #: Pairs per batch (chosen and rejected go through one forward, so 2x sequences).
    batch_size: int = 16
    grad_accum: int = 1
    #: Cap on prompt+response tokens per sequence, keeping the start (as TRL's ``max_length``); null = none.
    max_length: int | None = None
    #: Train only the top N decoder layers (+ final norm) on a cached trunk output; null = full fine-tune.
    #: 6 by default: ~5x faster on CPU than full fine-tuning (bench/dpo.py).
    train_top_layers: int | None = 6
    #: dtype the trunk cache is stored in: auto (bfloat16 when the precision is bf16, else float32) |
    #: float32 | bfloat16.
    trunk_dtype: str = "auto"
    #: Lightning precision: auto (bf16-mixed on a GPU or CPU with native bf16, else 32-true) | 32-true |
    #: bf16-mixed | bf16-true.
    precision: str = "auto"
    #: Lightning strategy: auto (one device) | ddp (data parallel: a full copy per device) | fsdp
    #: (sharded; GPUs only). With ``devices`` > 1 the stage launches one process per device (torchrun).
    strategy: str = "auto"
    #: Devices (processes) to train on; ``batch_size`` is per device, so a step sees ``batch_size × devices``
    #: pairs (the same pairs, in the same order, as one device with that batch size).
    devices: int = 1
    #: Save ``last.ckpt`` every this many optimizer steps (a killed run resumes from it).
    checkpoint_every_n_steps: int = 50
    #: Resume an unfinished run with the same config from its last checkpoint, in the same MLflow run.
    resume: bool = True
    #: Keep checkpoints after a run completes (they are large; the final policy is logged anyway).
    keep_checkpoints: bool = False
    #: Batches per length bucket: pairs are sorted by length inside chunks of this many batches.
    bucket_batches: int = 32
    #: Tokens per batch in the precompute pass.
    precompute_batch_tokens: int = 8192
    #: Pairs: a parquet split written by ``prepare`` (``data/train.parquet``); null = ``data`` config + split.
    pairs_path: str | None = None
    #: Split of the ``data`` config to train on when ``pairs_path`` is null.
    split: str = "train"
    #: Use at most this many pairs (null = all); for quick runs.
    max_pairs: int | None = None
    #: Validation pairs (the prepared ``validation`` split, never trained, selected or reported on) whose
    #: loss decides early stopping and which weights are kept; at most this many (0 = no validation).
    val_pairs: int = 128
    #: Validation checks per epoch.
    val_checks_per_epoch: int = 2
    #: Stop after this many validation checks without a lower validation loss (0 = never stop early).
    early_stopping_patience: int = 2
    #: Keep the weights of the check with the lowest validation loss (else the last step's).
    restore_best: bool = True
    #: Log the final policy as an MLflow transformers chat model (llm/v1/chat) the registry can serve.
    log_model: bool = True
    log_every_n_steps: int = 1
    seed: int = 0
