"""The package layout holds: one stage registry behind the CLI and MLproject, and the import layers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from prefsculpt.stages import DEFAULT_ORDER, STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_mlproject_entry_points_are_the_stage_registry():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == set(STAGES)
    for name in STAGES:
        assert project["entry_points"][name]["command"] == f"python pipelines/{name}.py --overrides {{overrides}}"
        assert (ROOT / "pipelines" / f"{name}.py").read_text().count(f'main(stage="{name}")') == 1
    assert DEFAULT_ORDER == ("prepare", "sae", "audit", "search", "evaluate", "promote")


def test_every_stage_target_resolves():
    for st in STAGES.values():
        assert callable(st.fn()) and callable(st.fn(pipeline=True))


def _lint(src: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold_and_catch_a_domain_package_importing_tracking(tmp_path):
    assert _lint(ROOT / "src").returncode == 0
    bad = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "prefsculpt", bad / "prefsculpt", ignore=shutil.ignore_patterns("__pycache__"))
    init = bad / "prefsculpt" / "data" / "__init__.py"
    init.write_text(init.read_text() + "\nimport prefsculpt.tracking.runs  # noqa: E402,F401\n")
    out = _lint(bad)
    assert out.returncode != 0
    assert "prefsculpt.data" in out.stdout and "prefsculpt.tracking" in out.stdout
