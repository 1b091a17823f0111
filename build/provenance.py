"""Provenance of a built repository entry: what it was built from, by what, how, and how faithful it is."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from appliance import __version__

PROVENANCE_FILE = "provenance.json"


def sha256_file(path: Path) -> str:
    """The file's sha256, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_key(source_sha256: str, options: dict[str, Any]) -> str:
    """Identifies a build: the same source, builder version and options give the same key."""
    text = json.dumps({"source": source_sha256, "builder": __version__, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_provenance(folder: Path, *, source: dict[str, Any], options: dict[str, Any], key: str,
                     parity: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    """Write ``provenance.json`` into a version folder."""
    document = {
        "build_key": key,
        "source": source,
        "builder": {"name": "appliance", "version": __version__},
        "options": options,
        "parity": parity,
        "stages": stages,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(document, indent=2) + "\n")


def find_build(model_dir: Path, key: str) -> Path | None:
    """The version folder of ``model_dir`` already built with ``key``, if any."""
    if not model_dir.is_dir():
        return None
    for version in sorted((v for v in model_dir.iterdir() if v.name.isdigit()), key=lambda v: int(v.name)):
        file = version / PROVENANCE_FILE
        if file.is_file() and json.loads(file.read_text()).get("build_key") == key:
            return version
    return None


def next_version(model_dir: Path) -> int:
    """One more than the newest version in ``model_dir`` (1 for a new model)."""
    versions = [int(v.name) for v in model_dir.iterdir() if v.name.isdigit()] if model_dir.is_dir() else []
    return max(versions, default=0) + 1
