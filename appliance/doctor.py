"""`appliance doctor`: check this machine, the install and the configuration, and say how to fix what fails.

Each check gives OK, WARN (works, but not as well as it could) or FAIL (the appliance will not work as configured),
with a fix for every WARN and FAIL. The exit status is 1 when anything fails.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
import socket
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.auth import is_loopback
from appliance.config import Config, ConfigError
from appliance.gpu_telemetry import DriverInfo, GpuReading, open_nvml
from appliance.keys import KeyStore, KeyStoreError
from appliance.reload import ConfigSource

MIN_PYTHON = (3, 11)
MIN_FREE_CACHE_BYTES = 2 * 1024**3  # the default models, their sources and optimized copies, with room to spare
OK, WARN, FAIL = "OK", "WARN", "FAIL"
GPU_PACKAGES = "/opt/appliance/venv/bin/pip install 'onnxruntime-gpu>=1.17' 'tensorrt>=10' 'cuda-python>=12'"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


def nvml_probe() -> DriverInfo | None:
    """Driver, CUDA driver API version and GPU names from NVML; ``None`` without a driver."""
    reader = open_nvml()
    if reader is None:
        return None
    try:
        return reader.driver()
    finally:
        reader.close()


def gpu_readings() -> list[GpuReading]:
    """Each GPU's utilization, memory, temperature and power now; empty without a driver."""
    reader = open_nvml()
    if reader is None:
        return []
    try:
        return reader.read()
    finally:
        reader.close()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> list[Check]:
    """The interpreter and the packages the appliance declares."""
    version = ".".join(map(str, sys.version_info[:3]))
    recent = sys.version_info >= MIN_PYTHON
    checks = [Check("python", OK if recent else FAIL, f"{version} ({sys.executable})",
                    "" if recent else "install Python 3.11 or newer and reinstall the appliance")]
    requires = importlib.metadata.requires("appliance") or []
    missing, found = [], []
    for requirement in requires:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].split("[")[0]
        for separator in "<>=!~ ":
            name = name.split(separator)[0]
        installed = _version(name)
        (found if installed else missing).append(f"{name} {installed}" if installed else name)
    checks.append(Check("packages", FAIL if missing else OK,
                        f"missing: {', '.join(missing)}" if missing else f"{len(found)} required packages installed",
                        "reinstall: /opt/appliance/venv/bin/pip install --force-reinstall <the appliance wheel or "
                        "source>" if missing else ""))
    return checks


def check_onnxruntime(config: Config) -> list[Check]:
    """The ONNX Runtime build and which of the preferred execution providers it offers."""
    try:
        import onnxruntime
    except ImportError as exc:
        return [Check("onnxruntime", FAIL, f"does not import: {exc}", "reinstall the appliance's packages")]
    names = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
    available = onnxruntime.get_available_providers()
    usable = [p for p in config.onnxruntime.providers if names[p] in available]
    detail = f"{onnxruntime.__version__}; providers here: {', '.join(available)}; used: {', '.join(usable) or 'none'}"
    if not usable:
        return [Check("onnxruntime providers", FAIL, detail,
                      'add "cpu" to onnxruntime.providers in /etc/appliance/config.toml')]
    if usable[0] != config.onnxruntime.providers[0]:
        return [Check("onnxruntime providers", WARN, detail,
                      f"{config.onnxruntime.providers[0]} is preferred but not offered: on a GPU machine install "
                      f"the GPU packages ({GPU_PACKAGES}); on a CPU-only machine this is expected")]
    return [Check("onnxruntime providers", OK, detail)]


