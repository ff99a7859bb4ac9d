"""The README's method table and the decisions file's method lines, rendered from the registry.

    python -m prefsculpt.shaping.table             # the table, on stdout
    python -m prefsculpt.shaping.table README.md   # rewrite the table between the markers in place

``tests/unit/shaping/test_table.py`` fails when README.md's table differs from :func:`method_table`.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

from prefsculpt.audit.decisions import Action
from prefsculpt.shaping.params import CONFIG, DOC, PER_ENTRY, SearchRange, choices, fields
from prefsculpt.shaping.registry import INTERVENTIONS, Intervention, Source

BEGIN, END = "<!-- interventions:begin (python -m prefsculpt.shaping.table README.md) -->", "<!-- interventions:end -->"
NEEDS = {Source.scores: "span scores", Source.direction: "a residual direction at ℓ",
         Source.instruction: "an instruction C_u"}


def summary(cls: type[Intervention]) -> str:
    """The first paragraph of the class docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def _ranges(ranges: dict[str, SearchRange]) -> str:
    return ", ".join(f"`{r.key}` {r.describe()}" for r in ranges.values()) or "nothing"


def searched(cls: type[Intervention]) -> str:
    """What the search draws for this method; per value of a choice parameter when that changes it."""
    default = cls.search_ranges({})
    variants = [(f"{f.name}={c}", cls.search_ranges({f.name: c}))
                for f in fields(cls.Params) for c in choices(cls.Params, f.name)]
    if all(r == default for _, r in variants):
        return _ranges(default)
    return "; ".join(f"{label}: {_ranges(r)}" for label, r in variants)


def _param(f: Any) -> str:
    where = f"`shaping.{f.metadata[CONFIG]}`" if f.metadata.get(CONFIG) else ""
    if not f.metadata.get(PER_ENTRY, True):
        where += " only"
    default = "" if f.default is None else f" = {f.default!r}"
    return f"`{f.name}`{default} ({where.strip() or 'entry'}): {f.metadata[DOC]}"


def method_table() -> str:
    rows = ["| method | acts on | what it does | strength | parameters (default; where else it is set) "
            "| searched | needs |", "|---|---|---|---|---|---|---|"]
    for name, cls in INTERVENTIONS.items():
        params = "<br>".join(_param(f) for f in fields(cls.Params)) or "—"
        strength = cls.strength_doc or "none"
        if set(cls.actions) != {Action.suppress, Action.amplify}:
            strength += f" (only {' / '.join(cls.actions)})"
        cells = [f"`{name}`", cls.role, summary(cls), strength, params, searched(cls), NEEDS[cls.needs]]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def decisions_help() -> str:
    """Comment lines for the ``method:`` field of a decisions file header, one per method."""
    return "".join(f"#             {name:<10}{summary(cls)}\n" for name, cls in INTERVENTIONS.items())


def replace_table(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table."""
    pat = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pat.search(text):
        raise ValueError(f"no block between {BEGIN!r} and {END!r}; add both markers where the table goes")
    return pat.sub(lambda _: f"{BEGIN}\n{method_table()}{END}", text)


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(method_table())
        return 0
    path = Path(argv[0])
    path.write_text(replace_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
