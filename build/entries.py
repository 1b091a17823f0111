"""Write repository entries: artifacts, ``model.toml`` and provenance in a new version folder, atomically.

Rebuilding from unchanged sources with unchanged options does nothing: the build key (source digest, builder
version, options) is kept in ``provenance.json`` and compared first.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.build.provenance import find_build, next_version, write_provenance

log = logging.getLogger("appliance.build")
Progress = Callable[[str], None]


class QualityBelowThreshold(RuntimeError):
    """A variant's measured parity is under its configured threshold; it was not written."""


@dataclass
class StageReport:
    """What one stage did: wall time, peak memory, artifact size, and its figures."""

    stage: str
    seconds: float
    peak_rss_mb: float
    artifact_bytes: int = 0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class EntryResult:
    """Where the entry is, whether it was built now, and the stage reports."""

    name: str
    version: int
    folder: Path
    built: bool
    stages: list[StageReport] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(reports: list[StageReport], name: str, progress: Progress, artifact: Path | None = None
          ) -> Iterator[StageReport]:
    """Time a stage, print its start and end, and record it."""
    progress(f"{name} ...")
    report = StageReport(name, 0.0, 0.0)
    started = time.perf_counter()
    yield report
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    if artifact is not None and artifact.exists():
        report.artifact_bytes = artifact.stat().st_size
    reports.append(report)
    progress(f"{name} done in {report.seconds:.1f} s")


def existing(repo: Path, name: str, key: str) -> EntryResult | None:
    """The entry already built with ``key``, if there is one."""
    folder = find_build(repo / name, key)
    if folder is None:
        return None
    return EntryResult(name, int(folder.name), folder, built=False)


@contextmanager
def new_version(repo: Path, name: str) -> Iterator[Path]:
    """A scratch folder that becomes ``repo/name/<next version>`` when the block completes, or vanishes."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=model_dir))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def publish(scratch: Path, name: str, *, key: str, source: dict[str, Any], options: dict[str, Any],
            parity: dict[str, Any], stages: list[StageReport], model_toml: str) -> EntryResult:
    """Write model.toml and provenance into ``scratch`` and rename it to the next version, atomically."""
    (scratch / "model.toml").write_text(model_toml)
    write_provenance(scratch, source=source, options=options, key=key, parity=parity,
                     stages=[vars(s) for s in stages])
    model_dir = scratch.parent
    version = next_version(model_dir)
    folder = model_dir / str(version)
    os.chmod(scratch, 0o755)
    os.rename(scratch, folder)  # one step: the server never sees half an entry
    log.info("wrote %s version %d", name, version)
    return EntryResult(name, version, folder, built=True, stages=stages, parity=parity)
