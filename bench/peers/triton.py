"""Run a real NVIDIA Triton Inference Server as a benchmark peer, on CPU.

The ``tritonserver`` binary comes from the ``nvidia-pytriton`` wheel, installed
into a private virtual environment under a cache folder (never into the
project's own environment).  The server is started directly on a generated
model repository holding one tiny Python-backend model, ``add_one``
(``OUTPUT0 = INPUT0 + 1``, FP32, per-item shape ``[4]``, dynamic batching on),
so clients send tensors of shape ``[-1, 4]``.

Smoke run::

    python3 bench/peers/triton.py [--cache-dir DIR] [--port PORT]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PYTRITON_VERSION = "0.7.0"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "appliance-bench"
DEFAULT_MODEL = "add_one"
MAX_BATCH_SIZE = 64

# Prints what the backend stub needs to know about the venv's interpreter, and
# fails if the install is incomplete (so a broken venv gets rebuilt).
_PROBE = """
import importlib.metadata, json, sys, sysconfig
import numpy
assert importlib.metadata.version("nvidia-pytriton") == sys.argv[1]
print(json.dumps({
    "purelib": sysconfig.get_paths()["purelib"],
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
    "version": "%d.%d" % sys.version_info[:2],
}))
"""

# Loopback requests must never go through an HTTP proxy from the environment.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclasses.dataclass(frozen=True)
class _Install:
    """Paths of a ready pytriton venv that starting ``tritonserver`` needs."""

    venv: Path
    binary: Path
    wheel_libs: Path
    python_libdir: Path

    @property
    def backends(self) -> Path:
        """The backend directory holding the Python backend and its stub."""
        return self.binary.parent.parent / "backends"


def _inspect(venv: Path) -> _Install:
    """Check ``venv`` is a complete pytriton install; raise if it is not."""
    python = venv / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c", _PROBE, PYTRITON_VERSION],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    info = json.loads(out)
    if not info["shared"]:
        raise RuntimeError(
            f"{python} is not built with a shared libpython, which the Triton "
            "Python backend stub links against"
        )
    site = Path(info["purelib"])
    dist = site / "pytriton" / "tritonserver"
    install = _Install(
        venv=venv,
        binary=dist / "bin" / "tritonserver",
        wheel_libs=site / "nvidia_pytriton.libs",
        python_libdir=Path(info["libdir"]),
    )
    # The wheel ships one backend stub per Python version; the backend looks
    # for it next to libtriton_python.so, so put the matching one there.
    stub_src = dist / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
    stub_dst = install.backends / "python" / "triton_python_backend_stub"
    if not stub_src.is_file():
        raise RuntimeError(f"nvidia-pytriton has no backend stub for Python {info['version']}")
    if not stub_dst.is_file():
        shutil.copy2(stub_src, stub_dst)
    for exe in (install.binary, stub_dst):
        exe.chmod(exe.stat().st_mode | 0o111)
    return install


def _ensure(cache_dir: Path) -> _Install:
    """Create or reuse the pytriton venv under ``cache_dir``; see ensure_triton_venv."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    venv = cache_dir / f"pytriton-{PYTRITON_VERSION}"
    with open(cache_dir / f"pytriton-{PYTRITON_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        if venv.exists():
            try:
                return _inspect(venv)
            except (OSError, ValueError, RuntimeError, subprocess.SubprocessError):
                shutil.rmtree(venv)
        print(
            f"[triton] installing nvidia-pytriton=={PYTRITON_VERSION} into {venv} ...", flush=True
        )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # Only the bundled server binary is used, so pytriton's own Python
        # dependencies (tritonclient, grpcio, ...) are skipped; the model needs
        # numpy, and pytriton 0.7.0 pins numpy < 2.
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                f"nvidia-pytriton=={PYTRITON_VERSION}",
                "numpy<2",
            ],
            check=True,
        )
        return _inspect(venv)


def ensure_triton_venv(cache_dir: Path) -> Path:
    """Make sure a working pytriton venv exists and return its ``tritonserver``.

    The venv lives at ``cache_dir / "pytriton-0.7.0"`` and is built with the
    current interpreter the first time (or again if it is found broken).
    """
    return _ensure(cache_dir).binary


