"""Several server processes on one port: who the siblings are, and how model control reaches all of them.

Each worker is a whole server (its own event loop, models and batchers) accepting on the shared port through
SO_REUSEPORT, plus a private Unix socket in the group's control folder. A model-control request (load, unload)
is applied by the worker that received it, then forwarded to every sibling over those sockets, so that all
workers serve the same versions.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import aiohttp

FANOUT_HEADER = "x-appliance-fanout"


@dataclass(frozen=True)
class WorkerGroup:
    """This process's place in a group of workers."""

    index: int
    count: int
    control_dir: Path

    def socket(self, index: int) -> Path:
        """The private control socket of worker ``index``."""
        return self.control_dir / f"worker-{index}.sock"

    def notify_socket(self, index: int) -> Path:
        """The supervisor's datagram socket on which worker ``index`` reports READY=1 (systemd's protocol)."""
        return self.control_dir / f"notify-{index}.sock"

    def siblings(self) -> list[int]:
        """The other workers' indexes."""
        return [i for i in range(self.count) if i != self.index]


async def forward_to_siblings(group: WorkerGroup, path: str, timeout_s: float) -> list[str]:
    """POST ``path`` to every sibling; returns one message per sibling that did not answer 200.

    A sibling that is still starting (its socket not yet listening) is waited for, up to ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def forward(index: int) -> str | None:
        while True:
            connector = aiohttp.UnixConnector(path=str(group.socket(index)))
            try:
                async with aiohttp.ClientSession(connector=connector) as session:
                    async with session.post(
                        f"http://worker{path}", headers={FANOUT_HEADER: "1"}, json={},
                        timeout=aiohttp.ClientTimeout(total=max(deadline - loop.time(), 1.0)),
                    ) as response:
                        if response.status == 200:
                            return None
                        body = await response.json(content_type=None)
                        return f"worker {index}: {body.get('error', response.status)}"
            except aiohttp.ClientConnectorError as exc:
                if loop.time() >= deadline:
                    return f"worker {index}: unreachable ({exc})"
                await asyncio.sleep(0.2)  # still starting: its control socket appears once its models are warm
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                return f"worker {index}: unreachable ({exc or type(exc).__name__})"

    results = await asyncio.gather(*(forward(i) for i in group.siblings()))
    return [message for message in results if message]
