"""Print a benchmark table and write it as JSON under bench/results/."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from appliance.cpu import cpu_description

RESULTS = Path(__file__).parent / "results"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A plain-text table, widths fitted to the content, under its title and the machine it was measured on (CPU
    model and vector extensions, GPUs)."""
    cells = [columns] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(columns))]
    print(f"\n{title}\nmeasured on: {cpu_line()}")
    for index, row in enumerate(cells):
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 10 else f"{value:,.0f}"
    return str(value)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with the machine's description; returns the file."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"machine": {"cpus": _cpus(), "platform": platform.platform(), "python": platform.python_version(),
                           "cpu": cpu_description(), "gpu": gpu_description()},
               **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def gpu_description() -> list[str]:
    """The GPUs NVML names (empty without a driver)."""
    try:
        from appliance.doctor import gpu_readings

        return [reading.name for reading in gpu_readings()]
    except Exception:  # a benchmark's description must never stop it
        return []


def cpu_line() -> str:
    """One line for a table title: CPU model and vector extensions (and GPUs)."""
    cpu, gpus = cpu_description(), gpu_description()
    return f"{cpu['model']} [{' '.join(cpu['vector_extensions'])}]" + (f"; GPU {', '.join(gpus)}" if gpus else "")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
