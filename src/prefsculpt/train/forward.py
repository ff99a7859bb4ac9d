"""Forward passes that score responses only.

Three savings over a plain ``model(input_ids).logits`` (and over TRL 1.16 on CPU, which runs the
prompt twice and projects every position through the LM head):
- a pair is packed as ONE row ``[prompt, chosen, rejected]`` with a 4-D mask under which the
  rejected response sees the prompt and itself but not the chosen one, and position ids restart
  after the prompt: the prompt is computed once for both responses (chosen and rejected still go
  through one forward, as TRL's concatenated forward), exactly the two separate sequences' outputs;
- the (·, V) vocabulary projection runs only at positions whose next token is a response token:
  hidden states are gathered there *before* ``lm_head``;
- with ``start_layer > 0`` only decoder layers ``start_layer..`` run, from a cached trunk output.

Sequences are right-padded, so no attention mask is passed: under the causal mask a real token never
sees the pads after it, so its output is exact, and SDPA keeps its fast causal path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    """(B, T) long tensor of right-padded sequences."""
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def target_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions t whose next token t+1 is a response token, each (N,)."""
    nxt = response_mask[:, 1:].bool()  # (B, T-1)
    return nxt.nonzero(as_tuple=True)


def response_logps(
    hidden: torch.Tensor, lm_head: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
    chunk: int = 4096,
) -> torch.Tensor:
    """Summed log-probs of the response tokens, (B,).

    hidden: (B, T, d) final-normed states; input_ids, response_mask: (B, T). Only the N response
    positions are projected to the vocabulary, in chunks of ``chunk`` rows: (N, V) never (B, T, V).
    """
    rows, cols = target_index(response_mask)
    h = hidden[rows, cols]  # (N, d)
    tgt = input_ids[rows, cols + 1]  # (N,)
    parts = []
    for s in range(0, h.shape[0], chunk):
        logits = lm_head(h[s : s + chunk]).float()  # (n, V); fp32 logsumexp as TRL's selective_log_softmax
        parts.append(logits.gather(1, tgt[s : s + chunk, None]).squeeze(1) - torch.logsumexp(logits, dim=1))
    per_tok = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(hidden.shape[0], dtype=per_tok.dtype, device=hidden.device)
    return out.index_add(0, rows, per_tok)


