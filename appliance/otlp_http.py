"""OTLP/HTTP: POSTs an encoded ``ExportTraceServiceRequest`` (:mod:`appliance.otlp_encoding`) to a collector.

The SDK's ``OTLPSpanExporter`` takes only its own span objects and keeps its way of sending bytes private, so the
export process sends what it encodes itself, reading the settings every OpenTelemetry exporter reads, as the SDK
does: ``OTEL_EXPORTER_OTLP_TRACES_*``, else ``OTEL_EXPORTER_OTLP_*``, for ``HEADERS`` (``k=v,k2=v2``,
URL-encoded), ``TIMEOUT`` (seconds, 10 by default), ``COMPRESSION`` (``gzip``, ``deflate`` or ``none``),
``CERTIFICATE`` (the CA bundle to trust), ``CLIENT_CERTIFICATE`` and ``CLIENT_KEY`` (mutual TLS). The endpoint is
``[tracing] endpoint``. A refused export is retried while the collector says it may pass later (408, 429, 502,
503, 504 or no connection), with exponential backoff, until the timeout; then its spans are dropped and the next
is sent.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import requests

RETRYABLE = frozenset({408, 429, 502, 503, 504})  # the statuses the OTLP spec says to retry
FIRST_BACKOFF_S = 1.0
log = logging.getLogger("appliance.tracing")


def _setting(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or None


@dataclass(frozen=True)
class OtlpHttpSettings:
    """Where and how an export is sent."""

    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    compression: str = "none"
    certificate: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None

    @classmethod
    def from_environment(cls, endpoint: str, environ: Mapping[str, str] = os.environ) -> OtlpHttpSettings:
        """The settings for ``endpoint`` from the ``OTEL_EXPORTER_OTLP_*`` environment (unusable values are
        warned of and replaced by the defaults, as the SDK's exporter does)."""
        from opentelemetry.util.re import parse_env_headers

        headers = parse_env_headers(_setting(environ, "HEADERS") or "", liberal=True)
        timeout_s = 10.0
        if (timeout := _setting(environ, "TIMEOUT")) is not None:
            try:
                timeout_s = float(timeout)
            except ValueError:
                log.warning("tracing: OTLP timeout %r is not a number of seconds; using 10", timeout)
        compression = (_setting(environ, "COMPRESSION") or "none").strip().lower()
        if compression not in ("none", "gzip", "deflate"):
            log.warning("tracing: OTLP compression %r is not gzip, deflate or none; sending uncompressed", compression)
            compression = "none"
        return cls(endpoint, headers, timeout_s, compression, _setting(environ, "CERTIFICATE"),
                   _setting(environ, "CLIENT_CERTIFICATE"), _setting(environ, "CLIENT_KEY"))


class OtlpHttpSender:
    """Sends encoded exports to one collector over a kept-alive connection."""

    def __init__(self, settings: OtlpHttpSettings, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._session = session or requests.Session()
        self._session.headers.update({"Content-Type": "application/x-protobuf", **settings.headers})
        if settings.compression != "none":
            self._session.headers["Content-Encoding"] = settings.compression
        self._session.verify = settings.certificate or True
        if settings.client_certificate:
            self._session.cert = ((settings.client_certificate, settings.client_key) if settings.client_key
                                  else settings.client_certificate)
        self._sleep, self._clock = sleep, clock

    def send(self, body: bytes) -> bool:
        """POST one export; whether the collector took it (retried while it may, within the timeout)."""
        settings = self.settings
        if settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=1)
        elif settings.compression == "deflate":
            body = zlib.compress(body, 1)
        deadline = self._clock() + settings.timeout_s
        backoff = FIRST_BACKOFF_S
        while True:
            left = deadline - self._clock()
            try:
                response = self._session.post(settings.endpoint, data=body, timeout=max(left, 0.001))
            except requests.RequestException as exc:
                why, wait = type(exc).__name__, None
                if not isinstance(exc, requests.ConnectionError | requests.Timeout):
                    log.warning("tracing: an OTLP export failed: %s; its spans are dropped", why)
                    return False
            else:
                if response.ok:
                    return True
                why, wait = f"HTTP {response.status_code}", _retry_after(response)
                if response.status_code not in RETRYABLE:
                    log.warning("tracing: the collector refused an export (%s: %s); its spans are dropped", why,
                                response.text[:200])
                    return False
            wait = wait if wait is not None else backoff * (0.5 + random.random())
            if self._clock() + wait >= deadline:
                log.warning("tracing: the collector did not take an export within %g s (%s); its spans are dropped",
                            settings.timeout_s, why)
                return False
            self._sleep(wait)
            backoff *= 2

    def close(self) -> None:
        """Close the connection."""
        self._session.close()


def _retry_after(response: requests.Response) -> float | None:
    """A ``Retry-After`` given in seconds (a date is ignored: the backoff applies)."""
    try:
        return max(float(response.headers["Retry-After"]), 0.0)
    except (KeyError, ValueError):
        return None
