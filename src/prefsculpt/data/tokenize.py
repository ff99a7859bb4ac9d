"""Tokenise pairs with the model's chat template; only response tokens are ever scored.

Each pair becomes ``prompt_ids`` (the chat-templated prompt, ending with the assistant header) and
``chosen_ids`` / ``rejected_ids`` (response tokens plus the end-of-turn token). A sequence is
``prompt_ids + response_ids`` and its response mask is 0 over the prompt and 1 over the response.
Truncation keeps the *end* of the prompt (the question is usually last) and the *start* of each
response (what the model would say first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefsculpt.data.schema import PreferencePair
from prefsculpt.models.loading import ensure_chat_template

TRUNCATION_POLICY = "prompt: keep the last max_prompt_tokens; responses: keep the first max_response_tokens"


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    chosen_truncated: bool
    rejected_truncated: bool

    def sequence(self, side: str) -> tuple[list[int], list[int]]:
        """``(input_ids, response_mask)`` for ``side`` in {"chosen", "rejected"}."""
        resp = self.chosen_ids if side == "chosen" else self.rejected_ids
        return self.prompt_ids + resp, [0] * len(self.prompt_ids) + [1] * len(resp)


def _end_ids(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
) -> list[TokenizedPair]:
    """Tokenise in batches (fast tokenizers parallelise internally)."""
    if max_prompt_tokens < 1 or max_response_tokens < 2:
        raise ValueError("data.tokenize.max_prompt_tokens must be >= 1 and max_response_tokens >= 2")
    if not pairs:
        return []
    ensure_chat_template(tokenizer)
    prompts = [
        tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False) for p in pairs
    ]
    enc = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, c_ids, r_ids = enc(prompts), enc(p.chosen for p in pairs), enc(p.rejected for p in pairs)
    end = _end_ids(tokenizer)
    body = max_response_tokens - len(end)
    out = []
    for pair, pi, ci, ri in zip(pairs, p_ids, c_ids, r_ids, strict=True):
        out.append(
            TokenizedPair(
                id=pair.id,
                prompt_ids=pi[-max_prompt_tokens:],
                chosen_ids=ci[:body] + end,
                rejected_ids=ri[:body] + end,
                prompt_truncated=len(pi) > max_prompt_tokens,
                chosen_truncated=len(ci) > body,
                rejected_truncated=len(ri) > body,
            )
        )
    return out


def token_stats(tokenized: Sequence[TokenizedPair]) -> dict[str, float]:
    """Length percentiles and truncation counts, flat for ``mlflow.log_metrics``."""
    stats: dict[str, float] = {"n_pairs": float(len(tokenized))}
    if not tokenized:
        return stats
    for part in ("prompt", "chosen", "rejected"):
        lens = np.array([len(getattr(t, f"{part}_ids")) for t in tokenized])
        stats[f"tokens_{part}_mean"] = float(lens.mean())
        stats[f"tokens_{part}_p50"] = float(np.percentile(lens, 50))
        stats[f"tokens_{part}_p95"] = float(np.percentile(lens, 95))
        stats[f"tokens_{part}_max"] = float(lens.max())
        stats[f"truncated_{part}"] = float(sum(getattr(t, f"{part}_truncated") for t in tokenized))
    stats["tokens_total"] = float(
        sum(len(t.prompt_ids) * 2 + len(t.chosen_ids) + len(t.rejected_ids) for t in tokenized)
    )
    return stats
