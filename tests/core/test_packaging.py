"""The package list in pyproject.toml names every subpackage, so an installed (non-editable) appliance imports."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {Path(folder): name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for folder, name in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if any(Path(other) != folder and (folder / relative).is_relative_to(other) for other in folders):
                continue  # mapped on its own
            found.add(".".join([name, *relative.parts]))
    assert found - set(setuptools["packages"]) == set(), "add these to [tool.setuptools] packages"
