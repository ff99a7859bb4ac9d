"""Read preference pairs from files, ``datasets`` folders, the hub, or the planted generator.

Every row that cannot become a valid :class:`PreferencePair` is reported with its row number, id
and reason. ``on_error="raise"`` (default) stops with all of them listed; ``"skip"`` drops them and
returns them in :attr:`LoadResult.skipped` so the caller can log the skip report. Nothing is dropped
silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefsculpt.data.errors import DataSourceError, DataValidationError, RowError, RowProblem
from prefsculpt.data.formats import FORMATS, to_pair
from prefsculpt.data.schema import PreferencePair

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: A raw record, or the problem that stopped it from being read, with its 1-based row number.
RawRow = tuple[int, "dict[str, Any] | RowProblem"]


@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    skipped: list[RowError]
    source: str
    n_rows: int
    extra: dict[str, Any] = field(default_factory=dict)

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.skipped))


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _base_suffix(path: Path) -> str:
    return Path(path.name[: -len(".gz")]).suffix if path.suffix == ".gz" else path.suffix


def _decode(line: bytes) -> str | RowProblem:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowProblem("undecodable", f"not valid UTF-8 at byte {exc.start}")


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_bytes(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = _decode(raw)
            if isinstance(text, RowProblem):
                yield lineno, text
                continue
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, RowProblem("malformed", f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(rec, dict):
                yield lineno, RowProblem("malformed", f"expected a JSON object, got {type(rec).__name__}")
                continue
            yield lineno, rec


def _read_json(path: Path) -> Iterator[RawRow]:
    with _open_bytes(path) as fh:
        raw = fh.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not valid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise DataSourceError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}. "
            "For one object per line use a .jsonl file."
        ) from exc
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataSourceError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(data, start=1):
        yield i, rec if isinstance(rec, dict) else RowProblem("malformed", "record is not a JSON object")


def _read_csv(path: Path) -> Iterator[RawRow]:
    with _open_bytes(path) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Decode line by line so only the bad rows are rejected.
        text = None
    lines = text.splitlines(keepends=True) if text is not None else None
    if lines is None:
        decoded = []
        bad: dict[int, RowProblem] = {}
        for i, b in enumerate(raw.splitlines(keepends=True)):
            d = _decode(b)
            if isinstance(d, RowProblem):
                bad[i + 1] = d  # keep the line (decoded lossily) so CSV structure and numbering hold
                decoded.append(b.decode("utf-8", errors="replace"))
            else:
                decoded.append(d)
        lines = decoded
    else:
        bad = {}
    reader = csv.DictReader(lines)
    for rec in reader:
        lineno = reader.line_num  # physical line where the record ends
        if lineno in bad:
            yield lineno, bad[lineno]
        elif None in rec:
            yield lineno, RowProblem("malformed", "more fields than the header")
        else:
            yield lineno, {k: (v if v != "" else None) for k, v in rec.items()}


def _read_arrow_like(ds: Any) -> Iterator[RawRow]:
    for i, rec in enumerate(ds, start=1):
        yield i, dict(rec)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataSourceError(f"{path}: cannot read parquet file ({exc})") from exc
    yield from _read_arrow_like(table.to_pylist())


def _read_datasets_folder(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataSourceError(f"{path}: not a readable `datasets` folder ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"{path}: has splits {list(ds)}, not data.hub_split={split!r}")
        ds = ds[split]
    yield from _read_arrow_like(ds)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_hub(name: str, split: str) -> Iterator[RawRow]:
    if _hub_offline():
        raise DataSourceError(
            f"data.path={name!r} is not a local file or folder, and hub access is off "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set). Point data.path at a local "
            f".jsonl/.json/.parquet/.csv file or a `datasets` folder, or drop data.path to use the "
            "built-in planted set."
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataSourceError(
            f"data.path={name!r}: not a local file or folder, and loading it from the hub failed ({exc}). "
            "Check the name and your network, or point data.path at a local file."
        ) from exc
    yield from _read_arrow_like(ds)


def iter_raw_rows(path: str, hub_split: str = "train") -> Iterator[RawRow]:
    """Raw records of a source with 1-based row numbers (file line numbers for JSONL/CSV)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if _base_suffix(f) in FILE_SUFFIXES)
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            yield from _read_datasets_folder(p, hub_split)
        elif files:
            offset = 0
            for f in files:  # a folder of shards reads as one source; row numbers continue
                last = 0
                for n, rec in iter_raw_rows(str(f)):
                    last = n
                    yield offset + n, rec
                offset += last
        else:
            raise DataSourceError(f"{p}: folder holds neither a `datasets` dataset nor {FILE_SUFFIXES} files")
        return
    if p.exists():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        suffix = _base_suffix(p)
        if suffix not in readers:
            raise DataSourceError(f"{p}: unknown file type {suffix!r}; use one of {FILE_SUFFIXES} (optionally .gz)")
        yield from readers[suffix](p)
        return
    if p.is_absolute() or str(path).startswith((".", "~")) or _base_suffix(p) in FILE_SUFFIXES:
        raise DataSourceError(f"{p}: no such file or folder")
    yield from _read_hub(path, hub_split)


def load_pairs(
    path: str,
    fmt: str = "auto",
    columns: Mapping[str, str] | None = None,
    on_error: str = "raise",
    max_chars: int = 32_000,
    hub_split: str = "train",
    limit: int | None = None,
) -> LoadResult:
    """Load and validate every row of ``path``; see the module docstring for ``on_error``."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is not one of {FORMATS}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={on_error!r} must be 'raise' or 'skip'")
    columns = dict(columns or {})
    source = str(path)
    stem = Path(path).name.split(".")[0] or "row"
    pairs: list[PreferencePair] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for row, rec in iter_raw_rows(path, hub_split):
        if limit is not None and n_rows >= limit:
            break
        n_rows += 1
        raw_id = rec.get(columns.get("id", "id")) if isinstance(rec, dict) else None
        rid = None if raw_id is None else str(raw_id)
        try:
            if isinstance(rec, RowProblem):
                raise rec
            pair = to_pair(rec, fmt, columns, default_id=f"{stem}-{row:06d}", max_chars=max_chars)
            if pair.id in seen:
                raise RowProblem("duplicate_id", f"id {pair.id!r} already used by row {seen[pair.id]}")
        except RowProblem as prob:
            errors.append(RowError(row=row, id=rid, reason=prob.reason, detail=prob.detail, source=source))
            continue
        seen[pair.id] = row
        pairs.append(pair)
    if n_rows == 0:
        raise DataSourceError(f"{source}: no rows")
    if errors and on_error == "raise":
        raise DataValidationError(source, errors, n_rows)
    for e in errors:
        log.warning("skipped %s", e)
    return LoadResult(pairs=pairs, skipped=errors, source=source, n_rows=n_rows)
