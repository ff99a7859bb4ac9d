"""Named concepts (METHOD §2): a concept given by a regex or by contrastive texts, as a direction at ℓ.

Each concept becomes a unit direction v (d,) = normalised difference of class means of layer-ℓ
activations, a bias b = midpoint of the two class means' projections on v, and the SAE latents
whose decoder rows are most aligned with v. The encoder scores it per token as relu(h·v − b), so
it gets span scores (max, freq) exactly like a latent.

- ``regex``: the classes are *tokens*, not responses. Positive: response tokens whose characters
  overlap a match; negative: the tokens of responses with no match. A response-level mean would
  average the few matching tokens (``**``) with everything else the response contains, and so mix
  in whatever co-occurs with the pattern (in the planted data, styled answers are also flattering
  and longer); the encoder's span max looks at single tokens, so the direction should too.
- ``contrastive``: each text is run as an assistant reply to a neutral prompt (the same chat
  template as the pairs, so the residuals are in-distribution); a text is the mean of its tokens,
  a class the mean of its texts (long texts do not outweigh short ones).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prefsculpt.concepts.config import NamedConceptConfig
from prefsculpt.concepts.diskrows import take_rows
from prefsculpt.concepts.encoder import NamedDirections
from prefsculpt.core.errors import UserError
from prefsculpt.models.hooks import truncated_forward

log = logging.getLogger(__name__)

KINDS = ("regex", "contrastive")
#: The user turn a contrastive text answers; neutral so the text itself carries the concept.
NEUTRAL_PROMPT = "Please reply."
#: Token rows per class (matching / not matching a regex) read to fit a regex concept's direction.
MAX_CLASS_ROWS = 65_536


class NamedConceptError(UserError):
    """A named concept cannot be built; the message names it and says what to change."""


class UnmatchedConceptError(NamedConceptError):
    """A regex concept matches no training response (skipped instead when ``required: false``)."""


@dataclass
class NamedConcept:
    name: str
    kind: str
    vector: torch.Tensor  # (d,) unit norm
    bias: float
    #: Most aligned SAE latents and their cosine with v (descending); empty without an SAE.
    top_latents: list[int] = field(default_factory=list)
    top_cosines: list[float] = field(default_factory=list)
    #: Balanced accuracy of relu(h·v − b) > 0 on the examples it was built from.
    separation: float = float("nan")
    n_positive: int = 0
    n_negative: int = 0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "bias": self.bias, "top_latents": self.top_latents,
                "top_cosines": self.top_cosines, "separation": self.separation,
                "n_positive": self.n_positive, "n_negative": self.n_negative}


# ---------------------------------------------------------------- pure pieces


def mean_difference_direction(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Unit v ∝ mean(pos) − mean(neg), b = midpoint of the class means' projections, balanced accuracy.

    pos: (P, d), neg: (Q, d) rows of one class each. Returns (v (d,), b, balanced accuracy).
    """
    mu_p, mu_n = pos.double().mean(0), neg.double().mean(0)  # (d,)
    diff = mu_p - mu_n
    norm = diff.norm()
    if not torch.isfinite(norm) or norm < 1e-12:
        raise NamedConceptError("the two classes have the same mean activation; their examples do not differ")
    v = diff / norm
    b = float(0.5 * (mu_p @ v + mu_n @ v))
    acc = 0.5 * (float((pos.double() @ v > b).float().mean()) + float((neg.double() @ v <= b).float().mean()))
    return v.float(), b, acc