def check_gpu(probe: Callable[[], DriverInfo | None] = nvml_probe,
              readings: Callable[[], list[GpuReading]] = gpu_readings) -> list[Check]:
    """GPU, driver, CUDA and TensorRT versions (NVML where the driver is installed)."""
    info = probe()
    tensorrt = _version("tensorrt")
    ort_gpu = _version("onnxruntime-gpu")
    if info is None:
        if ort_gpu or tensorrt:
            return [Check("gpu", WARN, "GPU packages installed but no NVIDIA driver answers (NVML not found)",
                          "install the NVIDIA driver (nvidia-smi must work), then restart the appliance")]
        return [Check("gpu", OK, "no NVIDIA driver: CPU only")]
    checks = [Check("gpu", OK if info.gpus else WARN,
                    f"{', '.join(info.gpus) or 'no GPU'}; driver {info.driver}; CUDA (driver API) {info.cuda}",
                    "" if info.gpus else "check nvidia-smi: the driver sees no GPU")]
    for reading in readings():
        checks.append(Check(f"gpu {reading.index}", OK,
                            f"{reading.name}: {reading.utilization:.0%} busy, memory {reading.memory_used_bytes / 2**30:.1f}"
                            f" of {reading.memory_total_bytes / 2**30:.1f} GiB, {reading.temperature_c:.0f} C, "
                            f"{reading.power_w:.0f} W"))
    nodes = sorted(str(p) for p in Path("/dev").glob("nvidia*"))
    checks.append(Check("gpu device nodes", OK if nodes else FAIL, ", ".join(nodes) or "no /dev/nvidia* nodes",
                        "" if nodes else "load the driver (modprobe nvidia nvidia_uvm) or run nvidia-modprobe"))
    checks.append(Check("tensorrt", OK if tensorrt and ort_gpu else WARN,
                        f"tensorrt {tensorrt or 'not installed'}; onnxruntime-gpu {ort_gpu or 'not installed'}",
                        "" if tensorrt and ort_gpu else f"install the GPU packages ({GPU_PACKAGES}), then "
                                                        "systemctl restart appliance (the build unit makes the plans)"))
    return checks


def check_models(config: Config) -> list[Check]:
    """The repository: present, every newest version readable, engine plans current for this machine."""
    from appliance.model_spec import read_model_spec
    from appliance.repository import scan_repository

    root = config.paths.models()
    found = scan_repository(root)
    if not found:
        return [Check("model repository", WARN, f"{root} has no models",
                      "run `appliance build --defaults` (or the first start builds them; it needs network access "
                      "to PyPI), or set paths.model_repository")]
    bad = []
    for name, versions in found.items():
        try:
            read_model_spec(name, versions[-1], root / name / str(versions[-1]))
        except ConfigError as exc:
            bad.append(f"{name} v{versions[-1]}: {exc}")
    checks = [Check("model repository", FAIL if bad else OK,
                    "; ".join(bad) if bad else f"{root}: {len(found)} models ({', '.join(found)})",
                    "fix the model.toml named above, or remove that version folder" if bad else "")]
    from appliance.build.refresh import stale_versions
    from appliance.engines.tensorrt_plans import current_plan_key

    checks.extend(_runtime_checks(root, found, config))
    key = current_plan_key()
    if key is None:
        checks.append(Check("engines", OK, "no TensorRT here: models run through ONNX Runtime"))
    else:
        stale = stale_versions(root, key)
        checks.append(Check("engines", FAIL if stale else OK,
                            f"missing plans for {key}: {', '.join(f'{p.parent.name} v{p.name}' for p in stale)}"
                            if stale else f"plans current for {key}",
                            "run `appliance build --refresh` (systemctl start appliance-build)" if stale else ""))
    return checks


def _runtime_checks(root: Path, found: dict[str, list[int]], config: Config) -> list[Check]:
    """Per model, the runtime its newest version would run on here and why (a version that cannot load fails)."""
    from appliance.engine_factory import choose_runtime_quietly
    from appliance.errors import ApplianceError
    from appliance.model_spec import read_model_spec

    checks = []
    for name, versions in found.items():
        try:
            spec = read_model_spec(name, versions[-1], root / name / str(versions[-1]))
            checks.append(Check(f"runtime {name}", OK, choose_runtime_quietly(spec, config).summary))
        except ConfigError:
            continue  # reported by the repository check
        except ApplianceError as exc:
            checks.append(Check(f"runtime {name}", FAIL, exc.message,
                                "run `appliance build --refresh` (systemctl start appliance-build), or set "
                                "[engine] kind = 'auto' in its model.toml"))
    return checks


def _nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(config: Config) -> list[Check]:
    """Free space and write access where the cache and the repository live."""
    cache = config.paths.cache()
    where = _nearest_existing(cache)
    free = shutil.disk_usage(where).free
    checks = [Check("cache disk space", OK if free >= MIN_FREE_CACHE_BYTES else FAIL,
                    f"{free / 1024**3:.1f} GiB free at {where} (for {cache})",
                    "" if free >= MIN_FREE_CACHE_BYTES else
                    f"free at least {MIN_FREE_CACHE_BYTES // 1024**3} GiB there, or set paths.cache_dir elsewhere")]
    for label, path in (("cache dir", cache), ("model repository", config.paths.models())):
        target = _nearest_existing(path)
        writable = os.access(target, os.W_OK)
        checks.append(Check(f"{label} writable", OK if writable else FAIL, f"{path} (checked at {target})",
                            "" if writable else f"make {target} writable by the user running the appliance "
                                                "(the service runs as user appliance)"))
    return checks


