"""Everything an evaluation reads, built and validated before any model runs.

Loading every external file first means a malformed file (or a bad prompt set) stops the stage with
an error naming it before any compute, and nothing half-evaluated is logged for it. The built-in
probes are drawn from the planted task families but never reuse a prompt of the planted training
data (``make_probes(..., exclude_prompts=...)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefsculpt.core.errors import UserError
from prefsculpt.data.planted import make_probes
from prefsculpt.data.prepared import Prepared
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.splits import SPLITS
from prefsculpt.evals.config import EvalConfig
from prefsculpt.evals.style import load_prompts
from prefsculpt.evals.sycophancy import ABItem, MCItem, load_bct, load_opinion_ab

log = logging.getLogger(__name__)


@dataclass
class EvalInputs:
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
                "known": h(self.known_answer)}


def _stem_keys(paths: list[str], loader, limit: int | None) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in paths:
        key = Path(p).stem
        while key in out:  # two files with one name: keep both
            key += "_"
        out[key] = loader(p, limit)
    return out


#: ``subset`` of the style prompts drawn from the planted task families (the rest are "open").
IN_DOMAIN = "in_domain"


def training_prompts(prepared: Prepared) -> set[str]:
    """Prompts of the planted data's pairs (empty for real data): the probes must avoid them."""
    if not prepared.meta.get("planted"):
        return set()
    return {p.prompt_text() for p in prepared.all_pairs()}


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
    if split not in SPLITS or split == train_split:
        raise UserError(f"eval.capability.heldout_split={split!r}: use a split of {list(SPLITS)} other than the "
                        "training split")
    pairs = prepared.split(split)
    if not pairs:
        raise UserError(f"the {split} split of {prepared.meta.get('source')} is empty, so preference accuracy (the "
                        f"on-target objective) cannot be measured: give it a share (data.split.{split}=0.1), use "
                        "more rows (data.limit), or set eval.capability.clean_pairs=0")
    return pairs[:n]


def load_inputs(ec: EvalConfig, prepared: Prepared, train_split: str = "train") -> EvalInputs:
    """Every evaluation input, validated before any compute (a bad file fails here, naming it)."""
    evals = set(ec.evals)
    sy, st, cap = ec.sycophancy, ec.style, ec.capability
    inp = EvalInputs()
    planted = bool(prepared.meta.get("planted"))
    in_domain = st.in_domain if planted and not st.prompts_path and evals & {"style", "shift"} else 0
    exclude = training_prompts(prepared) if planted and (sy.planted_probes or cap.known_answer or in_domain) else set()
    if "sycophancy" in evals:
        if sy.planted_probes:
            inp.planted_probes = make_probes("sycophancy", sy.planted_probes, ec.seed, exclude)
        inp.opinion = _stem_keys([*shipped_opinion_paths(sy.shipped, planted), *sy.opinion_paths],
                                 load_opinion_ab, sy.max_items)
        inp.suggested = _stem_keys(list(sy.suggested_paths), load_bct, sy.max_items)
        inp.are_you_sure = _stem_keys(list(sy.are_you_sure_paths), load_bct, sy.max_items)
    if evals & {"style", "shift"} or ("capability" in evals and cap.kl):
        if st.prompts_path:
            inp.style_prompts = load_prompts(st.prompts_path, st.prompt_field, st.n_prompts or None)
        else:
            inp.style_prompts = make_probes("style", st.n_prompts, ec.seed)
            # Held-out planted questions (never training prompts); their own seed, so not the known-answer items.
            inp.style_prompts += [{"id": f"probe-style-in-{q['id']}", "prompt": q["prompt"], "subset": IN_DOMAIN}
                                  for q in make_probes("known_answer", in_domain, ec.seed + 1, exclude)]
    if "capability" in evals:
        if cap.clean_pairs and planted:
            inp.clean_pairs = prepared.splits.get("clean", [])[: cap.clean_pairs]
        elif cap.clean_pairs:  # your own data: its held-out split (the same `preference` table)
            inp.clean_pairs = heldout_pairs(prepared, cap.heldout_split, train_split, cap.clean_pairs)
        if cap.known_answer:
            inp.known_answer = make_probes("known_answer", cap.known_answer, ec.seed, exclude)
    log.info("evaluate inputs: %d planted probes, %d opinion, %d suggested, %d are-you-sure, %d style prompts, "
             "%d held-out pairs, %d known-answer", len(inp.planted_probes), sum(map(len, inp.opinion.values())),
             sum(map(len, inp.suggested.values())), sum(map(len, inp.are_you_sure.values())), len(inp.style_prompts),
             len(inp.clean_pairs), len(inp.known_answer))
    return inp
