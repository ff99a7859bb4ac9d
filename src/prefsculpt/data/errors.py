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
    "out_of_range",  # a number that does not fit (integer beyond 64 bits, float overflowing to infinity)
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

    def __init__(self, reason: str, detail: str, record: dict | None = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        #: The parsed record, when there is one (so the loader can still name the row's id).
        self.record = record


class DataValidationError(UserError):
    """A data source had invalid rows and ``on_error`` is ``raise``. Lists every offending row."""

    MAX_LISTED = 50

    def __init__(self, source: str, errors: list[RowError], n_rows: int, none_valid: bool = False):
        self.source = source
        self.errors = errors
        self.n_rows = n_rows
        self.none_valid = none_valid
        lines = [str(e) for e in errors[: self.MAX_LISTED]]
        more = len(errors) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        if none_valid:
            # Every row rejected: skipping cannot help, and the cause is nearly always the mapping.
            head = f"none of the {n_rows} rows in {source} is valid, so there is nothing to work on"
            fix = "Fix the rows listed (each says what is wrong); data.on_error=skip cannot help when no row is valid."
            if {e.reason for e in errors} & {"missing_field", "wrong_type", "bad_format"}:
                fix += (" If the file is fine, check data.format (auto, plain, chat or hh_rlhf) and data.columns "
                        "(which column holds prompt, chosen and rejected) against it.")
        else:
            head = f"{len(errors)} of {n_rows} rows in {source} are invalid"
            fix = ("Fix these rows, or set data.on_error=skip to drop them "
                   "(skipped rows are counted, listed and logged in the skip report).")
        super().__init__(f"{head}:\n  " + "\n  ".join(lines) + "\n" + fix)


class DataSourceError(UserError):
    """The data source itself cannot be read (missing file, unknown extension, hub offline, ...)."""
