"""One device setting for every stage: ``auto`` picks cuda, then mps, then cpu."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Literal

import torch

from prefsculpt.core.errors import UserError

#: Where weights are read first (host memory) before moving to the selected device.
HOST = "cpu"

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


def model_device(model: Any) -> torch.device:
    """The device a model's (first) parameters live on: where its inputs must go."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a batch dict on ``device`` (other values untouched); a no-op on the CPU."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


#: CPU features whose bf16 matrix kernels make bf16 faster than fp32 (oneDNN uses them): Intel
#: AVX512-BF16 (Cooper Lake and later) and AMX (Sapphire Rapids), AMD AVX512-BF16 (Zen 4).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
#: Overrides the detection: ``0`` = treat the CPU as without native bf16 (the test suite sets it,
#: so its figures do not depend on the CI machine's CPU), ``1`` = with.
CPU_BF16_ENV = "PREFSCULPT_CPU_BF16"


def cpu_bf16_native() -> bool:
    """The CPU has native bf16 arithmetic: a ``CPU_BF16_FLAGS`` flag in Linux's /proc/cpuinfo, or
    an Apple/Arm CPU reporting FEAT_BF16 (M2 and later). Without it, bf16 on the CPU is emulated:
    slower than fp32 and less precise, so ``auto`` keeps fp32. ``$PREFSCULPT_CPU_BF16`` overrides."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _detected_cpu_bf16()


@functools.cache
def _detected_cpu_bf16() -> bool:
    if CPUINFO.is_file():
        flags = {f for line in CPUINFO.read_text(errors="replace").splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
        return any(f in flags for f in CPU_BF16_FLAGS)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout
            return out.strip() == "1"
    return False


def bf16_ok(device: torch.device) -> bool:
    """bf16 kernels exist and are fast: CUDA with bf16 support (Ampere and later), or a CPU with
    native bf16 (``cpu_bf16_native``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_native()


def bf16_autocast_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on ``device``: where ``bf16_ok`` (a bf16 GPU, a CPU with native bf16).
    On an AVX2-only CPU bf16 matmuls are emulated: an SAE-sized one (4096x576 @ 576x4608) took 38 s
    under autocast against 0.6 s in fp32. Other devices (mps) are left to the setting."""
    return bf16_ok(device) if device.type in ("cuda", "cpu") else True


def resolve_dtype(name: str, device: torch.device) -> str:
    """``model.dtype``: ``auto`` = bfloat16 on a bf16-capable GPU or CPU (``bf16_ok``), else
    float32; others as given."""
    if name == "auto":
        return "bfloat16" if bf16_ok(device) else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"model.dtype={name!r}: use auto, float32, bfloat16 or float16")
    return name


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.precision``: ``auto`` = bf16-mixed on a bf16-capable GPU or CPU, else 32-true."""
    if name == "auto":
        return "bf16-mixed" if bf16_ok(device) else "32-true"
    return name


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` (the reference pass under a bf16 training precision)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
