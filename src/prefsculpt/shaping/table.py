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
ACTIONS_BEGIN = "<!-- actions:begin (python -m prefsculpt.shaping.table README.md) -->"
ACTIONS_END = "<!-- actions:end -->"
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


def actions_table() -> str:
    """Per method, what suppress and amplify do, with s_u the audit's direction of the concept (+1: the
    preferred side has more of it, −1: less; ``shaping.orient``)."""
    rows = ["| method | suppress | amplify |", "|---|---|---|"]
    for name, cls in INTERVENTIONS.items():
        cells = [f"`{name}`", cls.suppress_doc, cls.amplify_doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def decisions_help() -> str:
    """Comment lines for the ``method:`` field of a decisions file header, one per method."""
    return "".join(f"#             {name:<10}{summary(cls)}\n" for name, cls in INTERVENTIONS.items())


def replace_table(text: str) -> str:
    """``text`` with the blocks between the markers replaced by the current tables (the actions table's
    markers are optional)."""
    for begin, end, render, required in ((BEGIN, END, method_table, True),
                                         (ACTIONS_BEGIN, ACTIONS_END, actions_table, False)):
        pat = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pat.search(text):
            if required:
                raise ValueError(f"no block between {begin!r} and {end!r}; add both markers where the table goes")
            continue
        text = pat.sub(lambda _, b=begin, e=end, r=render: f"{b}\n{r()}{e}", text)
    return text


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(method_table())
        return 0
    path = Path(argv[0])
    path.write_text(replace_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
