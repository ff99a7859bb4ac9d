"""One device setting: what ``auto`` resolves to on this machine, and the GPU-only choices refused."""

import pytest
import torch

from prefsculpt.core import device as D
from prefsculpt.core.device import (
    bf16_autocast_fast,
    resolve_dtype,
    resolve_precision,
    select_device,
    to_device,
)
from prefsculpt.core.errors import UserError


def test_auto_on_a_machine_without_gpu_is_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(D, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    dev = select_device("auto")
    assert dev == torch.device("cpu")
    assert resolve_dtype("auto", dev) == "float32" and resolve_precision("auto", dev) == "32-true"
    assert resolve_dtype("bfloat16", dev) == "bfloat16" and resolve_precision("bf16-mixed", dev) == "bf16-mixed"
    with pytest.raises(UserError, match="no CUDA device"):
        select_device("cuda")
    with pytest.raises(UserError, match="model.dtype='half'"):
        resolve_dtype("half", dev)


def test_auto_on_a_bf16_gpu_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda")
    assert resolve_dtype("auto", gpu) == "bfloat16" and resolve_precision("auto", gpu) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4
    assert resolve_dtype("auto", gpu) == "float32" and resolve_precision("auto", gpu) == "32-true"


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse avx2 avx512f avx512bw", False),             # AVX-512 without BF16: emulated, stay fp32
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),   # Cooper Lake / Zen 4
    ("fpu avx512f amx_tile amx_bf16 amx_int8", True),     # Sapphire Rapids
])
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(monkeypatch, tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(D, "CPUINFO", info)
    monkeypatch.delenv(D.CPU_BF16_ENV, raising=False)
    D._detected_cpu_bf16.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert D.cpu_bf16_native() is native
        assert resolve_dtype("auto", cpu) == ("bfloat16" if native else "float32")
        assert resolve_precision("auto", cpu) == ("bf16-mixed" if native else "32-true")
        assert resolve_dtype("float32", cpu) == "float32"  # a named dtype is kept
        monkeypatch.setenv(D.CPU_BF16_ENV, "0")  # the override wins over the flags
        assert resolve_precision("auto", cpu) == "32-true"
    finally:
        D._detected_cpu_bf16.cache_clear()


def test_to_device_moves_tensors_only():
    batch = {"ids": torch.ones(2, dtype=torch.long), "name": "x"}
    assert to_device(batch, torch.device("cpu")) is batch
    meta = to_device(batch, torch.device("meta"))
    assert meta["ids"].device.type == "meta" and meta["name"] == "x"


def test_bf16_autocast_only_where_bf16_is_fast(monkeypatch):
    """On an AVX2-only CPU bf16 matmuls are emulated (an SAE-sized one: 38 s against 0.6 s in fp32)."""
    cpu = torch.device("cpu")
    assert isinstance(D.cpu_bf16_native(), bool)  # the real probe answers on this machine
    monkeypatch.setattr(D, "cpu_bf16_native", lambda: False)
    assert not bf16_autocast_fast(cpu)
    monkeypatch.setattr(D, "cpu_bf16_native", lambda: True)
    assert bf16_autocast_fast(cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not bf16_autocast_fast(torch.device("cuda"))
