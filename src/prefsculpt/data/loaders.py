"""Read preference pairs from files, ``datasets`` folders, the hub, or the planted generator.

Every row that cannot become a valid :class:`PreferencePair` is reported with its row number, id
and reason. ``on_error="raise"`` (default) stops with all of them listed; ``"skip"`` drops them and
returns them in :attr:`LoadResult.skipped` so the caller can log the skip report. Nothing is dropped
silently.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefsculpt.core.redact import redact_text
from prefsculpt.data import rawio, safejson
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


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    lineno = 0
    with rawio.reading(path, lambda: f", found while reading line {lineno + 1}"), rawio.open_bytes(path) as fh:
        for raw in fh:
            lineno += 1
            text = rawio.decode_line(rawio.strip_bom(raw, path) if lineno == 1 else raw)
            if isinstance(text, RowProblem):
                yield lineno, text
                continue
            if not text.strip():
                continue
            try:
                rec = safejson.raw_loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, RowProblem("malformed", f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                yield lineno, safejson.too_deep(text)
                continue
            if not isinstance(rec, dict):
                yield lineno, RowProblem("malformed", f"expected a JSON object, got {type(rec).__name__}")
                continue
            yield lineno, _checked(rec)


def _checked(rec: dict) -> dict | RowProblem:
    """``rec``, or the depth / number-range problem in it (carrying the record for its id)."""
    try:
        safejson.check_value(rec)
    except RowProblem as prob:
        prob.record = rec
        return prob
    return rec


def _read_json(path: Path) -> Iterator[RawRow]:
    raw = rawio.read_all(path)
    try:
        text = raw.decode("utf-8")
        data = safejson.raw_loads(text)
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not valid UTF-8 at byte {exc.start}. Re-save the file as UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise DataSourceError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}. "
            "Fix the file there; for one object per line use a .jsonl file."
        ) from exc
    except RecursionError:
        at = safejson.nesting_error_at(text)
        pos = f" at line {at[0]} column {at[1]}" if at else ""
        raise DataSourceError(
            f"{path}: JSON nested more than {safejson.MAX_DEPTH} levels deep{pos}. A preference record "
            "needs about 4 levels; flatten the value there."
        ) from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataSourceError(
                f"{path}: expected a list of records, or an object holding exactly one list, but the top-level "
                f"object holds {len(lists)} lists. Keep one list of records (or use a .jsonl file)."
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of records, got a {type(data).__name__}. "
                              "Write the records as [{...}, {...}] or one object per line in a .jsonl file.")
    for i, rec in enumerate(data, start=1):
        yield i, _checked(rec) if isinstance(rec, dict) else RowProblem("malformed", "record is not a JSON object")


#: ``csv.field_size_limit`` is process-wide state; it is raised only while one file is parsed.
_CSV_LIMIT_LOCK = threading.Lock()


def _csv_records(lines: list[str]) -> list[tuple[int, dict]]:
    """(physical line where the record ends, record) for every record. No field-size limit: an
    oversized field is then rejected with its row by ``data.max_chars`` (``too_long``), instead of the
    csv module's bare "field larger than field limit (131072)"."""
    with _CSV_LIMIT_LOCK:
        old = csv.field_size_limit(min(sys.maxsize, 2**62))
        try:
            reader = csv.DictReader(lines)
            return [(reader.line_num, rec) for rec in reader]
        finally:
            csv.field_size_limit(old)


