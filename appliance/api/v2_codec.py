"""KServe v2 (Open Inference Protocol) bodies: JSON, Triton's binary tensor extension, and msgpack.

- JSON: tensors as (flat or nested) JSON arrays.
- Binary extension: the JSON header is the first ``Inference-Header-Content-Length`` bytes; each input whose
  ``parameters.binary_data_size`` is set takes that many raw bytes, in order, from the rest. Outputs are returned
  raw when asked (``binary_data`` on the output, or ``binary_data_output`` on the request).
- msgpack (``application/msgpack``): the same structure, with ``data`` as raw little-endian bytes (or a list).

BYTES tensors are length-prefixed (4-byte little-endian) in raw form, as Triton does.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import orjson

from appliance.engines.tensors import V2_TO_NUMPY
from appliance.errors import BadRequest

BINARY_HEADER = "Inference-Header-Content-Length"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


@dataclass(slots=True)
class ParsedInfer:
    """An infer body, decoded: inputs as arrays, the outputs wanted and how to send them back."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    binary_outputs: set[str]
    binary_default: bool
    timeout_us: int | None


def _whole(value: Any) -> int | None:
    """``value`` as an int when it is a number without a fraction (``2`` or ``2.0``, as JSON Schema counts
    integers; a float from 2**53 on may be a rounded integer literal, and is not one), else None."""
    if type(value) is int:  # the usual case, first
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else None


def _check_header(header: Any) -> dict:
    if not isinstance(header, dict):
        raise BadRequest("the request body must be a JSON object with an 'inputs' array")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty array of tensors")
    return header


def _shape_and_dtype(tensor: Any, index: int) -> tuple[str, list[int], str, np.dtype]:
    if not isinstance(tensor, dict):
        raise BadRequest(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] needs a 'name' string")
    given = tensor.get("shape")
    shape = [_whole(d) for d in given] if isinstance(given, list) else None
    if shape is None or not all(d is not None and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: 'shape' must be an array of non-negative integers, received {given!r}")
    datatype = tensor.get("datatype")
    dtype = V2_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(V2_TO_NUMPY)}")
    return name, shape, datatype, dtype


def _from_list(name: str, data: Any, shape: list[int], datatype: str, dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    try:
        if datatype == "BYTES":
            flat = np.array(
                [item.encode() if isinstance(item, str) else bytes(item) for item in _flatten(data)], dtype=object
            )
        else:
            flat = np.asarray(data, dtype=dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"input {name!r}: data does not convert to {datatype}: {exc}") from None
    if flat.size != count:
        raise BadRequest(f"input {name!r}: shape {shape} needs {count} elements, received {flat.size}")
    return flat.reshape(shape)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _from_bytes(name: str, raw: bytes | memoryview, shape: list[int], datatype: str, dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items, offset, view = [], 0, memoryview(raw)
        while offset < len(view):
            if offset + 4 > len(view):
                raise BadRequest(f"input {name!r}: truncated BYTES element length at byte {offset}")
            (length,) = struct.unpack_from("<I", view, offset)
            offset += 4
            if offset + length > len(view):
                raise BadRequest(f"input {name!r}: BYTES element at byte {offset} runs past the data")
            items.append(bytes(view[offset : offset + length]))
            offset += length
        if len(items) != count:
            raise BadRequest(f"input {name!r}: shape {shape} needs {count} elements, received {len(items)}")
        return np.array(items, dtype=object).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input {name!r}: shape {shape} of {datatype} needs {expected} bytes, received {len(raw)}"
        )
    return np.frombuffer(raw, dtype=_LITTLE_ENDIAN[dtype]).reshape(shape)


_LITTLE_ENDIAN = {dtype: dtype.newbyteorder("<") for dtype in V2_TO_NUMPY.values()}  # the wire's byte order


def _requested_outputs(header: dict) -> tuple[list[str] | None, set[str]]:
    outputs = header.get("outputs")
    if outputs is None:
        return None, set()
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be an array of {name, parameters} objects")
    names, binary = [], set()
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{index}] needs a 'name' string")
        names.append(item["name"])
        if _parameters(item, f"outputs[{index}]").get("binary_data"):
            binary.add(item["name"])
    return names, binary


