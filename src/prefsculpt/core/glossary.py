"""Every MLflow metric key prefsculpt logs: what it measures and which way is better.

The one source of truth for the README's glossary (a generated section, kept in sync by a test),
the audit report's glossary section and the registered model version's description.

A pattern is a key with ``{name}`` placeholders, each standing for one path segment (no ``/``),
e.g. ``syc/opinion/{file}/p_match``. The evaluation's suffixes are not listed per key: ``k_base``
is ``k`` measured on the base model, ``k_diff`` the paired policy − base difference, and
``_lo`` / ``_hi`` the bootstrap confidence bounds of any of them (:func:`lookup` handles them).

Run ``python -m prefsculpt.core.glossary README.md`` to rewrite the README's generated section.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HIGHER, LOWER, INFO = "higher", "lower", "-"


@dataclass(frozen=True)
class Entry:
    pattern: str
    #: ``higher`` / ``lower`` is better, or ``-`` (a count, a time, a setting: no better direction)
    direction: str
    meaning: str
    stage: str

    @property
    def regex(self) -> re.Pattern[str]:
        parts = re.split(r"(\{[a-z_]+\})", self.pattern)
        return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


_E = Entry
ENTRIES: tuple[Entry, ...] = (
    # prepare
    _E("rows_read", INFO, "rows read from the preference data source", "prepare"),
    _E("rows_valid", INFO, "rows that passed validation", "prepare"),
    _E("rows_skipped", LOWER, "rows dropped by validation (data.on_error=skip); see data/skipped.json", "prepare"),
    _E("{split}/n_pairs", INFO, "preference pairs in the split", "prepare"),
    _E("{split}/n_prompts", INFO, "distinct prompts in the split", "prepare"),
    _E("{split}/tokens_{part}_mean", INFO, "mean token count of the prompt / chosen / rejected side", "prepare"),
    _E("{split}/truncated_{part}", LOWER, "pairs whose prompt / chosen / rejected side was truncated", "prepare"),
    _E("{split}/tag_{tag}_chosen_gt_rejected", INFO,
       "share of pairs where the chosen side carries more of a tagged property than the rejected side", "prepare"),
    _E("planted_rate/{concept}", INFO, "rate at which the planted data set plants the concept", "prepare"),
    _E("overlap/{kind}", LOWER, "held-out items (select, test, planted clean pairs, probe pool) sharing a prompt or "
       "a planted fact with train/validation, or one split with another; must be 0 (the prepare run fails)", "prepare"),
    # sae
    _E("n_pairs", INFO, "pairs whose activations were collected (sae stage)", "sae"),
    _E("n_tokens", INFO, "tokens whose activations were collected (sae stage)", "sae"),
    _E("sae/explained_variance", HIGHER, "share of the residual-stream variance the SAE reconstructs (held out)", "sae"),
    _E("sae/l0_mean", INFO, "mean number of active latents per token (sparsity; lower is sparser)", "sae"),
    _E("sae/dead_share", LOWER, "share of latents that never fire on the held-out tokens", "sae"),
    _E("sae/{stat}", INFO, "SAE training bookkeeping (tokens, steps, seconds, throughput)", "sae"),
    _E("named/{concept}/separation", HIGHER,
       "how well a named concept's score separates texts with and without it", "sae"),
    _E("cache/{what}_hit", INFO, "1 when the activations / SAE came from the cache", "sae"),
    _E("time/{step}_seconds", INFO, "wall-clock (or CPU) seconds of a step of the sae stage", "sae"),
    # audit
    _E("n_concepts", INFO, "concepts scored (latents, clusters, named concepts, length)", "audit"),
    _E("n_tested", INFO, "concepts with enough firing pairs to be tested", "audit"),
    _E("n_significant", INFO, "concepts whose chosen-vs-rejected difference is significant at equal response "
       "length (length-controlled q < fdr, replicated)", "audit"),
    _E("n_significant_raw", INFO, "concepts significant on the raw test, not length-controlled (q_raw < fdr, "
       "replicated)", "audit"),
    _E("n_duplicate_groups", INFO, "groups of near-duplicate latents, each tested and shown as one cluster", "audit"),
    _E("n_length_carriers", INFO, "concepts listed as carrying the length difference (raw effect that vanishes at "
       "equal length)", "audit"),
    _E("n_hypotheses", INFO, "hypotheses shown in the report", "audit"),
    _E("n_latent_clusters", INFO, "clusters of co-firing latents", "audit"),
    _E("top{i}_d_z", INFO, "paired effect size d_z of the i-th strongest hypothesis", "audit"),
    _E("calibration/seeds", INFO, "swap-null seeds run (chosen/rejected swapped at random)", "audit"),
    _E("calibration/seeds_reporting", LOWER, "null seeds with any discovery (q < fdr) in any family BH runs over",
       "audit"),
    _E("calibration/seeds_reporting_concepts", LOWER, "null seeds with a concept (latent, cluster, named, built-in) "
       "at q < fdr", "audit"),
    _E("calibration/seeds_reporting_where", LOWER, "null seeds with a data-cluster (where it holds) test at q < fdr",
       "audit"),
    _E("calibration/seeds_reporting_raw", LOWER, "null seeds with a concept at raw q < fdr (not length-controlled)",
       "audit"),
    _E("calibration/seeds_allowed", INFO, "null seeds with a discovery tolerated before calibration fails", "audit"),
    _E("calibration/failed", LOWER, "1 when more null seeds made a discovery than tolerated: no decisions proposed",
       "audit"),
    _E("calibration/seeds_reporting_replicated", LOWER, "null seeds reporting a replicated hypothesis", "audit"),
    _E("calibration/share_reporting", LOWER, "share of null seeds reporting anything (false-discovery check)",
       "audit"),
    _E("planted/{concept}/rank", LOWER, "rank of the best hypothesis matching a planted concept", "audit"),
    _E("planted/{concept}/corr", HIGHER, "correlation of that hypothesis with the planted concept", "audit"),
    _E("planted/captured", HIGHER, "planted concepts the audit recovered", "audit"),
    # train
    _E("train/loss", LOWER, "shaped DPO loss per step", "train"),
    _E("train/rewards/chosen", INFO, "mean implicit reward of the chosen responses", "train"),
    _E("train/rewards/rejected", INFO, "mean implicit reward of the rejected responses", "train"),
    _E("train/rewards/margins", HIGHER, "mean chosen − rejected implicit reward margin", "train"),
    _E("train/rewards/accuracies", HIGHER, "share of pairs with a positive reward margin", "train"),
    _E("train/shaped_accuracies", HIGHER, "share of pairs the shaped logit ranks correctly", "train"),
    _E("train/pair_weight_mean", INFO, "mean pair weight (filter shaping down-weights pairs)", "train"),
    _E("train/concept/{method}/{concept}", INFO, "mean logit offset a shaped concept adds in a step", "train"),
    _E("train/pairs_total", INFO, "training pairs after truncation", "train"),
    _E("train/pairs_dropped", INFO, "pairs the filter shaping dropped", "train"),
    _E("train/pairs_weighted", INFO, "pairs the filter shaping down-weighted", "train"),
    _E("train/precompute_s", INFO, "seconds of the frozen-reference precompute", "train"),
    _E("train/fit_s", INFO, "seconds of DPO training", "train"),
    _E("train/optimizer_steps", INFO, "optimizer steps taken", "train"),
    _E("train/pairs_per_s", HIGHER, "training throughput (0 on a resumed run)", "train"),
    _E("train/policy_delta_mb", INFO, "MB of the policy delta the run logged (train.log_policy=delta: the "
       "trained layers only, instead of a whole model)", "train"),
    _E("train/policy_delta_params", INFO, "parameters in the policy delta (the trained ones)", "train"),
    _E("train/val_pairs", INFO, "validation pairs scored during training (early stopping, the kept weights)",
       "train"),
    _E("train/val_checks", INFO, "validation checks run during training", "train"),
    _E("train/best_val_loss", LOWER, "lowest validation loss; the policy keeps that check's weights", "train"),
    _E("train/best_val_step", INFO, "optimizer step of the lowest validation loss (the kept weights)", "train"),
    _E("train/stopped_early", INFO, "1 when early stopping ended training before its last epoch", "train"),
    _E("val/loss", LOWER, "shaped DPO loss on the validation pairs (what early stopping watches)", "train"),
    _E("val/dpo_loss", LOWER, "plain DPO loss on the validation pairs", "train"),
    _E("val/rewards/accuracies", HIGHER, "share of validation pairs with a positive reward margin", "train"),
    _E("val/rewards/margins", HIGHER, "mean chosen − rejected implicit reward margin on the validation pairs",
       "train"),
    _E("epoch", INFO, "training epoch (Lightning)", "train"),
    # evaluate: sycophancy
    _E("syc/planted/shift", LOWER, "sycophancy: agreement with the user's wrong belief minus agreement with the "
       "same question asked neutrally (belief − neutral; planted probes)", "evaluate"),
    _E("syc/planted/p_agree", LOWER, "probability the policy agrees with a user's wrong belief (planted prompts; raw, "
       "not corrected for the neutral agreement)", "evaluate"),
    _E("syc/planted/p_agree_neutral", INFO, "the same probability given the neutral twin (no stated belief)", "evaluate"),
    _E("syc/opinion/{file}/p_match", LOWER, "probability mass on the answer matching the user's stated opinion (no "
       "neutral twin in the data: raw)", "evaluate"),
    _E("syc/opinion/{file}/match_rate", LOWER, "share of answers that match the user's stated opinion", "evaluate"),
    _E("syc/suggested/{file}/shift", LOWER, "probability of the user-suggested wrong answer with the suggestion minus "
       "without it (belief − neutral)", "evaluate"),
    _E("syc/suggested/{file}/p_sugg", LOWER, "probability of the user-suggested wrong answer (raw)", "evaluate"),
    _E("syc/suggested/{file}/p_sugg_neutral", INFO, "the same probability without the suggestion", "evaluate"),
    _E("syc/suggested/{file}/switch_rate", LOWER, "share of answers switched to the user's suggestion", "evaluate"),
    _E("syc/are_you_sure/{file}/shift", LOWER, "probability lost by the model's first answer after 'are you sure?' "
       "(belief − neutral toward the user's doubt)", "evaluate"),
    _E("syc/are_you_sure/{file}/p_first", INFO, "probability of the model's first answer before the pushback",
       "evaluate"),
    _E("syc/are_you_sure/{file}/p_first_after", HIGHER, "probability of that answer after 'are you sure?' (raw)",
       "evaluate"),
    _E("syc/are_you_sure/{file}/flip_rate", LOWER, "share of correct answers abandoned after 'are you sure?'",
       "evaluate"),
    # evaluate: style
    _E("style/n_tokens/mean", INFO, "mean response length in tokens", "evaluate"),
    _E("style/{feature}/rate", INFO,
       "share of responses with the style feature (bold, headers, lists, emoji, '!', stock flattery); "
       "its |policy − base| change is style drift", "evaluate"),
    _E("style/{feature}/mean", INFO, "mean count of the style feature per response", "evaluate"),
    _E("style/in_domain/{feature}/{stat}", INFO, "the same on the in-domain style prompts only", "evaluate"),
    # evaluate: capability
    _E("cap/pref/implicit_acc", HIGHER, "held-out preference accuracy of the implicit reward (on-target)",
       "evaluate"),
    _E("cap/pref/logp_acc", HIGHER, "held-out pairs where the preferred response has the higher log-prob",
       "evaluate"),
    _E("cap/known/acc", HIGHER, "accuracy on known-answer questions (capability kept)", "evaluate"),
    _E("cap/kl/mean_token", LOWER, "mean per-token KL of the policy from the base on its own rollouts", "evaluate"),
    _E("cap/kl/sum", LOWER, "summed KL of the policy from the base per rollout", "evaluate"),
    # evaluate: concept shift
    _E("shift/hyp_spearman", HIGHER, "Spearman ρ of measured concept shift on the audit's prediction, over the "
       "hypotheses only (random controls never enter a correlation)", "evaluate"),
    _E("shift/hyp_r2", HIGHER, "R² of measured shift on predicted effect, hypotheses only", "evaluate"),
    _E("shift/hyp_n", INFO, "hypotheses compared", "evaluate"),
    _E("shift/hyp_abs_shift_z", INFO, "mean |shift_z| of the hypotheses (how much training moved them)", "evaluate"),
    _E("shift/hyp_sign_agree", HIGHER, "share of hypotheses that moved in the predicted direction", "evaluate"),
    _E("shift/hyp_along_z", INFO, "mean shift_z × sign(predicted): shift in the direction the data teaches",
       "evaluate"),
    _E("shift/unshaped_{stat}", INFO, "the same over the hypotheses the policy's training did not shape (these "
       "should follow the prediction)", "evaluate"),
    _E("shift/shaped_{stat}", INFO, "the same over the hypotheses the policy's training shaped (suppressed: less "
       "shift along the prediction than plain DPO)", "evaluate"),
    _E("shift/control_abs_shift_z", LOWER, "mean |shift_z| of random control latents (the reference: should stay "
       "near 0)", "evaluate"),
    _E("shift/control_n", INFO, "random control latents compared", "evaluate"),
    _E("time/{eval}_s", INFO, "seconds an evaluation (or a pipeline stage) took", "evaluate"),
    _E("time/total_s", INFO, "seconds of the whole stage / pipeline", "evaluate"),
    # search (trial runs; evaluate runs log the same when the search objectives apply)
    _E("search/off_target", LOWER, "objective: sycophancy drift (the increase's size) + style_weight × style drift, vs the base",
       "search"),
    _E("search/on_target", HIGHER, "objective: on-target preference accuracy (search.objectives.on_target_metric)",
       "search"),
    _E("search/syc_increase", LOWER, "mean paired policy − base difference of the sycophancy metrics "
       "(search.objectives.sycophancy_metrics: the belief − neutral shifts)", "search"),
    _E("search/style_drift", LOWER, "mean |policy − base| change of the style rates", "search"),
    _E("search/n_{state}", INFO, "trials of the study in a state (complete, pruned, fail, running, waiting)",
       "search"),
    _E("search/first/off_target", LOWER, "off-target objective at the early stop's first budget (search.early_stop)",
       "search"),
    _E("search/first/on_target", HIGHER, "on-target objective at the early stop's first budget", "search"),
    _E("search/first/off_target_hw", INFO, "95% CI half-width of the first-budget off-target (the noise the "
       "early stop allows)", "search"),
    _E("search/first/on_target_hw", INFO, "95% CI half-width of the first-budget on-target", "search"),
    _E("search/n_pareto", INFO, "trials on the Pareto front", "search"),
    _E("search/n_ran_here", INFO, "trials this worker ran", "search"),
    # promote
    _E("promote/off_target", LOWER, "off-target objective of the registered trial", "promote"),
    _E("promote/on_target", HIGHER, "on-target objective of the registered trial", "promote"),
    _E("promote/syc_increase", LOWER, "sycophancy increase of the registered trial", "promote"),
    _E("promote/baseline_syc_increase", INFO, "sycophancy increase of plain DPO (the gate's reference)", "promote"),
    _E("promote/baseline_on_target", INFO, "on-target accuracy of plain DPO (the gate's reference)", "promote"),
    _E("promote/promoted", HIGHER, "1 when every gate passed and champion moved", "promote"),
    # final figures: the pick and plain DPO, once each, on the same test items (pipeline evaluate, promote, main)
    _E("test/on_target", HIGHER, "final, on test: on-target metric of the picked policy (95% CI)", "evaluate"),
    _E("test/on_target_plain", HIGHER, "final, on test: on-target metric of the plain-DPO baseline", "evaluate"),
    _E("test/on_target_diff", HIGHER, "final, on test: picked − plain DPO on-target, paired over the same items",
       "evaluate"),
    _E("test/syc_increase", LOWER, "final, on test: sycophancy increase over the base of the picked policy", "evaluate"),
    _E("test/syc_increase_plain", LOWER, "final, on test: sycophancy increase over the base of plain DPO", "evaluate"),
    _E("test/syc_increase_diff", LOWER, "final, on test: picked − plain DPO sycophancy, paired over the same items",
       "evaluate"),
    _E("test/syc_vs_ratio", LOWER, "final, on test: picked increase − promote.syc_ratio_max × plain's, per item; the "
       "sycophancy gate holds when its CI is below 0", "evaluate"),
    _E("test/off_target", LOWER, "final, on test: off-target objective of the picked policy", "evaluate"),
    _E("test/off_target_plain", LOWER, "final, on test: off-target objective of plain DPO", "evaluate"),
    _E("test/n/{figure}", INFO, "test items behind a final figure", "evaluate"),
)

SUFFIXES = {"_base": "on the base model", "_diff": "paired policy − base difference"}
BOUNDS = {"_lo": "lower CI bound", "_hi": "upper CI bound"}


@dataclass(frozen=True)
class Match:
    key: str
    entry: Entry
    #: e.g. ("_diff", "_lo") for ``k_diff_lo``
    suffixes: tuple[str, ...]

    @property
    def direction(self) -> str:
        return INFO if "_base" in self.suffixes else self.entry.direction

    @property
    def meaning(self) -> str:
        notes = [SUFFIXES.get(s) or BOUNDS[s] for s in self.suffixes]
        return self.entry.meaning + (f" ({'; '.join(notes)})" if notes else "")


@cache
def _regexes() -> list[tuple[re.Pattern[str], Entry]]:
    return [(e.regex, e) for e in ENTRIES]


def _find(key: str) -> Entry | None:
    # A literal key wins over a pattern it also matches (``search/n_pareto`` vs ``search/n_{state}``).
    exact = [e for e in ENTRIES if e.pattern == key]
    if exact:
        return exact[0]
    return next((e for rx, e in _regexes() if rx.match(key)), None)


def lookup(key: str) -> Match | None:
    """The glossary entry of a metric key, its evaluation suffixes peeled off; None if unknown."""
    rest, suffixes = key, []
    for group in (BOUNDS, SUFFIXES):
        for s in group:
            if rest.endswith(s) and _find(rest) is None:
                rest = rest[: -len(s)]
                suffixes.insert(0, s)
                break
    e = _find(rest)
    return None if e is None else Match(key, e, tuple(suffixes))


def unknown(keys: list[str] | set[str]) -> list[str]:
    """Keys no entry explains (a test keeps this empty for what the stages log)."""
    return sorted(k for k in keys if not k.startswith("system/") and lookup(k) is None)


def entries_for(keys: list[str] | set[str]) -> list[Entry]:
    """The entries explaining ``keys``, in glossary order, each once."""
    hit = {m.entry for k in keys if (m := lookup(k))}
    return [e for e in ENTRIES if e in hit]


def arrow(direction: str) -> str:
    return {HIGHER: "↑ higher", LOWER: "↓ lower"}.get(direction, "–")


def markdown(entries: list[Entry] | tuple[Entry, ...] = ENTRIES) -> str:
    """A Markdown table (the README section, the model version description)."""
    lines = ["| metric key | better | what it measures | stage |", "|---|---|---|---|"]
    lines += [f"| `{e.pattern}` | {arrow(e.direction)} | {e.meaning.replace('|', '/')} | {e.stage} |"
              for e in entries]
    return "\n".join(lines)


BEGIN, END = "<!-- glossary:begin (generated by python -m prefsculpt.core.glossary README.md) -->", "<!-- glossary:end -->"


def readme_section() -> str:
    intro = ("Evaluation metrics come as `k` (policy), `k_base` (base model) and `k_diff` (paired policy − base), "
             "each with `_lo` / `_hi` bootstrap bounds; `{x}` stands for one key segment.")
    return f"{BEGIN}\n{intro}\n\n{markdown()}\n{END}"


def render_into(text: str) -> str:
    """``text`` with the generated section replaced (it must hold the BEGIN/END markers)."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"no generated glossary section ({BEGIN!r} … {END!r}) in the text")
    return text[:i] + readme_section() + text[j + len(END):]


if __name__ == "__main__":  # python -m prefsculpt.core.glossary README.md
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render_into(path.read_text()))
