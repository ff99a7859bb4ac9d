"""Bytes of a data file to text: gzip, byte-order marks and read failures, each as a named error.

Shared by the file readers in :mod:`prefsculpt.data.loaders`. A read that breaks part way (a truncated
or corrupt ``.gz``) is a :class:`DataSourceError` for the whole file, so a loader never returns the
rows before the break as if they were all.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Callable
from pathlib import Path

from prefsculpt.data.errors import DataSourceError, RowProblem


def open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def base_suffix(path: Path) -> str:
    return Path(path.name[: -len(".gz")]).suffix if path.suffix == ".gz" else path.suffix


def decode_line(line: bytes) -> str | RowProblem:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowProblem("undecodable", f"not valid UTF-8 at byte {exc.start}")


_UTF8_BOM = b"\xef\xbb\xbf"
#: Byte-order marks of encodings we do not read (UTF-32 first: its LE mark starts like UTF-16's).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def strip_bom(first: bytes, path: Path) -> bytes:
    """The file's first bytes without a UTF-8 byte-order mark (Excel and Notepad write one); a
    UTF-16/32 mark is a whole-file error, since every line would otherwise be "undecodable"."""
    if first.startswith(_UTF8_BOM):
        return first[len(_UTF8_BOM):]
    for bom, enc in _OTHER_BOMS:
        if first.startswith(bom):
            raise DataSourceError(
                f"{path}: the file is {enc} (it starts with the byte-order mark {bom.hex(' ')}), "
                "but data files must be UTF-8. Re-save it as UTF-8 (e.g. `iconv -f "
                f"{enc} -t UTF-8 {path.name} > out{base_suffix(path)}`) and point data.path at that."
            )
    return first


@contextlib.contextmanager
def reading(path: Path, where: Callable[[], str] = lambda: ""):
    """Turn a failure to read or decompress ``path`` into a :class:`DataSourceError` naming the
    file and how far reading got (``where()``). Nothing read before the failure is used."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        msg = str(exc)
        if isinstance(exc, EOFError):
            what = "truncated (the compressed stream ends before its end marker)"
        elif msg.startswith("Not a gzipped file"):
            what = "not gzip data (it does not start with the gzip magic bytes 1f 8b)"
        else:
            what = f"corrupt ({msg})"
        raise DataSourceError(
            f"{path}: the gzip file is {what}{where()}. No rows were loaded from it. Re-download or "
            f"re-compress the file (`gzip -t {path.name}` checks it), or drop the .gz suffix if it is "
            "not compressed."
        ) from exc
    except OSError as exc:
        raise DataSourceError(f"{path}: cannot be read ({exc.strerror or exc}). Check the path and "
                              "its permissions.") from exc


def read_all(path: Path) -> bytes:
    with reading(path):
        with open_bytes(path) as fh:
            return strip_bom(fh.read(), path)