def _parameters(holder: dict, where: str) -> dict:
    """``holder["parameters"]``: an object, or absent."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}.parameters must be an object (name to value), not {params!r:.40}")
    return params


def _request_parameters(header: dict) -> tuple[bool, int | None]:
    params = _parameters(header, "the request")
    given = params.get("timeout")
    timeout = _whole(given)
    if given is not None and (timeout is None or timeout < 0):
        raise BadRequest(f"parameters.timeout is in microseconds and must be a non-negative integer, not {given!r}")
    return bool(params.get("binary_data_output", False)), timeout or None


def _request_id(header: dict) -> str | None:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    return request_id


def decode_json(body: bytes, header_length: int | None) -> ParsedInfer:
    """Decode a JSON body, or with ``header_length`` a binary-extension body."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequest(f"{BINARY_HEADER} is {header_length} but the body has {len(body)} bytes")
    head = body if header_length is None else body[:header_length]
    try:
        header = _check_header(orjson.loads(head))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    tail = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(header["inputs"]):
        name, shape, datatype, dtype = _shape_and_dtype(tensor, index)
        if name in inputs:
            raise BadRequest(f"input {name!r} appears twice")
        given = _parameters(tensor, f"inputs[{index}]").get("binary_data_size")
        if given is not None:
            size = _whole(given)
            if size is None or size < 0 or offset + size > len(tail):
                raise BadRequest(f"input {name!r}: binary_data_size {given!r} does not fit the binary data")
            inputs[name] = _from_bytes(name, tail[offset : offset + size], shape, datatype, dtype)
            offset += size
        elif "data" in tensor:
            inputs[name] = _from_list(name, tensor["data"], shape, datatype, dtype)
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(tail):
        raise BadRequest(f"{len(tail) - offset} bytes of binary data are not claimed by any input")
    outputs, binary = _requested_outputs(header)
    binary_default, timeout = _request_parameters(header)
    return ParsedInfer(_request_id(header), inputs, outputs, binary, binary_default, timeout)


def decode_msgpack(body: bytes) -> ParsedInfer:
    """Decode a msgpack body."""
    try:
        header = _check_header(msgpack.unpackb(body, raw=False))
    except (msgpack.UnpackException, ValueError) as exc:
        raise BadRequest(f"the request body is not valid msgpack: {exc}") from None
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(header["inputs"]):
        name, shape, datatype, dtype = _shape_and_dtype(tensor, index)
        data = tensor.get("data")
        if isinstance(data, bytes):
            inputs[name] = _from_bytes(name, data, shape, datatype, dtype)
        elif data is not None:
            inputs[name] = _from_list(name, data, shape, datatype, dtype)
        else:
            raise BadRequest(f"input {name!r} has no 'data'")
    outputs, _ = _requested_outputs(header)
    _, timeout = _request_parameters(header)
    return ParsedInfer(_request_id(header), inputs, outputs, set(), False, timeout)


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            value = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(value)))
            parts.append(value)
        return b"".join(parts)
    little = _LITTLE_ENDIAN.get(array.dtype) or array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> list | np.ndarray:
    if datatype == "BYTES":
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
    if datatype == "FP16":
        return array.reshape(-1).tolist()  # orjson serializes float16 arrays only via lists
    return np.ascontiguousarray(array).reshape(-1)


def encode_json(
    model: str, version: int, request_id: str | None, outputs: dict[str, tuple[str, np.ndarray]], binary: set[str]
) -> tuple[bytes, int | None]:
    """A JSON (or binary-extension) response body and the JSON header's length when any output is binary."""
    described, tails = [], []
    for name, (datatype, array) in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            raw = _raw(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = _json_data(array, datatype)
        described.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": described}
    if request_id is not None:
        response["id"] = request_id
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tails:
        return head, None
    return head + b"".join(tails), len(head)


def encode_msgpack(
    model: str, version: int, request_id: str | None, outputs: dict[str, tuple[str, np.ndarray]]
) -> bytes:
    """A msgpack response body with raw tensor bytes."""
    response: dict[str, Any] = {
        "model_name": model,
        "model_version": str(version),
        "outputs": [
            {"name": name, "datatype": datatype, "shape": list(array.shape), "data": _raw(array, datatype)}
            for name, (datatype, array) in outputs.items()
        ],
    }
    if request_id is not None:
        response["id"] = request_id
    return msgpack.packb(response, use_bin_type=True)
