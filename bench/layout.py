"""Counts of the code-shape figures issue 12 tracks, at a git revision and in the working tree.

    python bench/layout.py --base d0f1986

Prints, for ``src/prefsculpt``: function-local imports (those without a ``# optional:`` reason on
the line), casts on config values (``int(cfg.x)``, ``float(tc.lr)``, ...), functions taking the
root config (a parameter named ``cfg`` annotated ``DictConfig`` or ``RootConfig`` outside
``stages/``, ``cli.py`` and ``config.py``), places that spell out the intervention method list,
hard-coded device strings (``"cpu"``/``"cuda"`` literals outside ``core/device.py``) and atomic-write
implementations (``os.replace``/``os.rename`` calls outside ``core/files.py``).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "src/prefsculpt"
#: A config value: a name bound to a config section (cfg, tc, sc, ec, pc, ...) followed by attributes.
CAST = re.compile(r"\b(?:int|float|str|bool)\(\s*(?:cfg|tc|sc|ec|pc|ac|a|s|st|tcfg|ocfg|sh|shaping_cfg|c)\.[a-z_]")
METHODS = re.compile(r"""["']score["'],\s*["']steer["'],\s*["']inoculate["']""")
DEVICE = re.compile(r"""(?<![\w.])["'](?:cpu|cuda)["']""")
#: a comparison of a device's type is a check, not a choice of device
TYPE_CHECK = re.compile(r"""\.type\s*[!=]=\s*["'](?:cpu|cuda)["']""")


def files_at(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / PKG).rglob("*.py")}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, PKG], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout for n in names if n.endswith(".py")}


def count(files: dict[str, str]) -> dict[str, int]:
    out = dict.fromkeys(("function-local imports", "casts on config values", "functions taking the root config",
                         "places listing the intervention methods", "hard-coded device strings",
                         "atomic write implementations"), 0)
    for name, text in files.items():
        tree = ast.parse(text)
        lines = text.splitlines()
        rel = name[len(PKG) + 1:]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom) and "# optional:" not in lines[sub.lineno - 1]:
                        out["function-local imports"] += 1
                if not rel.startswith(("stages/", "cli.py", "config.py")):
                    for arg in node.args.args:
                        ann = ast.unparse(arg.annotation) if arg.annotation else ""
                        if arg.arg == "cfg" and ann in ("DictConfig", "RootConfig"):
                            out["functions taking the root config"] += 1
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("replace", "rename") and ast.unparse(node.func.value) == "os" and \
                    rel != "core/files.py":
                out["atomic write implementations"] += 1
        out["casts on config values"] += len(CAST.findall(text))
        out["places listing the intervention methods"] += len(METHODS.findall(text))
        if rel != "core/device.py":
            out["hard-coded device strings"] += sum(len(DEVICE.findall(TYPE_CHECK.sub("", ln))) for ln in lines
                                                    if not ln.lstrip().startswith("#"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="d0f1986", help="git revision for the 'before' column")
    args = ap.parse_args()
    before, after = count(files_at(args.base)), count(files_at(None))
    width = max(map(len, before))
    print(f"{'figure':<{width}}  {args.base:>10}  {'now':>6}")
    for k in before:
        print(f"{k:<{width}}  {before[k]:>10}  {after[k]:>6}")


if __name__ == "__main__":
    main()
