"""Reference outputs of independent implementations, kept in ``tests/data`` (its README says how they were made)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def reference_items(name: str) -> list[dict]:
    """The ``items`` of ``tests/data/<name>.json``, read afresh on each call (callers may change them)."""
    path = DATA / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DATA.glob("*.json")))
        raise FileNotFoundError(f"no reference data named {name!r} in {DATA}; the names are: {known}")
    return json.loads(path.read_text())["items"]
