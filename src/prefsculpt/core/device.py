"""One device setting for every stage: ``auto`` picks cuda, then mps, then cpu."""

from __future__ import annotations

from typing import Literal

import torch

from prefsculpt.core.errors import UserError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]


def select_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``; an explicit device that is not available is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r}, but no CUDA device is visible; use device=auto or device=cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device={name!r}, but MPS is not available; use device=auto or device=cpu")
    return dev


def accelerator(device: torch.device) -> str:
    """Lightning's ``accelerator`` name for a torch device."""
    return {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