def run_layers(model: Any, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Decoder layers ``start..`` and the final norm on a right-padded (B, T, d) residual."""
    base = model.model
    t = hidden.shape[1]
    pos = torch.arange(t, device=hidden.device).unsqueeze(0)  # (1, T)
    pe = base.rotary_emb(hidden, position_ids=pos)
    for layer in base.layers[start:]:
        out = layer(hidden, attention_mask=None, position_embeddings=pe, position_ids=pos)
        hidden = out[0] if isinstance(out, tuple) else out
    return base.norm(hidden)


def final_hidden(model: Any, input_ids: torch.Tensor | None = None, trunk: torch.Tensor | None = None,
                 start_layer: int = 0) -> torch.Tensor:
    """Final-normed hidden states (B, T, d): the whole backbone from ``input_ids``, or layers
    ``start_layer..`` from the cached ``trunk`` (the input of layer ``start_layer``)."""
    if trunk is not None and start_layer > 0:
        return run_layers(model, trunk.to(model.model.norm.weight.dtype), start_layer)
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


def sequence_logps(model: Any, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   trunk: torch.Tensor | None = None, start_layer: int = 0) -> torch.Tensor:
    """Summed response log-probs (B,) of a right-padded batch."""
    hidden = final_hidden(model, input_ids, trunk, start_layer)
    return response_logps(hidden, model.get_output_embeddings(), input_ids, response_mask)


# ---------------------------------------------------------------------------------------------
# Packed pairs: [prompt, chosen, rejected] per row.


def pack_pairs(pairs: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack B tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into B rows.

    Returns input_ids / position_ids (B, L), attention_mask (B, 1, L, L) bool (True = may attend),
    and the targets of the response tokens: ``rows``/``src`` (N,) where the hidden state that predicts
    each token sits, ``tgt`` (N,) the token, ``out`` (N,) its sequence index (pair b's chosen = b,
    rejected = B + b, the order of TRL's ``[chosen; rejected]`` batch).
    """
    b = len(pairs)
    lens = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    big = max(lens)
    ids = torch.full((b, big), pad_id, dtype=torch.long)
    pos = torch.zeros((b, big), dtype=torch.long)
    seg = torch.full((b, big), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 pad
    rows, src, tgt, out = [], [], [], []
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        ids[i, : lens[i]] = torch.as_tensor([*p.prompt_ids, *p.chosen_ids, *p.rejected_ids])
        pos[i, : lens[i]] = torch.cat([torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_r)])
        seg[i, : lens[i]] = torch.as_tensor([0] * n_p + [1] * n_c + [2] * n_r)
        # Token k of a response is predicted by the state before it: the prompt's last for k = 0.
        for first, n, o in ((n_p, n_c, i), (n_p + n_c, n_r, b + i)):
            srcs = [n_p - 1, *range(first, first + n - 1)] if n else []
            rows += [i] * n
            src += srcs
            tgt += list(ids[i, first : first + n].tolist())
            out += [o] * n
    idx = torch.arange(big)
    causal = idx[None, :] <= idx[:, None]  # (L, L): key j <= query i
    sq, sk = seg[:, :, None], seg[:, None, :]  # (B, L, 1), (B, 1, L)
    allowed = causal & (sk >= 0) & ((sk == 0) | (sk == sq))
    allowed |= torch.eye(big, dtype=torch.bool)  # pad queries attend to themselves (no empty rows)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": allowed[:, None],
            "rows": torch.as_tensor(rows, dtype=torch.long), "src": torch.as_tensor(src, dtype=torch.long),
            "tgt": torch.as_tensor(tgt, dtype=torch.long), "out": torch.as_tensor(out, dtype=torch.long)}


def packed_hidden(model: Any, batch: dict[str, torch.Tensor], trunk: torch.Tensor | None = None,
                  start_layer: int = 0) -> torch.Tensor:
    """Final-normed hidden states (B, L, d) of a packed batch (whole backbone, or layers
    ``start_layer..`` from the packed trunk)."""
    base = model.model
    mask = _mask_for(model, batch["attention_mask"])
    if trunk is not None and start_layer > 0:
        hidden = trunk.to(base.norm.weight.dtype)
        pos = batch["position_ids"]
        pe = base.rotary_emb(hidden, position_ids=pos)
        for layer in base.layers[start_layer:]:
            o = layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            hidden = o[0] if isinstance(o, tuple) else o
        return base.norm(hidden)
    return base(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                use_cache=False).last_hidden_state


def _mask_for(model: Any, mask: torch.Tensor) -> torch.Tensor:
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "eager":  # eager adds the mask to the scores
        dt = model.model.norm.weight.dtype
        return torch.zeros(mask.shape, dtype=dt).masked_fill(~mask, torch.finfo(dt).min)
    return mask


def packed_logps(model: Any, batch: dict[str, torch.Tensor], trunk: torch.Tensor | None = None,
                 start_layer: int = 0, chunk: int = 4096) -> torch.Tensor:
    """Summed response log-probs (2B,) ``[chosen_1..B; rejected_1..B]`` of a packed batch."""
    hidden = packed_hidden(model, batch, trunk, start_layer)
    h = hidden[batch["rows"], batch["src"]]  # (N, d): only response-predicting states reach the LM head
    head = model.get_output_embeddings()
    parts = []
    for s in range(0, h.shape[0], chunk):
        logits = head(h[s : s + chunk]).float()  # (n, V)
        t = batch["tgt"][s : s + chunk, None]
        parts.append(logits.gather(1, t).squeeze(1) - torch.logsumexp(logits, dim=1))
    per_tok = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    n_out = 2 * batch["input_ids"].shape[0]
    return torch.zeros(n_out, dtype=per_tok.dtype, device=hidden.device).index_add(0, batch["out"], per_tok)
