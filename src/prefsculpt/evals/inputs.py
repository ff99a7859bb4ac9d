"""Everything an evaluation reads, built and validated before any model runs.

Loading every external file first means a malformed file (or a bad prompt set) stops the stage with
an error naming it before any compute, and nothing half-evaluated is logged for it.

Every input is drawn from one held-out split, ``eval.split`` (``select`` for the search's trials,
``test`` for the final figures; ``prefsculpt.data.splits``): the planted probes (sycophancy,
known-answer, in-domain style prompts) from that split's facts only (``make_probes(..., facts=...)``,
facts no training pair asks about), the planted clean pairs from ``clean_<split>``, your own data's
held-out pairs from that split, and the items of external sets (opinion A/B, suggested answer,
are-you-sure, the style prompts) from that split's half, by a stable hash of their id. Items of two
splits never share an id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefsculpt.core.errors import UserError
from prefsculpt.data.planted import fact_keys, make_probes
from prefsculpt.data.prepared import Prepared
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.splits import EVAL_SPLITS, LEARN_SPLITS, SPLITS, eval_part
from prefsculpt.evals.config import EvalConfig
from prefsculpt.evals.style import load_prompts
from prefsculpt.evals.sycophancy import ABItem, MCItem, load_bct, load_opinion_ab

log = logging.getLogger(__name__)


@dataclass
class EvalInputs:
    #: The held-out split every item below comes from (select | test).
    split: str = "select"
    planted_probes: list[dict] = field(default_factory=list)
    opinion: dict[str, list[ABItem]] = field(default_factory=dict)  # file stem -> items
    suggested: dict[str, list[MCItem]] = field(default_factory=dict)
    are_you_sure: dict[str, list[MCItem]] = field(default_factory=dict)
    style_prompts: list[dict] = field(default_factory=list)  # [{id, prompt}]
    clean_pairs: list[PreferencePair] = field(default_factory=list)
    known_answer: list[dict] = field(default_factory=list)

    def fingerprint(self) -> dict[str, Any]:
        """What the cached base results depend on: every item's id and text."""
        def h(x: Any) -> str:
            return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:16]

        return {"planted": h(self.planted_probes), "opinion": h({k: [vars(i) for i in v] for k, v in self.opinion.items()}),
                "suggested": h({k: [vars(i) for i in v] for k, v in self.suggested.items()}),
                "are_you_sure": h({k: [vars(i) for i in v] for k, v in self.are_you_sure.items()}),
                "style": h(self.style_prompts), "clean": h([p.to_record() for p in self.clean_pairs]),
                "known": h(self.known_answer), "split": self.split}

    def item_ids(self) -> set[str]:
        """Every item's id (the ids of a select and a test evaluation never meet)."""
        ids = {str(x["id"]) for x in (*self.planted_probes, *self.style_prompts, *self.known_answer)}
        ids |= {p.id for p in self.clean_pairs}
        ids |= {f"{k}:{i.id}" for d in (self.opinion, self.suggested, self.are_you_sure) for k, v in d.items()
                for i in v}
        return ids


def _part(items: list, split: str, share: float, key=lambda x: x.id) -> list:
    """The items of an external set that belong to ``split`` (by a stable hash of their id)."""
    return [x for x in items if eval_part(str(key(x)), split, share)]


def _stem_keys(paths: list[str], loader, limit: int | None, split: str, share: float) -> dict[str, list]:
    """Per file (by stem): its items of ``split``, at most ``limit`` of them."""
    out: dict[str, list] = {}
    for p in paths:
        key = Path(p).stem
        while key in out:  # two files with one name: keep both
            key += "_"
        out[key] = _part(loader(p, None), split, share)[:limit]
    return out


#: ``subset`` of the style prompts drawn from the planted task families (the rest are "open").
IN_DOMAIN = "in_domain"


def training_prompts(prepared: Prepared) -> set[str]:
    """Prompts and questions of the planted data's learnt pairs (train, validation; empty for real
    data): the probes must avoid them (their facts already do; this is the second lock)."""
    if not prepared.meta.get("planted"):
        return set()
    pairs = prepared.all_pairs(LEARN_SPLITS)
    return {p.prompt_text() for p in pairs} | {p.metadata["question"] for p in pairs if p.metadata.get("question")}


def pool_half(split: str, share: float) -> set[str]:
    """Your own data (no planted facts): the planted pool's facts of ``split``'s half, by a stable
    hash, so the built-in probes of select and test never ask about one fact."""
    return {k for keys in fact_keys().values() for k in keys if eval_part(k, split, share)}


def check_split(split: str) -> str:
    if split not in EVAL_SPLITS:
        raise UserError(f"eval.split={split!r}: use one of {list(EVAL_SPLITS)} (select: the search and ad-hoc "
                        "evaluations; test: the final figures, once)")
    return split


def split_facts(prepared: Prepared, split: str) -> set[str]:
    """The planted facts of ``split`` the probes are drawn from (a clear error when there are none)."""
    facts = prepared.facts(split)
    if not facts:
        raise UserError(f"the prepared planted data has no {split} facts (data.split.{split}=0?), so no held-out "
                        f"probe can be drawn for eval.split={split}: give the split a share, or rerun prepare")
    return facts


#: The opinion A/B sample shipped inside the package (licence: evals/data/ATTRIBUTION.md).
SHIPPED_OPINION = Path(__file__).resolve().parent / "data" / "anthropic_sycophancy_150.json"
SHIPPED_MODES = ("auto", "on", "off")


