"""A policy stored as what training changed: the trained parameters against a reference to the base.

Training updates only the top ``train.train_top_layers`` decoder layers (and the final norm); the
rest of a policy is the frozen base, byte for byte. A *delta* keeps just the trained tensors:

    delta.safetensors   the trained parameters (those with ``requires_grad``, plus any other that
                        differs from the base), in the dtype they were trained in
    delta.json          manifest: the base's ``model.name_or_path`` and content fingerprint
                        (:func:`prefsculpt.core.files.model_fingerprint`), its tokenizer's
                        fingerprint, which layers and parameters, dtype, sizes, the tensors' sha256
                        and free-form ``extra`` (the tracking layer keeps the policy's provenance there)

:func:`assemble_policy` loads the base, verifies it is the one the delta was trained on (else
:class:`DeltaBaseMismatch` naming the expected and the found fingerprint), overwrites the trained
tensors and saves a plain Hugging Face folder: the same weights as the trained policy, so the same
logits. No MLflow here: logging a delta and resolving one from a run live in ``prefsculpt.tracking``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prefsculpt.core.errors import UserError
from prefsculpt.core.files import atomic_dir, file_sha256, model_fingerprint
from prefsculpt.models.loading import load_model, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT = "prefsculpt.policy-delta"
VERSION = 1
WEIGHTS = "delta.safetensors"
MANIFEST = "delta.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class DeltaError(UserError):
    """A delta folder that is missing, malformed or does not fit the model it is applied to."""


class DeltaBaseMismatch(DeltaError):
    """The base at hand is not the one the delta was trained on; the message names both."""


def is_delta_dir(folder: str | os.PathLike) -> bool:
    d = Path(folder)
    return (d / MANIFEST).is_file() and (d / WEIGHTS).is_file()


def find_delta_dir(root: str | os.PathLike) -> Path | None:
    """``root`` itself if it is a delta folder, else the shallowest one under it."""
    root = Path(root)
    if is_delta_dir(root):
        return root
    hits = sorted((p.parent for p in root.rglob(MANIFEST) if is_delta_dir(p.parent)), key=lambda p: len(p.parts))
    return hits[0] if hits else None


def _base_tensors(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> the base safetensors file holding it (sharded or not)."""
    where: dict[str, Path] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[k] = f
    return where