def _unclosed_quote(lines: list[str], start: int) -> bool:
    """True when the record beginning at 1-based line ``start`` runs to the end of the file inside
    an open quote (the lenient reader silently takes the rest of the file as that field)."""
    try:
        for _ in csv.reader(lines[start - 1:], strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _read_csv(path: Path) -> Iterator[RawRow]:
    raw = rawio.read_all(path)
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
            d = rawio.decode_line(b)
            if isinstance(d, RowProblem):
                bad[i + 1] = d  # keep the line (decoded lossily) so CSV structure and numbering hold
                decoded.append(b.decode("utf-8", errors="replace"))
            else:
                decoded.append(d)
        lines = decoded
    else:
        bad = {}
    try:
        records = _csv_records(lines)
    except csv.Error as exc:
        raise DataSourceError(f"{path}: cannot parse the CSV ({exc}). Check the quoting there, or save the "
                              "data as .jsonl or .parquet.") from exc
    prev_end = 1  # the header's last line
    for lineno, rec in records:
        if lineno in bad:
            yield lineno, bad[lineno]
        elif None in rec:
            yield lineno, RowProblem("malformed", "more fields than the header")
        elif lineno == len(lines) and _unclosed_quote(lines, prev_end + 1):
            yield lineno, RowProblem(
                "malformed", f"a quoted field opened on line {prev_end + 1} is never closed, so the rest of the "
                "file was read into it; close the quote (a quote inside a quoted field is written twice: \"\")")
        else:
            yield lineno, {k: (v if v != "" else None) for k, v in rec.items()}
        prev_end = lineno


def _read_arrow_like(ds: Any) -> Iterator[RawRow]:
    for i, rec in enumerate(ds, start=1):
        yield i, dict(rec)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # optional: only for parquet sources

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataSourceError(f"{path}: cannot read parquet file ({exc})") from exc
    yield from _read_arrow_like(table.to_pylist())


def _read_datasets_folder(path: Path, split: str) -> Iterator[RawRow]:
    import datasets  # optional: only for datasets folders / hub names

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
    import datasets  # optional: only for datasets folders / hub names

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
    if "://" in str(path):  # Path() would fold "s3://k:secret@b" to "s3:/k:secret@b", past redaction
        raise DataSourceError(
            f"data.path={redact_text(str(path))!r} is a URL, but prefsculpt reads local files and folders "
            "(or a hub dataset name). Download or mount the data and point data.path at the local copy."
        )
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if rawio.base_suffix(f) in FILE_SUFFIXES)
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
        suffix = rawio.base_suffix(p)
        if suffix not in readers:
            raise DataSourceError(f"{p}: unknown file type {suffix!r}; use one of {FILE_SUFFIXES} (optionally .gz)")
        yield from readers[suffix](p)
        return
    if p.is_absolute() or str(path).startswith((".", "~")) or rawio.base_suffix(p) in FILE_SUFFIXES:
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
    """Load and validate every row of ``path``; see the module docstring for ``on_error``.

    Raises :class:`DataSourceError` when the source cannot be read at all (or the settings are
    wrong), and :class:`DataValidationError` for invalid rows under ``on_error="raise"`` and, under
    either policy, when no row at all is valid."""
    if fmt not in FORMATS:
        raise DataSourceError(
            f"data.format={fmt!r} (for {redact_text(str(path))}) is not a known format. Set data.format to one of "
            f"{', '.join(FORMATS)} "
            "(auto decides per row between plain strings, chat message lists and HH-RLHF transcripts)."
        )
    if on_error not in ("raise", "skip"):
        raise DataSourceError(f"data.on_error={on_error!r} must be 'raise' (stop and list the bad rows) or "
                              "'skip' (drop them and log a skip report).")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise DataSourceError(f"data.max_chars={max_chars!r} must be a positive integer (characters per text).")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DataSourceError(f"data.limit={limit!r} must be null (every row) or a positive integer.")
    columns = dict(columns or {})
    source = redact_text(str(path))  # names the source in errors and the skip report: no credentials
    stem = Path(path).name.split(".")[0] or "row"
    pairs: list[PreferencePair] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for row, rec in iter_raw_rows(path, hub_split):
        if limit is not None and n_rows >= limit:
            break
        n_rows += 1
        fields = rec.record if isinstance(rec, RowProblem) else rec
        raw_id = fields.get(columns.get("id", "id")) if isinstance(fields, dict) else None
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
        raise DataSourceError(f"{source}: holds no rows (the file is empty or only blank lines, or a CSV has "
                              "only its header). Point data.path at a file with at least one record.")
    if not pairs:
        raise DataValidationError(source, errors, n_rows, none_valid=True)
    if errors and on_error == "raise":
        raise DataValidationError(source, errors, n_rows)
    for e in errors:
        log.warning("skipped %s", e)
    return LoadResult(pairs=pairs, skipped=errors, source=source, n_rows=n_rows)
