"""Small helpers shared by tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import MODEL_CACHE

from appliance.build.defaults import MINILM


def copy_cached_wheel(target: Path) -> Path:
    """A copy of the cached MiniLM wheel in ``target`` (the cache itself is never touched)."""
    target.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(MODEL_CACHE / "downloads" / MINILM.filename, target / MINILM.filename))
