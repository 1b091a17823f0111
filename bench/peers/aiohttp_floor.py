"""The HTTP stack's own floor, as a benchmark row: a bare aiohttp + uvloop server (the appliance's framework and
event loop, none of the appliance) that reads each POST body to ``/v2/models/add_one/infer`` and answers a fixed
JSON body the size of the appliance's reply.

No server built on this stack can answer faster than this; what the appliance costs above it is its own request
path (keys, cache, admission, the engine hand-off, metrics, ledger, access log), and what a peer is faster than it
by is the framework and the interpreter.

    python bench/peers/aiohttp_floor.py PORT    # serve on 127.0.0.1:PORT until stopped
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import requests

PATH = "/v2/models/add_one/infer"
REPLY = (b'{"model_name":"add_one","model_version":"1","outputs":[{"name":"OUTPUT0","datatype":"FP32",'
         b'"shape":[1,4],"data":[2.0,3.0,4.0,5.0]}]}')


def serve(port: int) -> None:
    """Serve the fixed reply on 127.0.0.1:``port`` until the process is stopped."""
    import uvloop
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/json")

    app = web.Application()
    app.router.add_post(PATH, infer)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@contextlib.contextmanager
def running_floor(port: int, wrapper: tuple[str, ...] = (),
                  start_timeout_s: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """The floor server on ``port`` (under ``wrapper``, valgrind say) until the block ends; yields its base URL and
    process once it answers."""
    from appliance_server import answering  # bench/, on the path of the benchmarks that use this

    process = subprocess.Popen([*wrapper, sys.executable, __file__, str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    with answering(process, lambda: requests.post(url + PATH, data=b"{}", timeout=2).status_code == 200,
                   "the aiohttp floor server", start_timeout_s, stop_timeout_s=10):
        yield url, process


if __name__ == "__main__":
    serve(int(sys.argv[1]))
