"""Row-major float32 matrices on disk, read in bounded pieces (activation caches larger than RAM).

The file is a safetensors file (readable by ``safetensors.torch.load_file``) whose one big tensor
is written row block by row block with ``os.pwrite`` as it is computed, and read back with
``os.preadv`` into fresh buffers. Plain reads, not ``mmap``: pages of a mapped file count in the
process's resident memory while mapped, reads only populate the kernel's page cache.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}
#: Rows read per system call when scanning (8192 rows x 576 x 4 B = 19 MB at SmolLM2's width).
READ_ROWS = 8192


class _File:
    """Owns a file path; deletes it when the last reader is gone if ``temporary``."""

    def __init__(self, path: Path, temporary: bool):
        self.path = path
        if temporary:
            weakref.finalize(self, _unlink, str(path))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class DiskRows:
    """A (n, d) float32 matrix stored row-major at byte ``offset`` of a file, or a row subset of one.

    Indexing with a bool mask or an index array gives another ``DiskRows`` (a view: nothing is
    read); :meth:`read` (or a slice ``rows[a:e]``) reads rows into a tensor.
    """

    def __init__(self, file: _File, offset: int, n_rows: int, d: int, index: np.ndarray | None = None):
        self.file, self.offset, self.n_file_rows, self.d = file, offset, n_rows, d
        self.index = index  # file rows of this view, or None for all of them

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.d)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __len__(self) -> int:
        return self.n_file_rows if self.index is None else len(self.index)

    def _file_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.index is None else self.index[rows]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.read(np.arange(*key.indices(len(self))))
        k = np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key)
        rows = np.flatnonzero(k) if k.dtype == bool else k.astype(np.int64)
        return DiskRows(self.file, self.offset, self.n_file_rows, self.d, self._file_rows(rows))

    def _pread(self, fd: int, first: int, count: int) -> np.ndarray:
        out = np.empty((count, self.d), dtype=np.float32)
        view, pos = memoryview(out).cast("B"), self.offset + first * self.d * 4
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise OSError(f"{self.file.path}: short read at row {first} (file truncated?); recollect activations")
            done += got
        return out

    def read(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """Rows ``rows`` of this view (all if None), in that order, as a (len(rows), d) float32 tensor."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        file_rows = self._file_rows(rows)
        out = np.empty((len(file_rows), self.d), dtype=np.float32)
        if len(file_rows) == 0:
            return torch.from_numpy(out)
        fd = os.open(self.file.path, os.O_RDONLY)
        try:
            if np.all(np.diff(file_rows) == 1):  # one contiguous run: a single read
                return torch.from_numpy(self._pread(fd, int(file_rows[0]), len(file_rows)))
            order = np.argsort(file_rows, kind="stable")
            sorted_rows = file_rows[order]
            i = 0
            while i < len(sorted_rows):  # windows of READ_ROWS file rows holding wanted rows
                lo = int(sorted_rows[i])
                j = int(np.searchsorted(sorted_rows, lo + READ_ROWS))
                hi = int(sorted_rows[j - 1]) + 1
                block = self._pread(fd, lo, hi - lo)
                out[order[i:j]] = block[sorted_rows[i:j] - lo]
                i = j
        finally:
            os.close(fd)
        return torch.from_numpy(out)

    def blocks(self, rows: int = READ_ROWS):
        """(start, (m, d) tensor) over this view's rows in order, ``rows`` at a time."""
        for a in range(0, len(self), rows):
            yield a, self.read(np.arange(a, min(a + rows, len(self))))


def read_slice(acts: Any, a: int, e: int) -> torch.Tensor:
    """Rows a:e of an in-memory tensor or a :class:`DiskRows`."""
    return acts[a:e]


def row_norms(acts: Any) -> torch.Tensor:
    """(N,) L2 norm of each row, reading a :class:`DiskRows` block by block."""
    if isinstance(acts, DiskRows):
        out = torch.empty(len(acts))
        for a, x in acts.blocks():
            out[a : a + len(x)] = x.norm(dim=1)
        return out
    return torch.as_tensor(acts).float().norm(dim=1)


def take_rows(acts: Any, rows: np.ndarray, cap: int | None = None, seed: int = 0) -> torch.Tensor:
    """Rows ``rows`` (ascending) of a tensor or :class:`DiskRows` as a float32 tensor; with ``cap``, a
    uniform sample of at most ``cap`` of them (seeded, kept in ascending order), so what is held in
    memory is bounded whatever the number of rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if cap is not None and len(rows) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=int(cap), replace=False))
    if isinstance(acts, DiskRows):
        return acts.read(rows)
    return torch.as_tensor(acts)[torch.from_numpy(rows)].float()


def open_safetensors_rows(path: str | os.PathLike, name: str) -> DiskRows:
    """The 2-D float32 tensor ``name`` of a safetensors file as :class:`DiskRows` (nothing read yet)."""
    path = Path(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    info = header.get(name)
    if info is None or info["dtype"] != "F32" or len(info["shape"]) != 2:
        raise ValueError(f"{path}: no 2-D float32 tensor {name!r}; recollect the activations")
    rows, d = info["shape"]
    return DiskRows(_File(path, False), 8 + n + info["data_offsets"][0], int(rows), int(d))


class SafetensorsRowWriter:
    """Writes a safetensors file whose tensor ``name`` (rows, d) float32 arrives row block by row block.

    The header and the small ``extra`` tensors are written first, to ``.<file>.tmp-<pid>``;
    :meth:`finish` renames it into place (a partial file is never at ``path``).
    """

    def __init__(self, path: str | os.PathLike, name: str, shape: tuple[int, int],
                 extra: Mapping[str, torch.Tensor], metadata: Mapping[str, str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        rows, d = shape
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        end = rows * d * 4
        header[name] = {"dtype": "F32", "shape": [rows, d], "data_offsets": [0, end]}
        blobs = []
        for key, t in extra.items():
            t = t.contiguous()
            raw = t.numpy().tobytes()
            header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [end, end + len(raw)]}
            blobs.append(raw)
            end += len(raw)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data buffer starts 8-byte aligned
        self.base, self.d, self.rows = 8 + len(text), d, rows
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(text)) + text, 0)
        pos = self.base + rows * d * 4
        for raw in blobs:
            os.pwrite(self.fd, raw, pos)
            pos += len(raw)
        os.ftruncate(self.fd, pos)

    def write_rows(self, first: int, block: np.ndarray) -> None:
        """Rows ``first .. first + len(block)`` ((m, d) float32)."""
        data = np.ascontiguousarray(block, dtype=np.float32)
        if data.shape[1:] != (self.d,) or first + len(data) > self.rows:
            raise ValueError(f"rows {first}+{len(data)} of width {data.shape[1:]} do not fit ({self.rows}, {self.d})")
        buf, pos = memoryview(data).cast("B"), self.base + first * self.d * 4
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], pos + done)

    def finish(self, keep_file: bool = True) -> DiskRows:
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)
        return DiskRows(_File(self.path, not keep_file), self.base, self.rows, self.d)

    def abort(self) -> None:
        """After :meth:`finish` a no-op; otherwise close and remove the temporary file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _unlink(str(self.tmp))
