"""Row-level validation errors: every bad row is named (row number and id) with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefsculpt.core.errors import UserError

#: Reasons a row can be rejected; the skip report counts rows per reason.
REASONS = (
    "malformed",  # the line/record cannot be parsed at all (bad JSON, bad CSV row)
    "undecodable",  # bytes that are not UTF-8, or text with lone surrogates / replacement chars
    "missing_field",
    "wrong_type",
    "empty_prompt",
    "empty_response",
    "identical_responses",
    "too_long",
    "duplicate_id",
    "bad_format",  # the row does not fit the declared format (e.g. no Assistant turn in an HH transcript)
)


@dataclass(frozen=True)
class RowError:
    """One rejected row. ``row`` is 1-based (the line number for JSONL/CSV, the record index otherwise)."""

    row: int
    id: str | None
    reason: str
    detail: str
    source: str = ""

    def __str__(self) -> str:
        ident = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.source} row {self.row}{ident}: {self.reason}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


class RowProblem(ValueError):
    """Raised while normalising one row; converted to a :class:`RowError` by the loader."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataValidationError(UserError):
    """A data source had invalid rows and ``on_error`` is ``raise``. Lists every offending row."""

    MAX_LISTED = 50

    def __init__(self, source: str, errors: list[RowError], n_rows: int):
        self.source = source
        self.errors = errors
        self.n_rows = n_rows
        lines = [str(e) for e in errors[: self.MAX_LISTED]]
        more = len(errors) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        super().__init__(
            f"{len(errors)} of {n_rows} rows in {source} are invalid:\n  "
            + "\n  ".join(lines)
            + "\nFix these rows, or set data.on_error=skip to drop them "
            "(skipped rows are counted, listed and logged in the skip report)."
        )


class DataSourceError(UserError):
    """The data source itself cannot be read (missing file, unknown extension, hub offline, ...)."""
