"""Forward passes that score responses only.

Two savings over a plain ``model(input_ids).logits`` (and over TRL 1.16 on CPU, which projects every
position through the LM head):
- the (·, V) vocabulary projection runs only at positions whose next token is a response token:
  hidden states are gathered there *before* ``lm_head``;
- with ``start_layer > 0`` only decoder layers ``start_layer..`` run, from a cached trunk output.

Sequences are right-padded, so no attention mask is passed: under the causal mask a real token never
sees the pads after it, so its output is exact, and SDPA keeps its fast causal path.
"""

from __future__ import annotations

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
