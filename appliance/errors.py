"""Every error a client can be told about: one class per failure, each with its HTTP status.

They are turned into HTTP answers in one place, ``appliance.api.errors``; :func:`openai_error_type` is the one table
from status to the ``type`` of an OpenAI error object, for JSON bodies and stream error events alike.
"""

from __future__ import annotations

from typing import Any


class ApplianceError(Exception):
    """Base of every error a client can be told about. ``message`` says what went wrong and what to change."""

    status = 500

    def __init__(self, message: str, *, retry_after_s: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param  # the request field at fault, for OpenAI-style error bodies


class BadRequest(ApplianceError):
    """The request is malformed or does not match the model (400)."""

    status = 400


class Unauthorized(ApplianceError):
    """No API key, or one that is unknown or revoked (401)."""

    status = 401


class Forbidden(ApplianceError):
    """The key is valid but may not do this: a model outside its list, or an admin endpoint (403)."""

    status = 403


class RateLimited(ApplianceError):
    """The key is over its requests or tokens per minute; retry after ``retry_after_s`` (429)."""

    status = 429


class ModelNotFound(ApplianceError):
    """No such model or version in the repository (404)."""

    status = 404


class PayloadTooLarge(ApplianceError):
    """The body is over the configured limit (413)."""

    status = 413


class ModelNotReady(ApplianceError):
    """The model exists but is not loaded or not ready (503)."""

    status = 503


class FeatureDisabled(ApplianceError):
    """The endpoint belongs to a feature this server runs without (for example the cost ledger) (404)."""

    status = 404


class Saturated(ApplianceError):
    """The wait for a local model would be over the lane's maximum; retry after the estimate (429).

    ``waited`` is true when the request spent the lane's wait at the gate already (the estimate was too hopeful):
    it is too late then to send it elsewhere within the lane's budget.
    """

    status = 429
    waited = False


class QueueFull(ApplianceError):
    """The model's queue is full; retry after ``retry_after_s`` (503)."""

    status = 503


class ServerDraining(ApplianceError):
    """The server is shutting down and takes no new requests (503)."""

    status = 503


class DeadlineExceeded(ApplianceError):
    """The request's timeout expired before it could run (504)."""

    status = 504


class ModelLoadFailed(ApplianceError):
    """A model version failed to load or warm up; the previous version, if any, keeps serving (400, as Triton)."""

    status = 400


class EngineFailed(ApplianceError):
    """The engine raised while running this request (500)."""

    status = 500


class WorkersDiverged(ApplianceError):
    """A model-control request succeeded on some worker processes and failed on others (500)."""

    status = 500


class UpstreamUnavailable(ApplianceError):
    """A cloud upstream cannot take or could not answer a call: breaker open, concurrency cap reached, connection
    failure, timeout or 5xx after retries (503). ``retry_after_s`` is the breaker's remaining cooldown, else 1.

    Raised by :class:`appliance.upstreams.Upstream`; the data plane turns it into :class:`UpstreamFailed` for the
    client.
    """

    status = 503


class UpstreamRejected(ApplianceError):
    """A streaming call that the upstream answered with a non-200, non-5xx status (4xx, 429); ``upstream_status``
    is the upstream's and ``result`` holds its answer as it came."""

    status = 502

    def __init__(self, message: str, result: Any) -> None:
        """``result``: the upstream's answer (an :class:`appliance.upstreams.UpstreamResult`)."""
        retry_after = next((value for key, value in result.headers.items() if key.lower() == "retry-after"), "")
        super().__init__(message, retry_after_s=float(retry_after) if retry_after.isdigit() else None)
        self.upstream_status = result.status
        self.result = result


class UpstreamFailed(ApplianceError):
    """A request the appliance sent to a cloud upstream (overflow, failover or routing) failed there: refused,
    unreachable, or answered with an error (502). The message names the upstream and says the request may be
    retried; the upstream's own status never reaches the client as if it were the appliance's."""

    status = 502


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def openai_error_type(status: int) -> str:
    """The ``type`` of OpenAI's error object for an HTTP status."""
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
