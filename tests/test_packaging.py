"""What `pip install .` ships: every subpackage of asyncjobs, and the console script."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_shipped():
    """The package list in pyproject.toml covers every folder of the package (web/, client/, …)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "asyncjobs").rglob("__init__.py")]
    assert len(packages) > 1
    missing = [p for p in packages if not any(fnmatch.fnmatch(p, pattern) for pattern in include)]
    assert not missing, missing


def test_console_script_points_at_the_cli():
    """`asyncjobs` runs asyncjobs.cli:main."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["asyncjobs"] == "asyncjobs.cli:main"