def aligned_latents(v: torch.Tensor, w_dec: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """The ``n`` SAE latents whose decoder rows have the highest cosine with v. w_dec: (d_sae, d)."""
    w = w_dec.detach().float()
    cos = (w @ v.float()) / (w.norm(dim=1).clamp_min(1e-12) * v.norm().clamp_min(1e-12))  # (d_sae,)
    top = cos.topk(min(n, cos.numel()))
    return top.indices.tolist(), [float(c) for c in top.values]


def regex_token_labels(text: str, offsets: Sequence[tuple[int, int]], pattern: re.Pattern[str]) -> np.ndarray:
    """(T,) bool: token t's characters [start, end) overlap some match of ``pattern`` in ``text``."""
    spans = [m.span() for m in pattern.finditer(text) if m.end() > m.start()]
    out = np.zeros(len(offsets), dtype=bool)
    for t, (a, e) in enumerate(offsets):
        out[t] = any(a < me and ms < e for ms, me in spans)
    return out


def compile_pattern(concept: NamedConceptConfig) -> re.Pattern[str]:
    if not concept.pattern:
        raise NamedConceptError(f"named concept {concept.name!r} (kind regex) has no pattern: set pattern: '<regex>'")
    try:
        return re.compile(str(concept.pattern))
    except re.error as exc:
        raise NamedConceptError(f"named concept {concept.name!r}: invalid regex {concept.pattern!r} ({exc})") from exc


def validate_concepts(concepts: Sequence[NamedConceptConfig]) -> None:
    """Every problem a config can have, found before any model runs."""
    seen: set[str] = set()
    for c in concepts:
        if not c.name:
            raise NamedConceptError(f"a named concept has no name ({c!r}); give each a unique name")
        if c.name in seen:
            raise NamedConceptError(f"named concept {c.name!r} is defined twice; names must be unique")
        seen.add(c.name)
        if c.kind not in KINDS:
            raise NamedConceptError(f"named concept {c.name!r}: unknown kind {c.kind!r}; use one of {KINDS}")
        if c.kind == "regex":
            compile_pattern(c)
        elif not c.positive or not c.negative:
            raise NamedConceptError(
                f"named concept {c.name!r} (kind contrastive) needs texts in both positive and negative "
                f"(got {len(c.positive)} and {len(c.negative)})"
            )


# ---------------------------------------------------------------- from data


def _response_offsets(tokenizer: Any, texts: list[str]) -> list[list[tuple[int, int]]]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [list(map(tuple, o)) for o in enc["offset_mapping"]]


def regex_classes(
    concept: NamedConceptConfig, cache: Any, pairs: Sequence[Any], pair_rows: Sequence[int], tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(positive token activations (P, d), negative (Q, d), matching responses) over ``pair_rows``.

    ``pairs[i]`` holds the texts of ``cache`` pair i; rows of a pair are prompt, chosen, rejected in
    order (``ActivationCache``). Response tokens follow the text's own tokenisation (tokenize_pairs
    encodes responses alone), cut where the cache's response is shorter (truncation, end token).
    """
    pattern = compile_pattern(concept)
    off = cache.offsets()
    span = cache.span
    pos_rows: list[np.ndarray] = []
    neg_rows: list[np.ndarray] = []
    n_match = 0
    eos = getattr(tokenizer, "eos_token_id", None)
    for side, sid in (("chosen", 1), ("rejected", 2)):
        texts = [getattr(pairs[i], side) for i in pair_rows]
        for i, text, offsets in zip(pair_rows, texts, _response_offsets(tokenizer, texts), strict=True):
            a, e = int(off[i]), int(off[i + 1])
            rows = a + np.flatnonzero(span[a:e].numpy() == sid)  # this response's rows, in order
            if len(rows) and eos is not None and int(cache.token_id[rows[-1]]) == eos:
                rows = rows[:-1]  # the appended end-of-turn token is not part of the text
            labels = regex_token_labels(text, offsets, pattern)
            n = min(len(rows), len(labels))  # a truncated response keeps its first tokens
            rows, labels = rows[:n], labels[:n]
            if labels.any():
                n_match += 1
                pos_rows.append(rows[labels])
            else:
                neg_rows.append(rows)
    if not n_match:
        raise UnmatchedConceptError(
            f"named concept {concept.name!r}: pattern {concept.pattern!r} matches none of the {2 * len(pair_rows)} "
            "training responses; fix the pattern, remove the concept from named_concepts, or set "
            "required: false on it to skip it on data that lacks it"
        )
    if not neg_rows:
        raise NamedConceptError(
            f"named concept {concept.name!r}: pattern {concept.pattern!r} matches every training response, so "
            "there is nothing to contrast it with; make the pattern more specific"
        )
    if n_match < 5:
        log.warning("named concept %r matches only %d responses: its direction is noisy", concept.name, n_match)
    pos, neg = np.concatenate(pos_rows), np.concatenate(neg_rows)
    # a uniform sample of at most MAX_CLASS_ROWS per class: the class means (and so the direction)
    # are estimated as well from 65k tokens, and memory stays bounded on large data
    return (take_rows(cache.acts, pos, MAX_CLASS_ROWS, 0), take_rows(cache.acts, neg, MAX_CLASS_ROWS, 1),
            n_match)


@torch.no_grad()
def text_means(model: Any, tokenizer: Any, texts: Sequence[str], layer: int) -> torch.Tensor:
    """(n, d): per text, the mean layer-ℓ residual over its tokens as an assistant reply."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": NEUTRAL_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if any(len(r) == 0 for r in r_ids):
        raise NamedConceptError("a contrastive example text is empty")
    t_max = len(p_ids) + max(len(r) for r in r_ids)
    ids = torch.full((len(texts), t_max), int(tokenizer.pad_token_id or 0), dtype=torch.long)
    mask = torch.zeros((len(texts), t_max), dtype=torch.long)
    for b, r in enumerate(r_ids):
        ids[b, : len(p_ids) + len(r)] = torch.tensor(p_ids + r)
        mask[b, : len(p_ids) + len(r)] = 1
    dev = next(model.parameters()).device
    h = truncated_forward(model, ids.to(dev), mask.to(dev), layer).float().cpu()  # (n, T, d)
    resp = torch.zeros_like(mask, dtype=torch.bool)
    for b, r in enumerate(r_ids):
        resp[b, len(p_ids) : len(p_ids) + len(r)] = True
    w = resp.float().unsqueeze(-1)  # (n, T, 1)
    return (h * w).sum(1) / w.sum(1)  # (n, d)


def build_named_concepts(
    concepts: Sequence[NamedConceptConfig],
    *,
    cache: Any,
    pairs: Sequence[Any],
    pair_rows: Sequence[int],
    tokenizer: Any,
    model: Any = None,
    layer: int | None = None,
    sae: Any = None,
) -> list[NamedConcept]:
    """Directions for every named concept: regex ones from ``cache`` rows of ``pair_rows`` (the
    training pairs), contrastive ones by running ``model`` to ``layer`` on their texts."""
    validate_concepts(concepts)
    out: list[NamedConcept] = []
    for c in concepts:
        try:
            if c.kind == "regex":
                pos, neg, _ = regex_classes(c, cache, pairs, pair_rows, tokenizer)
            else:
                if model is None or layer is None:
                    raise NamedConceptError(f"named concept {c.name!r} (contrastive) needs the model and layer")
                pos = text_means(model, tokenizer, list(c.positive), layer)
                neg = text_means(model, tokenizer, list(c.negative), layer)
            v, b, acc = mean_difference_direction(pos, neg)
        except UnmatchedConceptError as exc:
            if bool(getattr(c, "required", True)):
                raise
            log.warning("skipping %s", exc)
            continue
        except NamedConceptError as exc:
            if str(exc).startswith("named concept"):
                raise
            raise NamedConceptError(f"named concept {c.name!r}: {exc}") from exc
        top, cos = aligned_latents(v, sae.W_dec, c.top_latents) if sae is not None else ([], [])
        out.append(NamedConcept(c.name, c.kind, v, b, top, cos, acc, int(pos.shape[0]), int(neg.shape[0])))
        log.info("named concept %s (%s): separation %.2f on %d/%d examples; top latents %s",
                 c.name, c.kind, acc, pos.shape[0], neg.shape[0], top[:3])
    return out


def as_directions(concepts: Sequence[NamedConcept]) -> Any:
    """The encoder's ``NamedDirections`` (names, vectors (K, d), bias (K,)), or None when empty."""
    if not concepts:
        return None
    return NamedDirections(
        names=[c.name for c in concepts],
        vectors=torch.stack([c.vector for c in concepts]),
        bias=torch.tensor([c.bias for c in concepts], dtype=torch.float32),
    )
