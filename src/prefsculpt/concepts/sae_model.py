"""A loaded SAE connected to its model: which layer it reads, whether it fits, how it encodes.

Published SAEs (Gemma Scope, Llama Scope) name their hook TransformerLens-style in
``sae.cfg.metadata.hook_name``: ``blocks.N.hook_resid_post`` is the output of decoder layer N, which
prefsculpt takes with a forward hook on ``model.model.layers[N]`` (``models.hooks``); for inner layers
that equals ``hidden_states[N + 1]``, but the last entry of ``hidden_states`` is the final norm's
output, so an index into ``hidden_states`` would be wrong there. HF-style names (``model.layers.N``,
what our own trained SAEs carry, and ``metadata.hf_hook_name`` that some loaders set) mean the same.

Normalisation belongs to the SAE: sae-lens' own ``encode`` applies the architecture's input
normalisation (``layer_norm``, ``constant_norm_rescale``), and ``from_pretrained`` folds a known
``expected_average_only_in`` scale into the weights. prefsculpt never rescales the residuals it hands
to a loaded SAE; an SAE whose scale was never folded cannot be used on raw residuals and is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from prefsculpt.concepts.sae import SAESourceError

log = logging.getLogger(__name__)

_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_HF_LAYER = re.compile(r"^(?:model\.)*layers\.(\d+)$")


def layer_of_hook(hook: str) -> int:
    """Decoder layer whose output ``hook`` names: ``blocks.N.hook_resid_post`` / ``model.layers.N`` -> N.

    ``blocks.N.hook_resid_pre`` (N >= 1) is the input of layer N, i.e. the output of layer N - 1.
    Any other hook (attention, MLP, embeddings) is not a residual prefsculpt can read: SAESourceError.
    """
    hook = str(hook).strip()
    for pattern, shift in ((_RESID_POST, 0), (_HF_LAYER, 0), (_RESID_PRE, -1)):
        m = pattern.match(hook)
        if m:
            layer = int(m.group(1)) + shift
            if layer < 0:
                break  # blocks.0.hook_resid_pre is the embedding output, no decoder layer's
            return layer
    raise SAESourceError(
        f"the SAE reads hook {hook!r}; prefsculpt reads the residual stream after a decoder layer only "
        "(blocks.N.hook_resid_post, blocks.N.hook_resid_pre with N >= 1, or model.layers.N): use an SAE "
        "trained on the residual stream"
    )


def sae_hook(metadata: Any) -> str | None:
    """The hook an SAE's metadata names: ``hf_hook_name`` when it is a layer path, else ``hook_name``."""
    get = metadata.get if isinstance(metadata, dict) else (lambda k: getattr(metadata, k, None))
    hf = get("hf_hook_name")
    if hf and _HF_LAYER.match(str(hf)):
        return str(hf)
    hook = get("hook_name")
    return str(hook) if hook else (str(hf) if hf else None)


def sae_layer(sae: Any) -> int | None:
    """The decoder layer a loaded SAE reads (None when its metadata names no hook)."""
    hook = sae_hook(sae.cfg.metadata)
    return layer_of_hook(hook) if hook else None


def sae_dir_layer(folder: str | Path) -> int | None:
    """The layer named in a saved SAE folder's ``cfg.json`` (None when absent or unnamed)."""
    cfg_file = Path(folder) / "cfg.json"
    if not cfg_file.is_file():
        return None
    hook = sae_hook(json.loads(cfg_file.read_text()).get("metadata") or {})
    return layer_of_hook(hook) if hook else None


