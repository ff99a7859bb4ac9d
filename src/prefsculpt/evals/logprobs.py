"""Log-probabilities of candidate responses given a chat prompt, computing each prompt once.

An item is a prompt and K candidate responses (K = 1 for plain scoring). It runs as ONE packed
sequence ``[prompt | r_1 | ... | r_K | pad]``: response k attends to the prompt and to its own
earlier tokens only, and takes positions ``len(prompt) ..`` exactly as in ``prompt + r_k`` (the
same trick as ``concepts.activations.pack_pairs``, generalised to K), so its log-prob equals that
of the separate sequence ``prompt + r_k`` while the (long) prompt is computed once. Only positions
that predict a response token are projected to the vocabulary (never a (B, T, V) tensor).

Prompts go through the tokenizer's chat template (``data.tokenize.ensure_chat_template``); a
``response_prefix`` (e.g. ``"Therefore, the best answer is: ("``) is the start of the assistant
turn shared by all candidates. Responses are tokenised on their own and appended, as
``data.tokenize.tokenize_pairs`` does, and carry no end-of-turn token (they are continuations).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prefsculpt.concepts.activations import length_buckets
from prefsculpt.core.device import model_device, to_device
from prefsculpt.core.progress import track
from prefsculpt.models.hooks import _mask_for_backend
from prefsculpt.models.loading import ensure_chat_template

Prompt = str | Sequence[dict[str, str]]
PAD_SEG = -1


def prompt_ids(tok: Any, prompt: Prompt, response_prefix: str = "", max_tokens: int | None = None) -> list[int]:
    """Chat-templated prompt ids ending with the assistant header (+ ``response_prefix``); longer
    prompts keep their last ``max_tokens`` tokens (the question is usually last)."""
    ensure_chat_template(tok)
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + response_prefix
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:] if max_tokens else ids


def response_ids(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    return tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []


@dataclass(frozen=True)
class ChoiceItem:
    prompt_ids: list[int]
    choice_ids: list[list[int]]  # K candidate continuations, each non-empty

    def __len__(self) -> int:
        return len(self.prompt_ids) + sum(len(c) for c in self.choice_ids)


def pack_choices(items: Sequence[ChoiceItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded packed batch.

    input_ids, position_ids, segment: (B, T) (segment 0 = prompt, k+1 = choice k, -1 = pad);
    rows, cols, targets, flat: (N,) for the N response tokens: the position ``cols`` of row
    ``rows`` predicts token ``targets``, which belongs to candidate ``flat`` (index into all
    candidates of the batch, item-major).
    """
    t_max = max(len(it) for it in items)
    ids = torch.full((len(items), t_max), pad_id, dtype=torch.long)
    pos = torch.zeros((len(items), t_max), dtype=torch.long)
    seg = torch.full((len(items), t_max), PAD_SEG, dtype=torch.int16)
    rows, cols, tgts, flat = [], [], [], []
    k_flat = 0
    for b, it in enumerate(items):
        n_p = len(it.prompt_ids)
        if n_p == 0:
            raise ValueError("an empty prompt cannot be scored")
        ids[b, :n_p] = torch.tensor(it.prompt_ids)
        pos[b, :n_p] = torch.arange(n_p)
        seg[b, :n_p] = 0
        off = n_p
        for k, c in enumerate(it.choice_ids):
            n_c = len(c)
            if n_c == 0:
                raise ValueError("an empty candidate response cannot be scored")
            ids[b, off : off + n_c] = torch.tensor(c)
            pos[b, off : off + n_c] = torch.arange(n_p, n_p + n_c)  # restart after the prompt
            seg[b, off : off + n_c] = k + 1
            # token j of the candidate is predicted by the prompt's last position (j = 0), else by j - 1
            pred = [n_p - 1, *range(off, off + n_c - 1)]
            rows += [b] * n_c
            cols += pred
            tgts += c
            flat += [k_flat] * n_c
            off += n_c
            k_flat += 1
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": ids, "position_ids": pos, "segment": seg, "rows": as_long(rows), "cols": as_long(cols),
            "targets": as_long(tgts), "flat": as_long(flat), "n_candidates": torch.tensor(k_flat)}


def choice_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, T) segments -> (B, 1, T, T) bool, True where query t may attend to key s: causal, and a
    candidate sees the prompt and itself only; pads attend only to themselves (no empty row)."""
    t = segment.shape[1]
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=segment.device)
    allowed = causal & ((k == 0) | (k == q)) & (q != PAD_SEG) & (k != PAD_SEG)
    return (allowed | ((q == PAD_SEG) & eye)).unsqueeze(1)


def _final_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    base = model.model
    mask = _mask_for_backend(model, choice_attention_mask(batch["segment"]), base.embed_tokens.weight.dtype)
    out = base(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state  # (B, T, d), after the final norm


def iter_response_logits(
    model: Any, items: Sequence[ChoiceItem], pad_id: int, batch_tokens: int = 4096, chunk: int = 2048
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
    """Per length-bucketed batch: (item indices, packed batch, fp32 logits (N, V) of its response
    tokens, on the model's device; the batch stays on the CPU). Deterministic in ``items`` and
    ``batch_tokens``, so two models can be walked in step."""
    lengths = [len(it) for it in items]
    head = model.get_output_embeddings()
    dev = model_device(model)
    for idx in length_buckets(lengths, range(len(items)), batch_tokens):
        batch = pack_choices([items[i] for i in idx], pad_id)
        on = to_device(batch, dev)
        with torch.no_grad():
            h = _final_hidden(model, on)[on["rows"], on["cols"]]  # (N, d)
            logits = torch.cat([head(h[s : s + chunk]).float() for s in range(0, h.shape[0], chunk)])  # (N, V)
        yield idx, batch, logits


def score_choices(
    model: Any, items: Sequence[ChoiceItem], pad_id: int, batch_tokens: int = 4096
) -> list[np.ndarray]:
    """Summed log-prob of each candidate: a list (one per item) of (K_i,) float64 arrays."""
    out: list[np.ndarray | None] = [None] * len(items)
    for idx, batch, logits in track(iter_response_logits(model, items, pad_id, batch_tokens), "scoring", "items",
                                    total=len(items), size=lambda step: len(step[0])):
        tgt = batch["targets"].to(logits.device)[:, None]
        tok_lp = (logits.gather(1, tgt).squeeze(1) - torch.logsumexp(logits, dim=1)).cpu()  # (N,)
        per = torch.zeros(int(batch["n_candidates"]), dtype=torch.float64).index_add(0, batch["flat"], tok_lp.double())
        start = 0
        for i in idx:
            k = len(items[i].choice_ids)
            out[i] = per[start : start + k].numpy()
            start += k
    return out  # type: ignore[return-value]


def build_items(
    tok: Any, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]], response_prefix: str = "",
    max_prompt_tokens: int | None = None,
) -> list[ChoiceItem]:
    """Tokenise prompts (chat template) and their candidate responses."""
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} candidate lists")
    flat = [c for cs in choices for c in cs]
    ids = iter(response_ids(tok, flat))
    return [
        ChoiceItem(prompt_ids(tok, p, response_prefix, max_prompt_tokens), [next(ids) for _ in cs])
        for p, cs in zip(prompts, choices, strict=True)
    ]


def normalised_share(logps: np.ndarray, target: int = 0) -> float:
    """Probability mass on candidate ``target`` renormalised over the K candidates (softmax of logps)."""
    lp = np.asarray(logps, dtype=np.float64)
    z = lp - lp.max()
    return float(np.exp(z[target]) / np.exp(z).sum())
