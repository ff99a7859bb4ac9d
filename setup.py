"""Build hook: the wheel carries the top-level ``conf/`` inside the package as ``prefsculpt/conf``.

``conf/`` stays at the top level of the checkout (where users and ``mlflow run .`` read it); at run
time ``prefsculpt.config.conf_dir()`` uses the checkout's copy when there is one (editable installs,
a plain checkout), else this packaged copy. All metadata lives in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's conf/ directly
            return
        src, dst = ROOT / "conf", Path(self.build_lib) / "prefsculpt" / "conf"
        if not (src / "config.yaml").is_file():
            raise FileNotFoundError(f"{src}/config.yaml is missing: the wheel must carry the config")
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})