def resolve_layer(requested: int | None, sae: Any, n_layers: int) -> int:
    """The layer to read: the SAE's own hook; ``sae.layer`` must agree with it when both are given.

    Without a hook in the metadata ``sae.layer`` is required. The result is checked against the
    model's ``n_layers`` decoder layers.
    """
    own = sae_layer(sae)
    hook = sae_hook(sae.cfg.metadata)
    if own is not None and requested is not None and int(requested) != own:
        raise SAESourceError(
            f"sae.layer={requested} but the SAE was trained at hook {hook!r} (decoder layer {own}): "
            f"drop sae.layer (the SAE's own hook is used) or set sae.layer={own}"
        )
    layer = own if own is not None else requested
    if layer is None:
        raise SAESourceError("the SAE's metadata names no hook (cfg.json metadata.hook_name): set sae.layer=<N>, "
                             "the decoder layer whose output it reads")
    if not 0 <= int(layer) < n_layers:
        raise SAESourceError(f"the SAE reads decoder layer {layer} ({hook or 'sae.layer'}), but the model has "
                             f"{n_layers} layers (0..{n_layers - 1}): it was trained for another model")
    return int(layer)


def _short(name: str) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1].lower()


def check_sae_fits(sae: Any, d_model: int, model_names: Iterable[str] = (), check_model: bool = True) -> None:
    """A loaded SAE must read residuals of this model's width, and name this model if it names one.

    ``model_names``: what this model is called (``model.name_or_path``, the folder, its fingerprint);
    compared with the SAE's ``metadata.model_name`` by last path component, case-insensitively
    (Gemma Scope says ``gemma-2-2b``, the hub ``google/gemma-2-2b``).
    """
    if int(sae.cfg.d_in) != int(d_model):
        raise SAESourceError(f"the SAE reads d_in={sae.cfg.d_in} but the model's residual width is {d_model}: "
                             "it was trained for another model")
    own = getattr(sae.cfg.metadata, "model_name", None)
    names = {_short(n) for n in model_names if n}
    if check_model and own and names and _short(own) not in names:
        raise SAESourceError(
            f"the SAE was trained on model {own!r}, but model.name_or_path is {sorted(names)}: load that model "
            f"(model.name_or_path={own}), or, if this is a copy of the same weights under another name, set "
            "sae.check_model=false"
        )
    check_normalisation(sae)


def check_normalisation(sae: Any) -> None:
    """Refuse an SAE expecting inputs scaled by a factor it does not carry (prefsculpt never guesses it)."""
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm == "expected_average_only_in":
        raise SAESourceError(
            "the SAE's cfg.json says normalize_activations=expected_average_only_in but its scale factor is not "
            "folded into the weights, so its codes on raw residuals would be wrong: fold it once with "
            "sae.fold_activation_norm_scaling_factor(<factor>) and sae.save_model(<folder>) (sae-lens' "
            "from_pretrained does this for published releases)"
        )
    if norm not in ("none", None):
        log.info("the SAE normalises its own inputs (%s); residuals are passed to it unscaled", norm)


def sae_codes(sae: Any, h: torch.Tensor) -> torch.Tensor:
    """sae-lens' own ``encode`` of residuals ``h`` (..., d_in) -> dense codes (..., d_sae).

    JumpReLU thresholds, TopK selection and the architecture's input normalisation all happen inside;
    a TopK SAE saved with ``use_sparse_activations`` returns a sparse tensor, densified here.
    """
    f = sae.encode(h.to(sae.W_enc.dtype))
    return f.to_dense() if f.is_sparse else f


def default_train_layer(n_layers: int) -> int:
    """The layer an SAE trained here reads when ``sae.layer`` is unset: the middle of the model."""
    return n_layers // 2


def concept_layer(requested: int | None, sae_path: str | Path | None, model_dir: str | Path) -> int:
    """The layer ℓ later stages use for concept directions, as the sae stage chose it.

    ``sae.layer`` when set (checked against the SAE at ``sae_path``, when given), else the hook of the
    SAE at ``sae_path``, else the model's middle layer (what an SAE trained here reads by default).
    """
    own = sae_dir_layer(sae_path) if sae_path and Path(sae_path).is_dir() else None
    if requested is not None:
        if own is not None and int(requested) != own:
            raise SAESourceError(f"sae.layer={requested} but the SAE at {sae_path} reads decoder layer {own}: "
                                 f"drop sae.layer or set sae.layer={own}")
        return int(requested)
    if own is not None:
        return own

    return default_train_layer(int(AutoConfig.from_pretrained(str(model_dir)).get_text_config().num_hidden_layers))
