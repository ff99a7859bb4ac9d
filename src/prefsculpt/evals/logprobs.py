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

import contextlib
import contextvars
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prefsculpt.concepts.activations import length_buckets
from prefsculpt.core.device import model_device, to_device
from prefsculpt.core.files import atomic_path
from prefsculpt.core.progress import track
from prefsculpt.models.hooks import _mask_for_backend, truncated_forward
from prefsculpt.models.loading import ensure_chat_template

log = logging.getLogger(__name__)

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


def _final_hidden(model: Any, batch: dict[str, torch.Tensor], trunk: torch.Tensor | None = None,
                  start: int = 0) -> torch.Tensor:
    """(B, T, d) after the final norm: the whole backbone, or layers ``start..`` from ``trunk`` (the
    input of layer ``start``, computed by a model whose layers below ``start`` are this one's)."""
    base = model.model
    mask = _mask_for_backend(model, choice_attention_mask(batch["segment"]), base.embed_tokens.weight.dtype)
    if trunk is None:
        out = base(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                   use_cache=False)
        return out.last_hidden_state
    hidden, pos = trunk.to(base.norm.weight.dtype), batch["position_ids"]
    pe = base.rotary_emb(hidden, position_ids=pos)
    for layer in base.layers[start:]:
        o = layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        hidden = o[0] if isinstance(o, tuple) else o
    return base.norm(hidden)


@dataclass
class SharedTrunk:
    """Scoring a policy that differs from the base only in its layers ``start..`` (and the final norm),
    e.g. one trained on the top layers: the input of layer ``start`` is the base's, computed once per
    item set and kept on disk (``<dir>/<key>.safetensors``, keyed by the base's digest, the items and
    the batching), so each further policy runs only its top layers. ``policy`` is the model this
    applies to (and ``also``: the base itself, whose own scoring then reuses the trunk); ``base``
    loads the base model when a trunk must be computed."""

    policy: Any
    start: int
    base: Callable[[], Any]
    base_digest: str
    dir: Path
    also: tuple[Any, ...] = ()

    def covers(self, model: Any) -> bool:
        return model is self.policy or any(model is m for m in self.also)

    def key(self, items: Sequence[ChoiceItem], batch_tokens: int) -> str:
        h = hashlib.sha256(json.dumps({"base": self.base_digest, "start": self.start, "batch_tokens": batch_tokens,
                                       "v": 1}).encode())
        for it in items:
            h.update(json.dumps([it.prompt_ids, it.choice_ids]).encode())
        return h.hexdigest()[:32]

    def load_or_compute(self, items: Sequence[ChoiceItem], batches: list[list[int]], pad_id: int,
                        batch_tokens: int) -> list[torch.Tensor]:
        path = self.dir / f"{self.key(items, batch_tokens)}.safetensors"
        if path.exists():
            try:
                got = load_file(str(path))
                return [got[f"b{j}"] for j in range(len(batches))]
            except Exception as exc:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
                log.warning("eval trunk cache %s unreadable (%s: %s); recomputing it", path, type(exc).__name__, exc)
        model = self.base()
        dev = model_device(model)
        out = []
        for idx in track(batches, "trunk (base, once)", "batches", total=len(batches)):
            batch = to_device(pack_choices([items[i] for i in idx], pad_id), dev)
            with torch.no_grad():
                out.append(truncated_forward(model, batch["input_ids"], choice_attention_mask(batch["segment"]),
                                             self.start - 1, batch["position_ids"]).float().cpu())
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({f"b{j}": t.contiguous() for j, t in enumerate(out)}, str(tmp))
        return out


_SHARED: contextvars.ContextVar[SharedTrunk | None] = contextvars.ContextVar("prefsculpt_shared_trunk", default=None)


@contextlib.contextmanager
def shared_trunk(src: SharedTrunk | None) -> Iterator[None]:
    """Inside: scoring ``src.policy`` runs from the cached base trunk (no-op for None or start 0)."""
    token = _SHARED.set(src if src is not None and src.start > 0 else None)
    try:
        yield
    finally:
        _SHARED.reset(token)


def first_changed_layer(policy: Any, base: Any) -> int:
    """The first decoder layer whose weights differ between ``policy`` and ``base`` (their number when
    only the final norm or head differ); 0 when the embeddings differ or the shapes do not match."""
    pe, be = policy.get_input_embeddings().weight, base.get_input_embeddings().weight
    if pe.shape != be.shape or not torch.equal(pe.detach().cpu(), be.detach().cpu()):
        return 0
    layers_p, layers_b = policy.model.layers, base.model.layers
    if len(layers_p) != len(layers_b):
        return 0
    for i, (lp, lb) in enumerate(zip(layers_p, layers_b, strict=True)):
        sp, sb = lp.state_dict(), lb.state_dict()
        if sp.keys() != sb.keys() or any(not torch.equal(sp[k].detach().cpu(), sb[k].detach().cpu()) for k in sp):
            return i
    return len(layers_p)


def _plan(model: Any, items: Sequence[ChoiceItem], pad_id: int,
          batch_tokens: int) -> tuple[list[list[int]], list[torch.Tensor] | None, int]:
    """The length-bucketed batches, and the shared trunk of each (loaded or computed now) with the layer
    it enters at when a ``shared_trunk`` covers ``model`` (else None, 0)."""
    batches = length_buckets([len(it) for it in items], range(len(items)), batch_tokens)
    src = _SHARED.get()
    if src is None or not src.covers(model):
        return batches, None, 0
    return batches, src.load_or_compute(items, batches, pad_id, batch_tokens), src.start


def iter_response_logits(
    model: Any, items: Sequence[ChoiceItem], pad_id: int, batch_tokens: int = 4096, chunk: int = 2048,
    plan: tuple[list[list[int]], list[torch.Tensor] | None, int] | None = None,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
    """Per length-bucketed batch: (item indices, packed batch, fp32 logits (N, V) of its response
    tokens, on the model's device; the batch stays on the CPU). Deterministic in ``items`` and
    ``batch_tokens``, so two models can be walked in step."""
    batches, trunks, start = plan if plan is not None else _plan(model, items, pad_id, batch_tokens)
    head = model.get_output_embeddings()
    dev = model_device(model)
    for j, idx in enumerate(batches):
        batch = pack_choices([items[i] for i in idx], pad_id)
        on = to_device(batch, dev)
        with torch.no_grad():
            hidden = _final_hidden(model, on, None if trunks is None else trunks[j].to(dev), start)
            h = hidden[on["rows"], on["cols"]]  # (N, d)
            logits = torch.cat([head(h[s : s + chunk]).float() for s in range(0, h.shape[0], chunk)])  # (N, V)
        yield idx, batch, logits


def score_choices(
    model: Any, items: Sequence[ChoiceItem], pad_id: int, batch_tokens: int = 4096
) -> list[np.ndarray]:
    """Summed log-prob of each candidate: a list (one per item) of (K_i,) float64 arrays."""
    out: list[np.ndarray | None] = [None] * len(items)
    plan = _plan(model, items, pad_id, batch_tokens)  # a shared trunk is computed before the scoring clock starts
    for idx, batch, logits in track(iter_response_logits(model, items, pad_id, batch_tokens, plan=plan), "scoring",
                                    "items", total=len(items), size=lambda step: len(step[0])):
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
