"""The record a serving process keeps of a sampled request's spans: what :mod:`appliance.tracing` writes and
:mod:`appliance.trace_export` reads (the two sides of the socket to the span export process)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

StepRecord = tuple[str, int, int, "Mapping[str, Any] | None", "str | None"]
"""A finished step: its name, start and end (ns since the epoch), attributes, and the error's class name if it
failed."""

SpanRecord = tuple[bytes, int, "int | None", str, int, int, "str | None", list[StepRecord], tuple[Any, ...]]
"""A finished request: trace id (16 bytes), span id, the client's span id (``None``: a new trace), the client's
``tracestate``, start, end (ns), the error status's description (``None``: status unset), its steps, and what the
span's name and attributes are made of (:data:`REQUEST_FIELDS`, in that order). Plain values only, few and
unnamed, so that recording costs the serving process little; each is packed with msgpack as it ends."""

REQUEST_FIELDS = ("http.request.method", "http.route", "url.path", "appliance.request_id",
                  "http.response.status_code", "appliance.lane", "appliance.model", "appliance.version",
                  "appliance.place", "appliance.route.reason", "appliance.route.kind", "appliance.cache",
                  "appliance.queue_s", "appliance.compute_s", "appliance.batch_size", "appliance.tenant",
                  "error.type", "appliance.tokens.prompt", "appliance.tokens.completion", "appliance.cost",
                  "appliance.cost_avoided")
"""The attributes of a request's span, in the order of a record's last field; an empty string, a ``None`` or a
zero ``cost_avoided`` is left out (a model's version, place and the tokens and cost are kept as they are)."""


def request_attributes(fields: Iterable[Any]) -> list[tuple[str, Any]]:
    """A request span's attributes, in order, from a record's last field (:data:`REQUEST_FIELDS`), less those
    left out."""
    return [(name, value) for name, value in zip(REQUEST_FIELDS, fields, strict=True)
            if value is not None and value != "" and not (name == "appliance.cost_avoided" and not value)]
