"""README.md's method table is the one the registry renders (regenerate it with
``python -m prefsculpt.shaping.table README.md``)."""

from pathlib import Path

import pytest

from prefsculpt.shaping.table import (
    ACTIONS_BEGIN,
    ACTIONS_END,
    BEGIN,
    END,
    actions_table,
    decisions_help,
    method_table,
    replace_table,
)

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_table_is_the_rendered_one():
    text = README.read_text(encoding="utf-8")
    block = text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    assert block == method_table(), "README.md's method table is stale: run python -m prefsculpt.shaping.table README.md"
    block = text.split(ACTIONS_BEGIN + "\n", 1)[1].split(ACTIONS_END, 1)[0]
    assert block == actions_table(), "README.md's suppress/amplify table is stale: run the same command"


def test_actions_table_says_what_suppress_and_amplify_do_for_every_method():
    rows = actions_table().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["`score`", "`steer`", "`inoculate`", "`filter`", "`ablate`",
                                                      "`prevent`"]
    assert all(len([c for c in r.split("|")[2:4] if c.strip()]) == 2 for r in rows)


def test_table_has_one_row_per_method_with_its_search_range():
    rows = [r for r in method_table().splitlines()[2:]]
    assert [r.split("|")[1].strip() for r in rows] == ["`score`", "`steer`", "`inoculate`", "`filter`", "`ablate`",
                                                      "`prevent`"]
    by = {r.split("|")[1].strip(): r for r in rows}
    assert "`lambda` [0.1, 10] log" in by["`score`"]
    assert "mode=drop: `share` [0.05, 0.3]; mode=weight: `lambda` [0.1, 10] log" in by["`filter`"]
    assert "| nothing |" in by["`ablate`"] and "only suppress" in by["`ablate`"]
    assert "`multiplier` = 8.0 (`shaping.steer_multiplier`)" in by["`steer`"]


def test_replace_table_needs_the_markers_and_keeps_the_rest():
    with pytest.raises(ValueError, match="markers"):
        replace_table("# no table here\n")
    out = replace_table(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    assert out == f"before\n{BEGIN}\n{method_table()}{END}\nafter\n"


def test_decisions_help_is_one_comment_line_per_method():
    lines = decisions_help().splitlines()
    assert len(lines) == 6 and all(line.startswith("#") for line in lines)
    assert lines[3].split()[1] == "filter"
