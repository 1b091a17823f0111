"""The server's address: checked before any model loads, so that a busy port is one clear line, not a traceback."""

from __future__ import annotations

import errno
import socket

_PORT_SETTING = "--port, server.port or APPLIANCE_SERVER_PORT"
_HOST_SETTING = "--host, server.host or APPLIANCE_SERVER_HOST"


class ListenError(RuntimeError):
    """The server cannot listen on its host and port; the message names them and the setting to change."""


def listen_error(host: str, port: int, exc: OSError) -> ListenError:
    """``exc``, raised by binding ``host``:``port``, as one line that says what to change."""
    where = f"cannot listen on {host}:{port}"
    if isinstance(exc, socket.gaierror):
        return ListenError(f"{where}: {host!r} is not an address or a known host name ({exc.strerror}); "
                           f"set {_HOST_SETTING} to one of this machine's addresses (127.0.0.1: loopback only)")
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"{where}: the port is already in use by another process; stop that process, or "
                           f"choose another port with {_PORT_SETTING}")
    if exc.errno == errno.EACCES:
        return ListenError(f"{where}: permission denied (ports below 1024 need privileges); choose a port above "
                           f"1023 with {_PORT_SETTING}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"{where}: {host} is not an address of this machine; set {_HOST_SETTING} to one "
                           "(127.0.0.1: loopback only, 0.0.0.0: every interface)")
    return ListenError(f"{where}: {exc.strerror or exc}; change {_HOST_SETTING} or {_PORT_SETTING}")


def check_listen(host: str, port: int) -> None:
    """Bind every address ``host`` resolves to on ``port`` and let go again; :class:`ListenError` if one fails.

    This is a probe: another process may still take the port before the server binds it for real, so the server
    turns that bind's error into the same message. Port 0 (any free port) always succeeds and is not probed.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise listen_error(host, port, exc) from None
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        with socket.socket(family, kind, proto) as sock:
            # As the server binds: SO_REUSEADDR lets a port whose old connections are in TIME_WAIT count as free.
            # Without SO_REUSEPORT, so that a port another server's workers share is busy to this one.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise listen_error(host, port, exc) from None
