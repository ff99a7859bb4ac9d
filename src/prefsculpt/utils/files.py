"""File digests, shared by the caches that key on model weights and by checksummed stores."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: (resolved path, size, mtime_ns) -> sha256: weights are hashed once per process, not per stage.
_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, memo: bool = False) -> str:
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
    if key is not None:
        _MEMO[key] = digest
    return digest
