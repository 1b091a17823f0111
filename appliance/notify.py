"""systemd's service notification protocol (``sd_notify``), in a few lines of socket code.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket; a leading ``@`` means the abstract
namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). Each message is one datagram of
``KEY=VALUE`` lines: ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1``, ``STOPPING=1``. Without
``NOTIFY_SOCKET`` every call does nothing, so the server runs the same outside systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping

log = logging.getLogger("appliance.notify")


def socket_address(name: str) -> str | bytes:
    """The address to send to: a path, or (for ``@name``) the abstract-namespace name as bytes."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notifications to one socket; a notifier without a socket is a no-op."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()  # the keepalive thread and the event loop may both send

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` / ``WATCHDOG_PID``."""
        environ = os.environ if environ is None else environ
        usec: int | None = None
        pid = environ.get("WATCHDOG_PID", "")
        if not pid or pid == str(os.getpid()):  # the watchdog is meant for this process, not a child that inherited it
            with contextlib.suppress(ValueError):
                usec = int(environ.get("WATCHDOG_USEC", ""))
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the watchdog timeout, as systemd recommends; ``None`` if unset."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def send(self, **fields: str | int) -> bool:
        """Send one message (``ready=1`` becomes ``READY=1``); ``False`` if there is no socket or it failed."""
        if self.address is None:
            return False
        text = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()) + "\n"
        try:
            with self._lock:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(text.encode(), socket_address(self.address))
        except OSError as exc:
            # Never fatal: a missing notification is systemd's problem to time out on, not a reason to stop serving.
            log.warning("could not notify %s (%s): %s", self.address, text.strip().replace("\n", " "), exc)
            return False
        return True

    def status(self, text: str) -> bool:
        """``STATUS=text``: what ``systemctl status`` shows."""
        return self.send(status=text)

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete."""
        return self.send(ready=1, **({"status": status} if status else {}))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1``: a reload started; :meth:`ready` ends it."""
        return self.send(reloading=1, **({"status": status} if status else {}))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutting down."""
        return self.send(stopping=1, **({"status": status} if status else {}))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: still healthy."""
        return self.send(watchdog=1)

    async def watchdog_loop(self) -> None:
        """Ping the watchdog while this event loop runs; a blocked loop stops the pings and systemd restarts us."""
        interval = self.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    @contextlib.contextmanager
    def keepalive(self) -> Iterator[None]:
        """Ping the watchdog from a thread while a long blocking step runs (building the default models)."""
        interval = self.watchdog_interval_s
        if interval is None:
            yield
            return
        done = threading.Event()

        def ping() -> None:
            while not done.wait(interval):
                self.watchdog()

        thread = threading.Thread(target=ping, name="watchdog-keepalive", daemon=True)
        self.watchdog()
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def close(self) -> None:
        """Close the socket (it is reopened by the next :meth:`send`)."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


_process_notifier: Notifier | None = None


def notifier() -> Notifier:
    """This process's notifier, from its environment (read once)."""
    global _process_notifier
    if _process_notifier is None:
        _process_notifier = Notifier.from_environ()
    return _process_notifier
