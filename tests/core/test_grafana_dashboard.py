"""The Grafana dashboard in grafana/appliance.json: a dashboard Grafana can import, whose every query names metrics a
running server really exports (the GPU gauges, which exist only where NVML reads a GPU, against the collector that
makes them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
from prometheus_client import CollectorRegistry, generate_latest

from appliance.gpu_telemetry import GpuGauges, GpuReading

DASHBOARD = Path(__file__).parent.parent.parent / "grafana" / "appliance.json"
METRIC = re.compile(r"\bappliance_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count")


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def exported(text: str) -> set[str]:
    """Every sample and family name in a Prometheus exposition."""
    names = set()
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_dashboard_imports_into_grafana():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "appliance" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not covered & cells, f"panel {panel['title']!r} overlaps another"
        cells |= covered
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].count("(") == target[
                "expr"].count(")"), target["expr"]


def test_every_metric_the_dashboard_names_is_exported(server):
    requests.post(f"{server.url}/v2/models/add_one/infer", timeout=10, json={
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    names = exported(requests.get(f"{server.url}/metrics", timeout=10).text)
    registry = CollectorRegistry()
    GpuGauges(registry).record([GpuReading(0, "H200", 0.5, 1, 2, 40.0, 300.0)])
    gpu_names = exported(generate_latest(registry).decode())
    named = {name for expr in queries() for name in METRIC.findall(expr)}
    assert len(named) > 30
    missing = []
    for name in sorted(named):
        base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), name)
        if not {name, base} & (names | gpu_names):
            missing.append(name)
    assert not missing, f"the dashboard names metrics /metrics does not export: {missing}"
