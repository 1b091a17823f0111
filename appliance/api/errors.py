"""Errors to HTTP, in one place: the JSON body every failure gets, the same error as a server-sent event once a
stream's headers are out, and reading a request body (size limit, undecodable ``Content-Encoding``)."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.web_protocol import RequestPayloadError

from appliance.errors import ApplianceError, BadRequest, PayloadTooLarge, openai_error_type


def _openai_error(status: int, message: str, param: str | None, code: int | None = None) -> dict:
    return {"message": message, "type": openai_error_type(status), "param": param, "code": code}


def error_response(status: int, message: str, retry_after_s: float | None = None, *, openai: bool = False,
                   param: str | None = None) -> web.Response:
    """The JSON error body every failure gets: ``{"error": "..."}``, or OpenAI's error object under ``/v1``."""
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(retry_after_s + 0.999)))
    error: object = _openai_error(status, message, param) if openai else message
    return web.Response(
        status=status, body=orjson.dumps({"error": error}), content_type="application/json", headers=headers
    )


def stream_error(exc: ApplianceError) -> bytes:
    """An error that happened after a stream's headers were sent, as a server-sent event: OpenAI's error object,
    its ``code`` the HTTP status the error would have had before the headers."""
    error = _openai_error(exc.status, exc.message, exc.param, code=exc.status)
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


async def read_body(request: web.Request, limit: int, advice: str) -> bytes:
    """The body, decoded, within ``limit`` bytes; ``advice`` says what to send instead of a body over it."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes, over the limit of {limit}; {advice}")
    try:
        return await request.read()
    except (RequestPayloadError, PayloadEncodingError) as exc:
        if isinstance(exc, PayloadEncodingError) or isinstance(exc.__cause__, PayloadEncodingError):
            encoding = request.headers.get("Content-Encoding", "")
            raise BadRequest(f"the body could not be decoded as Content-Encoding {encoding!r}; send it uncompressed, "
                             "or compressed as the header says (gzip, deflate or br)") from None
        raise BadRequest(f"the body could not be read: {exc}") from None
