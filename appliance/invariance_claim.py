"""Whether a version's ``deterministic`` claim was measured on a CPU like this one.

The build measures a decoder tier's batch invariance on the machine it builds on and records that CPU in the
version's ``provenance.json`` (``parity.batch_invariance.cpu``), because it depends on which kernels ONNX Runtime
picks for the CPU's vector extensions (``appliance.build.batch_invariance``). A repository copied to a machine with
other extensions carries a claim nobody measured there, so such a version is served as not deterministic (its
answers are not cached unless a request runs in the reproducible mode) until it is rebuilt on the new machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance.cpu import cpu_description

PROVENANCE = "provenance.json"


def measured_on_another_cpu(folder: Path) -> str | None:
    """The vector extensions the version's batch invariance was measured with, where they are not this CPU's;
    ``None`` where they are, or where the version records no such measurement."""
    try:
        recorded = json.loads((folder / PROVENANCE).read_text())["parity"]["batch_invariance"]["cpu"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(recorded, dict):
        return None
    theirs = list(recorded.get("vector_extensions", []))
    if theirs == cpu_description()["vector_extensions"]:
        return None
    return f"{recorded.get('model', 'another CPU')} [{' '.join(theirs)}]"
