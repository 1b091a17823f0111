"""One error class per failure, each with its HTTP status; mapped to a JSON body in ``appliance.api.errors``."""

from __future__ import annotations


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