def changed_parameters(model: Any, base_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The parameters a policy changed: those with ``requires_grad`` (what ``freeze_below`` left
    trainable) and, when ``base_dir`` is given, any other whose tensor differs from the base's (a
    safeguard: nothing outside the trained layers should move, and if it did the delta still carries it).
    Tied parameters appear once, under their first name (as ``named_parameters`` lists them)."""
    params = dict(model.named_parameters())
    out = {n: p for n, p in params.items() if p.requires_grad}
    if base_dir is not None:
        where = _base_tensors(Path(base_dir))
        moved = []
        for f in sorted(set(where.values())):
            with safe_open(str(f), framework="pt") as st:
                for n, p in params.items():
                    if n in out or where.get(n) != f:
                        continue
                    ref = st.get_tensor(n)
                    if ref.shape != p.shape or not torch.equal(p.detach().cpu(), ref.to(p.dtype)):
                        out[n] = p
                        moved.append(n)
        if moved:
            log.warning("delta: %d frozen parameter(s) differ from the base and are kept too: %s", len(moved),
                        ", ".join(moved[:5]))
    return {n: p.detach().cpu().contiguous().clone() for n, p in out.items()}


def save_delta(model: Any, folder: str | os.PathLike, base_dir: str | os.PathLike, base_name: str,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``delta.safetensors`` + ``delta.json`` for ``model`` trained from ``base_dir`` into
    ``folder`` (the caller makes it atomic, e.g. with ``atomic_dir``); returns the manifest."""
    folder, base_dir = Path(folder), Path(base_dir)
    state = changed_parameters(model, base_dir)
    if not state:
        raise DeltaError("the model has no trained parameter and none differs from the base: nothing to store")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    layers = sorted({int(m.group(1)) for n in state if (m := _LAYER.search(n))})
    cfg = getattr(model, "config", None)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "base": {"name_or_path": base_name, "fingerprint": model_fingerprint(base_dir),
                 "architectures": list(getattr(cfg, "architectures", None) or []),
                 "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)},
        "tokenizer": {"source": "base", "fingerprint": tokenizer_fingerprint(base_dir)},
        "layers": layers,
        "others": sorted(n for n in state if not _LAYER.search(n)),
        "dtype": str(model.dtype).removeprefix("torch."), "tensor_dtypes": dtypes,
        "n_parameters": int(sum(t.numel() for t in state.values())),
        "n_base_parameters": int(sum(p.numel() for p in model.parameters())),
        "bytes": (folder / WEIGHTS).stat().st_size,
        "sha256": file_sha256(folder / WEIGHTS),
        "extra": json.loads(json.dumps(dict(extra or {}), default=str)),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not is_delta_dir(folder):
        raise DeltaError(f"{folder} is not a policy delta (it needs {MANIFEST} and {WEIGHTS})")
    man = json.loads((folder / MANIFEST).read_text())
    if man.get("format") != FORMAT or int(man.get("version", 0)) > VERSION:
        raise DeltaError(f"{folder / MANIFEST}: format {man.get('format')!r} v{man.get('version')} is not "
                         f"{FORMAT} v<={VERSION} (written by a newer prefsculpt?)")
    return man


def check_base(manifest: Mapping[str, Any], base_dir: str | os.PathLike, where: str = "the delta") -> None:
    """Raise :class:`DeltaBaseMismatch` unless ``base_dir`` is the base (weights, config and tokenizer)
    ``manifest`` was trained on; the message names the expected and the found fingerprints."""
    base = manifest["base"]
    found = model_fingerprint(base_dir)
    if found != base["fingerprint"]:
        raise DeltaBaseMismatch(
            f"{where} was trained on base {base.get('name_or_path')!r} with model fingerprint "
            f"{base['fingerprint']}, but the base found at {base_dir} has model fingerprint {found}: "
            "set model.name_or_path to the base the policy was trained on")
    tok = manifest.get("tokenizer", {}).get("fingerprint")
    found_tok = tokenizer_fingerprint(base_dir)
    if tok and found_tok != tok:
        raise DeltaBaseMismatch(f"{where} expects the tokenizer of base {base.get('name_or_path')!r} with "
                                f"fingerprint {tok}, but the base found at {base_dir} has tokenizer fingerprint "
                                f"{found_tok}")


def load_delta(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trained tensors, manifest); the tensors' sha256 must match the manifest."""
    folder = Path(folder)
    man = read_manifest(folder)
    digest = file_sha256(folder / WEIGHTS)
    if man.get("sha256") and digest != man["sha256"]:
        raise DeltaError(f"{folder / WEIGHTS} has sha256 {digest}, its manifest says {man['sha256']}: "
                         "the delta is corrupt or was modified")
    return load_file(str(folder / WEIGHTS)), man


def apply_delta(model: Any, state: Mapping[str, torch.Tensor]) -> Any:
    """Overwrite ``model``'s parameters named in ``state`` (in place; returns ``model``). Every name
    must be one of the model's, with the same shape."""
    own = model.state_dict()
    unknown = [n for n in state if n not in own]
    if unknown:
        raise DeltaError(f"the delta names {len(unknown)} parameter(s) the base model lacks, e.g. {unknown[:3]}: "
                         "it was trained on a different architecture")
    bad = [f"{n} {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in state.items() if t.shape != own[n].shape]
    if bad:
        raise DeltaError(f"the delta's shapes differ from the base model's: {bad[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t.to(own[n].dtype))
    return model


def assemble_policy(delta_dir: str | os.PathLike, base_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Base + delta as a plain Hugging Face folder at ``target`` (atomic: a reader never sees half a
    folder; a concurrent identical assembly keeps the first). Verifies the base first."""
    delta_dir, target = Path(delta_dir), Path(target)
    man = read_manifest(delta_dir)
    check_base(man, base_dir, where=f"the policy delta at {delta_dir}")
    state, _ = load_delta(delta_dir)
    model = load_model(base_dir, man.get("dtype") or "float32").eval()
    apply_delta(model, state)
    with atomic_dir(target, is_complete=lambda p: (p / "config.json").is_file()) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(base_dir).save_pretrained(str(tmp))
        (tmp / "prefsculpt_delta.json").write_text(json.dumps(man, indent=2, sort_keys=True))
    log.info("policy assembled from base %s + delta %s (%d trained parameters) at %s",
             man["base"].get("name_or_path"), delta_dir, man.get("n_parameters", 0), target)
    return target
