"""Residual-stream access at layer ℓ: a truncated forward pass and training-time hook contexts.

"Residual at ℓ" is always resid_post of decoder layer ``model.model.layers[ℓ]``, which equals
``hidden_states[ℓ + 1]`` of a full forward with ``output_hidden_states=True`` (STACK §2; the last
entry of ``hidden_states`` is after the final norm, so it is never used).

``truncated_forward`` runs the model's own ``model.model`` forward and stops it with an exception
raised from a forward hook on layer ℓ: the embeddings, mask construction and rotary embeddings are
the library's own (exact, and not tied to one architecture), and nothing above ℓ, no final norm
and no lm_head is computed. It also accepts a custom 4-D mask plus position ids, which the encoder
uses to run a prompt once for both responses of a pair (see ``prefsculpt.concepts.activations``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers``) or of its base model."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no .model.layers; residual hooks support llama-style decoder models"
        )
    return layers


def _check_layer(model: Any, layer: int) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"sae.layer={layer} is out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    return layers[layer]


def _hidden(out: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a Tensor; older ones (and some architectures) a tuple.
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out: Any, h: torch.Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


class _StopForward(Exception):
    """Raised from the layer-ℓ hook to end the forward pass there."""


def _mask_for_backend(model: Any, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D boolean mask (True = may attend) in the form the model's attention backend expects."""
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":  # eager adds the mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"a custom 4-D attention mask needs attn_implementation sdpa or eager, not {impl!r}")


def truncated_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """resid_post of decoder layer ``layer``, (B, T, d), computing nothing above it.

    input_ids: (B, T). attention_mask: (B, T) 0/1 padding mask (right padding), or a 4-D boolean
    mask (B, 1, T, T) with True = query may attend to key (then pass ``position_ids`` (B, T)).
    """
    target = _check_layer(model, layer)
    base = getattr(model, "model", model)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = _mask_for_backend(model, attention_mask.bool(), base.embed_tokens.weight.dtype)
    captured: list[torch.Tensor] = []

    def stop(_mod: Any, _args: Any, out: Any) -> None:
        captured.append(_hidden(out))
        raise _StopForward

    handle = target.register_forward_hook(stop)
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {layer} was never called; is it a llama-style decoder model?")
    return captured[0]


# ---------------------------------------------------------------------------------------------
# Pure residual edits (tensor in, tensor out), used by the hook contexts below.


def add_direction(h: torch.Tensor, vector: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """h + Σ_k scale_k · v_k. h: (..., d); vector: (d,) or (K, d); scale: scalar or (K,)."""
    v = vector.to(h.dtype)
    if v.dim() == 1:
        return h + torch.as_tensor(scale, dtype=h.dtype, device=h.device) * v
    s = torch.as_tensor(scale, dtype=h.dtype, device=h.device).expand(v.shape[0])  # (K,)
    return h + s @ v  # (d,) broadcast over (..., d)


def project_out(h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """h − (h Q) Qᵀ: remove the span of Q's orthonormal columns. h: (..., d); q: (d, k)."""
    q = q.to(h.dtype)
    return h - (h @ q) @ q.T


def _check_orthonormal(q: torch.Tensor, tol: float = 1e-4) -> None:
    gram = q.T.float() @ q.float()  # (k, k)
    if not torch.allclose(gram, torch.eye(q.shape[1], dtype=gram.dtype, device=gram.device), atol=tol):
        raise ValueError("project_out_residual needs Q (d, k) with orthonormal columns; orthonormalise it (torch.linalg.qr)")


# ---------------------------------------------------------------------------------------------
# Hook contexts on ``model.model.layers[layer]`` (removed on exit, also after an exception).


@contextmanager
def capture_residual(model: Any, layer: int, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """Yields a list that receives resid_post of ``layer``, (B, T, d), once per forward call."""
    store: list[torch.Tensor] = []

    def hook(_mod: Any, _args: Any, out: Any) -> None:
        h = _hidden(out)
        store.append(h.detach() if detach else h)

    handle = _check_layer(model, layer).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def add_to_residual(
    model: Any,
    layer: int,
    vector: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Add ``scale · vector`` to the residual after ``layer`` (steering, preventative steering).

    vector: (d,) or (K, d) (summed with per-direction ``scale`` (K,)). positions: optional (B, T)
    0/1 mask of the positions to edit; it must match the batch of every forward inside the context.
    """

    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        h = _hidden(out)
        new = add_direction(h, vector.to(h.device), scale)
        if positions is not None:
            new = torch.where(positions.to(h.device).bool().unsqueeze(-1), new, h)
        return _replace_hidden(out, new)

    handle = _check_layer(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def project_out_residual(model: Any, layer: int, q: torch.Tensor) -> Iterator[None]:
    """Project the orthonormal columns of ``q`` (d, k) out of the residual after ``layer`` (CAFT)."""
    _check_orthonormal(q)

    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        h = _hidden(out)
        return _replace_hidden(out, project_out(h, q.to(h.device)))

    handle = _check_layer(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
