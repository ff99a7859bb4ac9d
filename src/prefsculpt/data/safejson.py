"""JSON parsing with limits, for untrusted data files: nesting depth and number range.

Python's ``json`` turns a value nested a few thousand levels deep into a ``RecursionError``, an
integer of more than 4,300 digits into a bare ``ValueError``, and ``1e999`` into ``inf``. Here every
one of those becomes a :class:`RowProblem` that names where it is, so a loader can report the row:

- nesting deeper than :data:`MAX_DEPTH` (a preference record needs about 4 levels) is ``malformed``;
- an integer outside the signed 64-bit range, a float that overflows to infinity, or the
  non-standard ``Infinity`` / ``-Infinity`` literals are ``out_of_range``. (``NaN`` is kept, as
  Python's own ``json.dumps`` writes it for a missing float.)
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from prefsculpt.data.errors import RowProblem

#: Deepest nesting of objects/arrays accepted in one record (the record object itself is level 1).
MAX_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: More digits than this can never fit in 64 bits; checked before ``int()`` so 5,000 digits cost nothing.
_MAX_INT_DIGITS = 19


class _OutOfRange:
    """Stands in for a number that does not fit, so the walk can name the field it sits in."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        if len(self.text) <= 24:
            return self.text
        return f"{self.text[:12]}… ({len(self.text.lstrip('-'))} digits)"


def _parse_int(s: str) -> int | _OutOfRange:
    if len(s.lstrip("-")) > _MAX_INT_DIGITS:
        return _OutOfRange(s)
    v = int(s)
    return v if INT_MIN <= v <= INT_MAX else _OutOfRange(s)


def _parse_float(s: str) -> float | _OutOfRange:
    v = float(s)
    return v if math.isfinite(v) else _OutOfRange(s)


def _parse_constant(s: str) -> float | _OutOfRange:
    return float("nan") if s == "NaN" else _OutOfRange(s)


#: One decoder for every call: ``json.loads`` with hooks would build a new one per line.
_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)


def raw_loads(text: str) -> Any:
    """``json.loads`` with out-of-range numbers as placeholders (see :func:`check_value`)."""
    return _DECODER.decode(text)


def nesting_error_at(text: str, limit: int = MAX_DEPTH) -> tuple[int, int] | None:
    """(line, column), both 1-based, where ``text``'s bracket nesting first exceeds ``limit`` (outside
    strings), or None. A plain scan, used only to place a nesting error that ``json`` could not."""
    depth, line, col0 = 0, 1, -1
    in_str = esc = False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line, i - col0
        elif ch in "]}":
            depth -= 1
        if ch == "\n":
            line, col0 = line + 1, i
    return None


def _name(path: str) -> str:
    if len(path) > 60:
        path = path[:59] + "…"
    return f"field {path}" if path else "the record"


def check_value(value: Any, where: str = "", base_depth: int = 0, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`RowProblem` if ``value`` nests deeper than ``limit`` or holds an out-of-range
    number; ``where`` names the field for the message. Iterative: safe on any depth."""
    stack: list[tuple[Any, str, int]] = [(value, where, base_depth)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, _OutOfRange):
            raise RowProblem(
                "out_of_range",
                f"{_name(path)} is the number {v.describe()}, out of range (integers must fit in "
                "64 bits, floats must be finite); write it as a string if it is an identifier",
            )
        if isinstance(v, dict | list):
            if depth + 1 > limit:
                top = re.split(r"[.\[]", path, maxsplit=1)[0]  # "m[0][0]…" would be 64 levels long
                raise RowProblem("malformed", f"{_name(top)} is nested more than {limit} levels deep; flatten it")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, child in items:
                name = (f"{path}.{k}" if path else k) if isinstance(k, str) else f"{path}[{k}]"
                stack.append((child, name, depth + 1))


def too_deep(text: str, where: str = "", limit: int = MAX_DEPTH) -> RowProblem:
    """The problem for a text ``json`` could not parse for its depth (``RecursionError``)."""
    at = nesting_error_at(text, limit)
    pos = f" at column {at[1]}" if at else ""
    return RowProblem("malformed", f"{_name(where)} is nested more than {limit} levels deep{pos}; flatten it")


def loads(text: str, where: str = "", limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` with the limits above; errors as :class:`RowProblem` (``json.JSONDecodeError``
    for plain syntax errors is left to the caller, who knows how to word it)."""
    try:
        value = raw_loads(text)
    except RecursionError:
        raise too_deep(text, where, limit) from None
    check_value(value, where, limit=limit)
    return value