_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
dynamic_batching {{ }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

_MODEL_PY = '''\
"""Triton Python-backend model: OUTPUT0 = INPUT0 + 1."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Adds one to every element of a [batch, 4] FP32 tensor."""

    def execute(self, requests):
        """Answer each request of a (dynamically batched) list in order."""
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x + np.float32(1)).astype(np.float32, copy=False)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", y)])
            )
        return responses
'''


def write_model_repository(root: Path, model_name: str = DEFAULT_MODEL) -> None:
    """Write a model repository at ``root`` with one Python-backend add-one model."""
    model_dir = root / model_name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        _CONFIG.format(name=model_name, max_batch=MAX_BATCH_SIZE)
    )
    (model_dir / "1" / "model.py").write_text(_MODEL_PY)


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of the server log."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _is_ready(url: str) -> bool:
    """Return True when ``url`` answers HTTP 200."""
    try:
        with _LOCAL_HTTP.open(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the server, then SIGKILL its process group after ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # The server runs in its own session; this also reaps leftover stubs.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def run_triton(
    cache_dir: Path,
    http_port: int,
    model_name: str = DEFAULT_MODEL,
    *,
    start_timeout: float = 120.0,
    stop_timeout: float = 15.0,
) -> Iterator[str]:
    """Run ``tritonserver`` serving ``model_name`` and yield its HTTP base URL.

    HTTP listens on ``127.0.0.1:http_port``; gRPC and metrics get free ports.
    Raises RuntimeError, with the end of the server log, if the model is not
    ready within ``start_timeout`` seconds.
    """
    install = _ensure(cache_dir)
    with tempfile.TemporaryDirectory(prefix="triton-peer-") as tmp:
        repo = Path(tmp) / "models"
        write_model_repository(repo, model_name)
        log = Path(tmp) / "tritonserver.log"
        base = f"http://127.0.0.1:{http_port}"

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        # The backend stub links libpython (from the venv's base interpreter)
        # and the wheel's vendored libraries; its embedded interpreter finds
        # the venv (and so numpy) through the first ``python3`` on PATH.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p
            for p in (
                str(install.python_libdir),
                str(install.wheel_libs),
                env.get("LD_LIBRARY_PATH"),
            )
            if p
        )
        env["PATH"] = os.pathsep.join((str(install.venv / "bin"), env.get("PATH", os.defpath)))

        shm_prefix = f"appliance_triton_{os.getpid()}_{http_port}_"
        cmd = [
            str(install.binary),
            f"--model-repository={repo}",
            f"--backend-directory={install.backends}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={_free_port()}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={_free_port()}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",  # no CUDA here: skip the warning
            # Shared-memory region names must differ between servers that run
            # at the same time, or their Python backends collide.
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--exit-timeout-secs={max(1, int(stop_timeout) - 2)}",
        ]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
                start_new_session=True,
            )
        try:
            ready_url = f"{base}/v2/models/{model_name}/ready"
            deadline = time.monotonic() + start_timeout
            while not _is_ready(ready_url):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited with code {proc.returncode} during start:\n"
                        + _log_tail(log)
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tritonserver not ready after {start_timeout:.0f}s:\n{_log_tail(log)}"
                    )
                time.sleep(0.2)
            yield base
        finally:
            _stop(proc, stop_timeout)
            # A server that dies early can leave its backend's regions behind.
            for region in Path("/dev/shm").glob(f"{shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()


def _main() -> int:
    """Start Triton, send one KServe v2 infer request, print the answer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    args = parser.parse_args()

    data = [float(i) for i in range(8)]
    body = {"inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "FP32", "data": data}]}
    started = time.monotonic()
    with run_triton(args.cache_dir, args.port or _free_port()) as base:
        print(f"[triton] ready at {base} after {time.monotonic() - started:.1f}s", flush=True)
        request = urllib.request.Request(
            f"{base}/v2/models/{DEFAULT_MODEL}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with _LOCAL_HTTP.open(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    print(json.dumps(answer))
    got = answer["outputs"][0]["data"]
    ok = got == [x + 1 for x in data]
    print("[triton] OK: OUTPUT0 == INPUT0 + 1" if ok else "[triton] MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_main())