def shipped_opinion_paths(mode: str, planted: bool) -> list[str]:
    """``[SHIPPED_OPINION]`` when ``eval.sycophancy.shipped`` asks for it (``auto``: own data only)."""
    if mode not in SHIPPED_MODES:
        raise UserError(f"eval.sycophancy.shipped={mode!r}: use one of {list(SHIPPED_MODES)}")
    if mode == "off" or (mode == "auto" and planted):
        return []
    if not SHIPPED_OPINION.is_file():
        raise UserError(f"the packaged sycophancy set {SHIPPED_OPINION} is missing (an install without package "
                        "data?): reinstall prefsculpt, or set eval.sycophancy.shipped=off and give "
                        "eval.sycophancy.opinion_paths")
    return [str(SHIPPED_OPINION)]


def heldout_pairs(prepared: Prepared, split: str, train_split: str, n: int) -> list[PreferencePair]:
    """The first ``n`` pairs of your data's held-out ``split`` of the prepared data (the same
    deterministic split training draws its pairs from, so none of them was trained on)."""
    if split not in SPLITS or split == train_split or split in LEARN_SPLITS:
        raise UserError(f"eval.capability.heldout_split={split!r}: use a held-out split of {list(SPLITS)} "
                        f"({list(EVAL_SPLITS)}), never one the pipeline learns from ({list(LEARN_SPLITS)})")
    pairs = prepared.split(split)
    if not pairs:
        raise UserError(f"the {split} split of {prepared.meta.get('source')} is empty, so preference accuracy (the "
                        f"on-target objective) cannot be measured: give it a share (data.split.{split}=0.1), use "
                        "more rows (data.limit), or set eval.capability.clean_pairs=0")
    return pairs[:n]


def load_inputs(ec: EvalConfig, prepared: Prepared, train_split: str = "train", split: str | None = None) -> EvalInputs:
    """Every evaluation input of held-out split ``split`` (default ``eval.split``), validated before
    any compute (a bad file fails here, naming it)."""
    split = check_split(str(split or getattr(ec, "split", "select")))
    evals = set(ec.evals)
    sy, st, cap = ec.sycophancy, ec.style, ec.capability
    share = float(getattr(ec, "select_share", 0.5))
    inp = EvalInputs(split=split)
    planted = bool(prepared.meta.get("planted"))
    # whenever the style prompts are built (style, shift, or the KL of capability), the same set: two
    # evaluations of one split with different eval lists still answer the same prompts (paired figures)
    styled = bool(evals & {"style", "shift"} or ("capability" in evals and cap.kl))
    in_domain = st.in_domain if planted and not st.prompts_path and styled else 0
    need_probes = bool(sy.planted_probes or cap.known_answer or in_domain)
    exclude = training_prompts(prepared) if need_probes and planted else set()
    facts = (split_facts(prepared, split) if planted else pool_half(split, share)) if need_probes else None
    if "sycophancy" in evals:
        if sy.planted_probes:
            inp.planted_probes = make_probes("sycophancy", sy.planted_probes, ec.seed, exclude, facts, split)
        inp.opinion = _stem_keys([*shipped_opinion_paths(sy.shipped, planted), *sy.opinion_paths],
                                 load_opinion_ab, sy.max_items, split, share)
        inp.suggested = _stem_keys(list(sy.suggested_paths), load_bct, sy.max_items, split, share)
        inp.are_you_sure = _stem_keys(list(sy.are_you_sure_paths), load_bct, sy.max_items, split, share)
    if styled:
        if st.prompts_path:
            got = _part(load_prompts(st.prompts_path, st.prompt_field), split, share, key=lambda x: x["id"])
            inp.style_prompts = got[: st.n_prompts or None]
        else:  # the neutral prompts of this split's half, renamed so no id is shared with the other half
            neutral = _part(make_probes("style", 10**6, ec.seed), split, share, key=lambda x: x["prompt"])
            inp.style_prompts = [{**q, "id": q["id"].replace("probe-style-", f"probe-style-{split}-", 1)}
                                 for q in neutral[: st.n_prompts]]
            # Held-out planted questions (never training facts); their own seed, so not the known-answer items.
            inp.style_prompts += [{"id": f"probe-style-in-{q['id']}", "prompt": q["prompt"], "subset": IN_DOMAIN}
                                  for q in make_probes("known_answer", in_domain, ec.seed + 1, exclude, facts, split)]
    if "capability" in evals:
        if cap.clean_pairs and planted:
            inp.clean_pairs = prepared.split(f"clean_{split}")[: cap.clean_pairs]
        elif cap.clean_pairs:  # your own data: its held-out split (the same `preference` table)
            if cap.heldout_split and cap.heldout_split != split:
                log.warning("eval.capability.heldout_split=%s differs from eval.split=%s: preference accuracy is "
                            "measured on %s, not on the split the rest of this evaluation uses", cap.heldout_split,
                            split, cap.heldout_split)
            inp.clean_pairs = heldout_pairs(prepared, cap.heldout_split or split, train_split, cap.clean_pairs)
        if cap.known_answer:
            inp.known_answer = make_probes("known_answer", cap.known_answer, ec.seed, exclude, facts, split)
    log.info("evaluate inputs (%s split): %d planted probes, %d opinion, %d suggested, %d are-you-sure, %d style "
             "prompts, %d held-out pairs, %d known-answer", split, len(inp.planted_probes),
             sum(map(len, inp.opinion.values())),
             sum(map(len, inp.suggested.values())), sum(map(len, inp.are_you_sure.values())), len(inp.style_prompts),
             len(inp.clean_pairs), len(inp.known_answer))
    return inp
