"""The registered model version's description: what was promoted, its headline metrics with which
way is better, and the glossary of every metric on its trial run (from :mod:`prefsculpt.core.glossary`),
so the registry page explains itself without the README."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prefsculpt.core import glossary as G

#: The registry's description column is VARCHAR(5000) (MLflow's SQL schema; PostgreSQL enforces it).
MAX_CHARS = 5000
HEADLINE = ("test/on_target", "test/on_target_plain", "test/on_target_diff", "test/syc_increase",
            "test/syc_increase_plain", "test/syc_increase_diff", "search/off_target", "search/on_target",
            "search/syc_increase", "search/style_drift")


def version_description(trial: int, shaping: str, metrics: Mapping[str, float], gates: Sequence[Any],
                        refusal: str | None, baseline: Mapping[str, float]) -> str:
    """Markdown, at most MAX_CHARS. ``metrics``: the trial run's metrics (objectives and the
    evaluation's, same keys as its evaluate run); ``gates``: objects with ``text()``."""
    head = [f"**prefsculpt policy**: trial {trial} ({shaping or 'plain DPO'}). "
            + ("All promotion gates passed." if refusal is None else f"Not champion: {refusal}"), "",
            "| metric | value | better | what it measures |", "|---|---|---|---|"]
    for k in HEADLINE:
        if k in metrics and (m := G.lookup(k)):
            ci = f" [{metrics[k + '_lo']:.4g}, {metrics[k + '_hi']:.4g}]" if f"{k}_lo" in metrics and f"{k}_hi" in metrics else ""
            head.append(f"| `{k}` | {metrics[k]:.4g}{ci} | {G.arrow(m.direction)} | {m.meaning} |")
    head.append("")
    head.append("Plain DPO baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in baseline.items()) + ".")
    head += ["", "Gates:"] + [f"- {g.text()}" for g in gates] + ["", "Metric glossary (keys on the trial run; "
             "`k_base` = base model, `k_diff` = paired policy − base, `_lo`/`_hi` = CI bounds):"]
    return _fit("\n".join(head), glossary_lines(metrics.keys()))


def glossary_lines(keys: Iterable[str]) -> list[str]:
    return [f"- `{e.pattern}` ({G.arrow(e.direction)}): {e.meaning}" for e in G.entries_for(set(keys))]


def _fit(head: str, lines: list[str]) -> str:
    """``head`` then as many glossary lines as fit, noting how many were left out."""
    out, used = [head], len(head)
    for i, line in enumerate(lines):
        tail = f"\n- … {len(lines) - i} more: see the README's metric glossary"
        if used + 1 + len(line) + len(tail) > MAX_CHARS:
            out.append(tail.lstrip("\n"))
            break
        out.append(line)
        used += 1 + len(line)
    return "\n".join(out)[:MAX_CHARS]
