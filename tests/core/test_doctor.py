"""`appliance doctor` on this machine: a table, a fix for each failure, a non-zero exit when anything fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import free_port

from appliance.doctor import FAIL, OK, Check, check_gpu, format_table
from appliance.gpu_telemetry import DriverInfo, GpuReading

CHECKS = ("python", "packages", "gpu", "config", "onnxruntime providers", "model repository", "engines",
          "cache disk space", "cache dir writable", "model repository writable", "port", "api keys")


def doctor(repo: Path, state: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo), "APPLIANCE_PATHS_STATE_DIR": str(state),
               "APPLIANCE_SERVER_PORT": str(free_port()), **env}
    return subprocess.run([sys.executable, "-m", "appliance.cli", "doctor"], env=environ, capture_output=True,
                          text=True, timeout=120)


def rows(output: str) -> dict[str, str]:
    """check name -> status, from the table."""
    found = {}
    for line in output.splitlines():
        for name in CHECKS:
            rest = line[len(name):]
            if line.startswith(name) and rest[:2] == "  " and rest.split()[0] in ("OK", "WARN", "FAIL"):
                found[name] = rest.split()[0]
    return found


def test_doctor_passes_on_this_machine(standard_repo, tmp_path):
    result = doctor(standard_repo, tmp_path / "state")
    assert result.returncode == 0, result.stdout + result.stderr
    statuses = rows(result.stdout)
    assert set(statuses) == set(CHECKS), result.stdout
    assert FAIL not in statuses.values()
    assert "0 failed" in result.stdout


def test_binding_beyond_loopback_fails_with_a_fix_because_there_are_no_keys(standard_repo, tmp_path):
    result = doctor(standard_repo, tmp_path / "state", APPLIANCE_SERVER_HOST="0.0.0.0")
    assert result.returncode == 1
    assert rows(result.stdout)["api keys"] == FAIL
    assert "appliance keys create" in result.stdout and 'server.host = "127.0.0.1"' in result.stdout


def test_binding_beyond_loopback_passes_once_an_admin_key_exists(standard_repo, tmp_path):
    from appliance.keys import KeyStore

    KeyStore(tmp_path / "state" / "keys.json").create(name="ops", tenant="ops", admin=True)
    result = doctor(standard_repo, tmp_path / "state", APPLIANCE_SERVER_HOST="0.0.0.0")
    assert rows(result.stdout)["api keys"] == OK, result.stdout


def test_a_port_taken_by_another_program_fails(standard_repo, tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = doctor(standard_repo, tmp_path / "state", APPLIANCE_SERVER_PORT=str(port))
    assert result.returncode == 1
    assert rows(result.stdout)["port"] == FAIL and "in use by another program" in result.stdout
    assert f"sport = :{port}" in result.stdout


def test_a_bad_config_is_a_failure_naming_the_field(standard_repo, tmp_path):
    result = doctor(standard_repo, tmp_path / "state", APPLIANCE_SERVER_LOG_LEVEL="loud")
    assert result.returncode == 1
    assert rows(result.stdout)["config"] == FAIL and "server.log_level = 'loud'" in result.stdout


def test_a_broken_model_fails_and_an_empty_repository_only_warns(tmp_path, standard_repo):
    broken = tmp_path / "repo" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.toml").write_text("[batching]\nmax_batch_size = 'many'\n")
    result = doctor(tmp_path / "repo", tmp_path / "state")
    assert result.returncode == 1 and rows(result.stdout)["model repository"] == FAIL
    assert "broken v1" in result.stdout and "fix: fix the model.toml" in result.stdout
    empty = doctor(tmp_path / "nothing", tmp_path / "state")
    assert empty.returncode == 0 and rows(empty.stdout)["model repository"] == "WARN"
    assert "appliance build --defaults" in empty.stdout


def test_gpu_versions_come_from_the_probe():
    reading = GpuReading(0, "NVIDIA L4", 0.25, 3 * 2**30, 24 * 2**30, 51.0, 72.5)
    checks = check_gpu(lambda: DriverInfo(driver="550.54.15", cuda="12.4", gpus=["NVIDIA L4"]), lambda: [reading])
    gpu = checks[0]
    assert gpu.status == OK and "NVIDIA L4" in gpu.detail and "driver 550.54.15" in gpu.detail
    assert "CUDA (driver API) 12.4" in gpu.detail
    assert [c.name for c in checks] == ["gpu", "gpu 0", "gpu device nodes", "tensorrt"]
    assert checks[1].detail == "NVIDIA L4: 25% busy, memory 3.0 of 24.0 GiB, 51 C, 72 W"


def test_table_puts_a_fix_under_each_failure():
    text = format_table([Check("a", OK, "fine"), Check("bb", FAIL, "broken", "do this")])
    assert "\nbb     FAIL    broken\n               fix: do this\n" in text
    assert "1 failed, 0 warnings, 1 ok" in text