def check_port(config: Config) -> list[Check]:
    """Whether ``server.host:server.port`` can be bound (or is already the appliance's)."""
    host, port = config.server.host, config.server.port
    if port == 0:
        return [Check("port", OK, "server.port = 0: an ephemeral port is chosen at start")]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return [Check("port", OK, f"{host}:{port} is free")]
        except OSError as exc:
            problem = exc
    if problem.errno == errno.EADDRINUSE and _appliance_answers(host, port):
        return [Check("port", OK, f"{host}:{port}: the appliance is serving there")]
    if problem.errno == errno.EADDRINUSE:
        return [Check("port", FAIL, f"{host}:{port} is in use by another program",
                      f"stop that program (ss -ltnp 'sport = :{port}' names it) or set server.port")]
    return [Check("port", FAIL, f"cannot bind {host}:{port}: {problem.strerror}",
                  "set server.host to an address of this machine (127.0.0.1 for local clients only)")]


def _appliance_answers(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        with urllib.request.urlopen(f"http://{target}:{port}/v2/health/live", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def check_keys(config: Config) -> list[Check]:
    """The key store is valid and private; beyond loopback, at least one active key exists."""
    store = KeyStore(config.paths.keys())
    try:
        keys = store.load()
    except KeyStoreError as exc:
        return [Check("api keys", FAIL, str(exc), f"fix or remove {store.path} (appliance keys list shows it)")]
    checks = []
    if store.path.exists() and store.path.stat().st_mode & 0o077:
        checks.append(Check("api keys", FAIL, f"{store.path} is readable by other users",
                            f"chmod 600 {store.path}"))
    host = config.server.host
    admins = sum(1 for key in store.keys() if key.active and key.admin)
    if is_loopback(host) and not len(keys):
        checks.append(Check("api keys", OK, f"bound to loopback ({host}) without keys: local callers only, and "
                                            "each is treated as the operator"))
    elif not len(keys):
        checks.append(Check("api keys", FAIL, f"server.host = {host!r} accepts remote callers, and {store.path} has "
                                              "no active key; the server refuses to start",
                            "appliance keys create --name NAME --tenant TENANT (add --admin for an operator key), "
                            'or set server.host = "127.0.0.1"'))
    else:
        detail = f"{len(keys)} active keys ({admins} admin); every caller must send one"
        checks.append(Check("api keys", OK if admins else WARN, detail,
                            "" if admins else "no admin key: model control and cache purge are refused; create one "
                                              "with appliance keys create --admin"))
    return checks


def run_checks(source: ConfigSource, gpu_probe: Callable[[], DriverInfo | None] = nvml_probe) -> list[Check]:
    """Every check, in the order of the report."""
    checks = check_python()
    try:
        config = source.load()
    except ConfigError as exc:
        checks.append(Check("config", FAIL, str(exc), "edit the setting named above (appliance config shows the "
                                                       "effective values once it loads)"))
        config = None
    checks += check_gpu(gpu_probe)
    if config is None:
        return checks
    checks.append(Check("config", OK, config.source))
    for group in (check_onnxruntime, check_models, check_disk, check_port, check_keys):
        try:
            checks += group(config)
        except Exception as exc:  # noqa: BLE001 - a broken check is a finding, not a crash of the doctor
            checks.append(Check(group.__name__.removeprefix("check_"), FAIL, f"{type(exc).__name__}: {exc}",
                                "report this output to support"))
    return checks


def format_table(checks: list[Check]) -> str:
    """A plain-text table: check, status, detail, and a fix under each WARN or FAIL."""
    width = max([len("check")] + [len(c.name) for c in checks])
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    for check in checks:
        lines.append(f"{check.name:<{width}}  {check.status:<6}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<{width}}  {'':<6}  fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"\n{failed} failed, {warned} warnings, {len(checks) - failed - warned} ok")
    return "\n".join(lines) + "\n"


def run_doctor(source: ConfigSource) -> int:
    """Print the report; 1 when any check failed, else 0."""
    checks = run_checks(source)
    sys.stdout.write(format_table(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
