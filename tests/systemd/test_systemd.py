"""The unit files (systemd-analyze verify and security), the install script into a temporary root, and the
appliance-build unit's command (`appliance build --refresh`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_models

from appliance.build.refresh import stale_versions
from appliance.config import load_config

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("appliance.service", "appliance-build.service")
EXEC = "/opt/appliance/venv/bin/appliance"
DRAIN_TIMEOUT_DEFAULT_S = 30


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:  # never skipped: the README's test command installs it
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd (the README's test command does this)")
    return path


def directives(unit: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given, across sections."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_units_pass_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: point it at a stand-in, since /opt/appliance is not installed here.
    stand_in = tmp_path / "appliance"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    for unit in UNITS:
        (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace(EXEC, str(stand_in)))
    result = subprocess.run([analyze(), "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_2(unit):
    result = subprocess.run([analyze(), "security", "--offline=true", str(SYSTEMD / unit)], capture_output=True,
                            text=True)
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert exposure, result.stdout + result.stderr
    assert float(exposure.group(1)) <= 2.0, result.stdout


def test_server_unit_declares_notify_user_directories_restart_devices_and_hardening():
    unit = directives("appliance.service")
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify" and "WatchdogSec" in one
    assert one["ExecStart"] == f"{EXEC} serve" and one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["User"] == "appliance" and one["Restart"] == "always"
    assert {one["StateDirectory"], one["ConfigurationDirectory"], one["CacheDirectory"]} == {"appliance"}
    assert "-/etc/appliance/env" in unit["EnvironmentFile"]
    assert int(one["TimeoutStopSec"]) > DRAIN_TIMEOUT_DEFAULT_S
    assert one["DevicePolicy"] == "closed" and all("nvidia" in device for device in unit["DeviceAllow"])
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict" and one["CapabilityBoundingSet"] == ""
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert "@system-service" in unit["SystemCallFilter"]
    assert "appliance-build.service" in one["After"] and "appliance-build.service" in one["Wants"]


def test_build_unit_is_a_oneshot_before_the_server_running_refresh():
    one = {key: values[-1] for key, values in directives("appliance-build.service").items()}
    assert one["Type"] == "oneshot" and one["Before"] == "appliance.service"
    assert one["ExecStart"] == f"{EXEC} build --refresh" and one["User"] == "appliance"


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-deps: the appliance's own package is built and installed for real; its dependencies are not fetched.
    result = subprocess.run(["bash", str(SYSTEMD / "install.sh"), "--root", str(root), "--pip-args", "--no-deps",
                             "--no-start", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_install_twice_keeps_an_edited_config_then_uninstall_keeps_state_and_purge_removes_it(tmp_path):
    root = tmp_path / "root"
    first = run_install(root)
    venv = root / "opt/appliance/venv"
    version = subprocess.run([str(venv / "bin/python"), "-c",
                              "import importlib.metadata as m; print(m.version('appliance'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "0.1.0"
    assert (venv / "bin/appliance").read_text().startswith("#!/opt/appliance/venv/bin/python")
    assert "appliance:x:" in (root / "etc/passwd").read_text()
    assert os.readlink(root / "usr/local/bin/appliance") == "/opt/appliance/venv/bin/appliance"
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (SYSTEMD / unit).read_text()
        assert (root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink()
    config = root / "etc/appliance/config.toml"
    assert "wrote" in first.stdout and (root / "etc/appliance/env").is_file()
    loaded = load_config(config, environ={})  # the shipped skeleton is a valid configuration
    assert loaded.server.host == "127.0.0.1" and loaded.paths.state_dir == "/var/lib/appliance"

    edited = config.read_text().replace("port = 8000", "port = 9100") + "# edited on site\n"
    config.write_text(edited)
    second = run_install(root)
    assert config.read_text() == edited
    assert f"kept your {config}" in second.stdout
    assert "port = 8000" in (root / "etc/appliance/config.toml.dist").read_text()
    assert (venv / "bin/python").exists() and not (root / "opt/appliance/venv.new").exists()

    (root / "var/lib/appliance/models").mkdir(parents=True)
    run_install(root, "--uninstall")
    assert not (root / "opt/appliance").exists() and not (root / "usr/local/bin/appliance").is_symlink()
    assert not any((root / "etc/systemd/system" / unit).exists() for unit in UNITS)
    assert config.read_text() == edited and (root / "var/lib/appliance/models").is_dir()
    assert "appliance:x:" in (root / "etc/passwd").read_text()

    run_install(root, "--uninstall", "--purge")
    assert not (root / "etc/appliance").exists() and not (root / "var/lib/appliance").exists()
    assert "appliance:" not in (root / "etc/passwd").read_text()


def test_purge_without_uninstall_is_refused(tmp_path):
    result = subprocess.run(["bash", str(SYSTEMD / "install.sh"), "--root", str(tmp_path), "--purge"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--purge only goes with --uninstall" in result.stderr


def test_build_refresh_does_nothing_quickly_on_a_cpu_machine(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, tiny_models.BATCHED.format(max_batch=8, delay_us=0),
                              tiny_models.add_constant)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    environ = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo), "APPLIANCE_PATHS_STATE_DIR": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "build", "--refresh"], env=environ,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    assert "[build] no TensorRT GPU here" in result.stderr
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


def provenance(folder: Path, figures: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text(json.dumps({"stages": [{"stage": "m: tensorrt", "figures": figures}]}))


def test_stale_versions_are_newest_versions_built_for_tensorrt_without_this_machines_plan(tmp_path):
    provenance(tmp_path / "cpu-built/1", {"skipped": "tensorrt not installed"})
    provenance(tmp_path / "other-gpu/1", {"plan": "a100-sm80-trt10.0.plan"})
    provenance(tmp_path / "current/1", {"plan": "l4-sm89-trt10.1.plan"})
    (tmp_path / "current/1/plans").mkdir()
    (tmp_path / "current/1/plans/l4-sm89-trt10.1.plan").write_bytes(b"plan")
    provenance(tmp_path / "decoder/1", {"skipped": "decoder uses ONNX Runtime contrib operators"})
    provenance(tmp_path / "superseded/1", {"skipped": "tensorrt not installed"})
    (tmp_path / "superseded/2").mkdir()  # the newest version was built without a TensorRT stage
    stale = stale_versions(tmp_path, "l4-sm89-trt10.1")
    assert sorted(f"{p.parent.name}/{p.name}" for p in stale) == ["cpu-built/1", "other-gpu/1"]
