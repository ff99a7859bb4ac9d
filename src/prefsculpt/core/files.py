"""Atomic writes and content digests: one implementation each, shared by every cache and store.

A reader never sees a half-written file or folder: everything is written under a temporary name
beside its target, then renamed into place (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

#: (resolved path, size, mtime_ns) -> sha256: weights are hashed once per process, not per stage.
_MEMO: dict[tuple[str, int, int], str] = {}
#: Temporary names start with this, so a later run can clean what a killed one left behind.
TMP_PREFIX = ".tmp-"
#: ``.tmp-<name>-<pid>.<host hash>-<8 hex>[suffix]``: the writer, so a cleaner can tell a dead one.
_OWNER = re.compile(r"-(\d+)\.([0-9a-f]{6})-[0-9a-f]{8}(?:\.[^/]*)?$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_beside(target: Path, suffix: str = "") -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}.{_host_tag()}-{uuid.uuid4().hex[:8]}{suffix}"


def _writer_dead(name: str) -> bool:
    """True when ``name`` was written by a process of this host that no longer exists."""
    m = _OWNER.search(name)
    if not m or m.group(2) != _host_tag():
        return False  # another machine's (shared cache) or an old-style name: age decides
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def scratch_dir(root: str | os.PathLike, label: str) -> Iterator[Path]:
    """A temporary folder under ``root/tmp`` named like :func:`atomic_path`'s, removed on exit; a
    killed process's is found and removed by :func:`clean_stale_tmp_tree` at the next stage start
    (a ``tempfile`` folder in ``/tmp`` would stay until reboot)."""
    path = _tmp_beside(Path(root) / "tmp" / label)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it is removed.

    ``suffix`` keeps the extension for writers that look at it (``.safetensors``, ``.parquet``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(target, suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any, **kw: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, **{"indent": 2, "sort_keys": True, **kw}))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, is_complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``, renamed into place when the block succeeds.

    When another process got there first with a complete folder (``is_complete``), its folder is
    kept and ours dropped; an incomplete leftover at ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(target)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if is_complete is not None and is_complete(target):
                return  # a concurrent winner: keep its folder
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a finished file or folder into place; when another process already published ``target``
    (the same content, by a content-addressed name), keep theirs and drop ``src``."""
    src, target = Path(src), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(src, ignore_errors=True) if src.is_dir() else src.unlink(missing_ok=True)
    return target


def tmp_beside(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``target`` (cleaned by :func:`clean_stale_tmp` if left behind)."""
    return _tmp_beside(Path(target))


def clean_stale_tmp(folder: str | os.PathLike, older_than_s: float = 6 * 3600) -> int:
    """Remove temporary files/folders a killed process left in ``folder``: those whose writer (named
    in the temporary name) is a dead process of this host, and any older than ``older_than_s``
    (another machine's on a shared cache, or an old-style name); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n, now = 0, time.time()
    for p in folder.glob(f"{TMP_PREFIX}*"):
        try:
            if not _writer_dead(p.name) and now - p.lstat().st_mtime < older_than_s:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            n += 1
        except OSError:
            continue
    return n


def clean_stale_tmp_tree(root: str | os.PathLike, max_depth: int = 4, older_than_s: float = 6 * 3600) -> int:
    """:func:`clean_stale_tmp` in ``root`` and its folders down to ``max_depth`` levels (caches put
    temporary names beside their targets: ``activations/``, ``saes/``, ``scores/<key>/``, ...)."""
    root = Path(root)
    n, todo = 0, [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        n += clean_stale_tmp(folder, older_than_s)
        if depth >= max_depth:
            continue
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(TMP_PREFIX):
                    todo.append((Path(e.path), depth + 1))
    return n


def file_sha256(path: str | os.PathLike, memo: bool = False) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks. ``memo`` reuses the digest while size and
    mtime are unchanged (for large, immutable weights); checksum verification must pass False."""
    p = Path(path)
    key = None
    if memo:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key in _MEMO:
            return _MEMO[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    # Not memoised while the mtime is recent ("racy git"): a same-size rewrite within the
    # filesystem's timestamp granularity would otherwise keep the old digest.
    if key is not None and time.time_ns() - key[2] > 2_000_000_000:
        _MEMO[key] = digest
    return digest


def files_digest(paths: Sequence[str | os.PathLike], length: int = 24) -> str:
    """sha256 over the files' names and contents (memoised per path/size/mtime within the process)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode() + file_sha256(p, memo=True).encode())
    return h.hexdigest()[:length]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Content digest of a HF model folder: config.json and every safetensors weight file."""
    d = Path(model_dir)
    return files_digest([*d.glob("*.safetensors"), d / "config.json"])


def json_digest(*parts: Any, length: int = 24) -> str:
    """Digest of JSON-serialisable parts (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]
