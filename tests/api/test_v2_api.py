"""KServe v2 over real HTTP: tritonclient in JSON and binary modes, msgpack, metadata, errors, metrics, access log."""

from __future__ import annotations

import json
import struct

import msgpack
import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


@pytest.fixture()
def client(server):
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=10)
    yield c
    c.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_batched_float(client, binary):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = triton.InferInput("INPUT0", [3, 4], "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    result = client.infer("add_one", [tensor], outputs=[triton.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data + 1)
    assert result.get_response()["model_name"] == "add_one"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_int64_and_version_route(client, binary):
    data = np.array([[1, -2, 3], [2**40, 5, 6]], dtype=np.int64)
    tensor = triton.InferInput("IDS", [2, 3], "INT64")
    tensor.set_data_from_numpy(data, binary_data=binary)
    result = client.infer("int_double", [tensor], model_version="1",
                          outputs=[triton.InferRequestedOutput("DOUBLED", binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy("DOUBLED"), data * 2)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_two_inputs_two_outputs(client, binary):
    a = np.array([[1.5, 2.0]], dtype=np.float32)
    b = np.array([[0.5, 4.0]], dtype=np.float32)
    inputs = [triton.InferInput("A", [1, 2], "FP32"), triton.InferInput("B", [1, 2], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    result = client.infer("two_io", inputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("SUM"), a + b)
    np.testing.assert_array_equal(result.as_numpy("DIFF"), a - b)
    assert result.get_response()["id"] == "req-7"


def test_requested_output_subset(client):
    inputs = [triton.InferInput("A", [1, 2], "FP32"), triton.InferInput("B", [1, 2], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    result = client.infer("two_io", inputs, outputs=[triton.InferRequestedOutput("DIFF")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["DIFF"]


def test_tritonclient_metadata_readiness_and_config(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("add_one")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_model_metadata("add_one")
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["versions"] == ["1"]
    fixed = client.get_model_metadata("fixed")
    assert fixed["inputs"][0]["shape"] == [2, 2]
    config = client.get_model_config("add_one")
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


def test_unbatched_model(server):
    body = {"inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32", "data": [[1, 0], [0, 1]]}]}
    response = requests.post(f"{server.url}/v2/models/fixed/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1, 2, 3, 4]


def test_msgpack_round_trip(server):
    data = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    body = msgpack.packb({"id": "m1", "inputs": [{"name": "INPUT0", "shape": [5, 4], "datatype": "FP32",
                                                  "data": data.tobytes()}]})
    response = requests.post(f"{server.url}/v2/models/add_one/infer", data=body,
                             headers={"Content-Type": "application/msgpack"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/msgpack")
    decoded = msgpack.unpackb(response.content)
    assert decoded["id"] == "m1"
    output = decoded["outputs"][0]
    array = np.frombuffer(output["data"], dtype="<f4").reshape(output["shape"])
    np.testing.assert_array_equal(array, data + 1)


def test_msgpack_errors_are_json(server):
    response = requests.post(f"{server.url}/v2/models/add_one/infer", data=b"\xc1garbage",
                             headers={"Content-Type": "application/msgpack"}, timeout=10)
    assert response.status_code == 400
    assert "msgpack" in response.json()["error"]


def _post(server, path, **kwargs):
    return requests.post(f"{server.url}{path}", timeout=10, **kwargs)


INFER = "/v2/models/add_one/infer"
GOOD_INPUT = {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
BAD_INPUTS = [
    ("not json", {"data": b"{nope"}, 400, "not valid JSON"),
    ("no inputs", {"json": {"inputs": []}}, 400, "non-empty"),
    ("wrong datatype", {"json": {"inputs": [{**GOOD_INPUT, "datatype": "INT32"}]}}, 400,
     "expected datatype FP32, received INT32"),
    ("unknown datatype", {"json": {"inputs": [{**GOOD_INPUT, "datatype": "FLOAT"}]}}, 400, "unknown datatype"),
    ("wrong shape", {"json": {"inputs": [{**GOOD_INPUT, "shape": [1, 3], "data": [1, 2, 3]}]}}, 400,
     "expected shape [-1,4]"),
    ("batch too big", {"json": {"inputs": [{**GOOD_INPUT, "shape": [65, 4], "data": [0] * 260}]}}, 400,
     "batch size 1 to 64"),
    ("element count", {"json": {"inputs": [{**GOOD_INPUT, "data": [1, 2, 3]}]}}, 400, "needs 4 elements"),
    ("non-numeric data", {"json": {"inputs": [{**GOOD_INPUT, "data": ["a", "b", "c", "d"]}]}}, 400,
     "does not convert"),
    ("unknown input", {"json": {"inputs": [{**GOOD_INPUT, "name": "NOPE"}]}}, 400, "unknown input 'NOPE'"),
    ("duplicate input", {"json": {"inputs": [GOOD_INPUT, GOOD_INPUT]}}, 400, "appears twice"),
    ("negative dim", {"json": {"inputs": [{**GOOD_INPUT, "shape": [-1, 4]}]}}, 400, "non-negative"),
    ("unknown output", {"json": {"inputs": [GOOD_INPUT], "outputs": [{"name": "X"}]}}, 400, "unknown output 'X'"),
    ("bad timeout", {"json": {"inputs": [GOOD_INPUT], "parameters": {"timeout": "soon"}}}, 400, "microseconds"),
    ("binary header too long", {"data": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}, 400,
     "Inference-Header-Content-Length"),
    ("binary header not int", {"data": b"{}", "headers": {"Inference-Header-Content-Length": "x"}}, 400,
     "must be an integer"),
]


@pytest.mark.parametrize("case,kwargs,status,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(server, case, kwargs, status, message):
    response = _post(server, INFER, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_binary_size_mismatch(server):
    header = json.dumps({"inputs": [{**{k: v for k, v in GOOD_INPUT.items() if k != "data"},
                                     "parameters": {"binary_data_size": 12}}]}).encode()
    body = header + np.zeros(3, np.float32).tobytes()
    response = _post(server, INFER, data=body, headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400
    assert "needs 16 bytes, received 12" in response.json()["error"]


def test_unknown_model_version_and_route(server):
    body = {"inputs": [GOOD_INPUT]}
    assert _post(server, "/v2/models/nope/infer", json=body).status_code == 404
    response = _post(server, "/v2/models/add_one/versions/7/infer", json=body)
    assert response.status_code == 404
    assert "version 7" in response.json()["error"]
    assert _post(server, "/v2/models/add_one/versions/x/infer", json=body).status_code in (400, 404)
    missing = requests.get(f"{server.url}/v2/nothing/here", timeout=10)
    assert missing.status_code == 404
    assert "error" in missing.json()
    wrong_method = requests.get(f"{server.url}{INFER}", timeout=10)
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()


def test_body_over_limit_is_413(server_factory, standard_repo):
    small = server_factory(standard_repo, server={"max_body_bytes": 2048})
    body = {"inputs": [{**GOOD_INPUT, "shape": [64, 4], "data": [1.0] * 256}]}
    response = requests.post(f"{small.url}{INFER}", data=json.dumps(body).encode() * 3, timeout=10)
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["error"]
    chunked = requests.post(f"{small.url}{INFER}", data=iter([b"x" * 1500, b"y" * 1500]), timeout=10)
    assert chunked.status_code == 413
    assert "error" in chunked.json()


def test_bytes_tensor_binary_encoding():
    from appliance.api import v2_codec

    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    header = json.dumps({"inputs": [{"name": "S", "shape": [3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    parsed = v2_codec.decode_json(header + raw, len(header))
    assert parsed.inputs["S"].tolist() == [b"ab", b"", b"xyz"]
    body, length = v2_codec.encode_json("m", 1, None, {"S": ("BYTES", parsed.inputs["S"])}, {"S"})
    assert body[length:] == raw


def test_request_id_metrics_and_access_log(server):
    response = _post(server, INFER, json={"inputs": [GOOD_INPUT]}, headers={"x-request-id": "trace-abc"})
    assert response.headers["x-request-id"] == "trace-abc"
    assert _post(server, INFER, json={"inputs": []}).headers["x-request-id"]
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    for name in (
        'appliance_requests_total{model="add_one",status="200",version="1"}',
        "appliance_request_duration_seconds_bucket",
        "appliance_queue_duration_seconds_bucket",
        "appliance_compute_duration_seconds_bucket",
        "appliance_batch_size_bucket",
        'appliance_requests_in_flight{model="add_one",version="1"}',
        'appliance_model_load_duration_seconds{model="add_one",version="1"}',
        'appliance_model_warmup_duration_seconds{model="add_one",version="1"}',
    ):
        assert name in metrics, name
    server.call(_flush_access_log, server)
    lines = [json.loads(line) for line in server.access_log.getvalue().splitlines()]
    mine = [line for line in lines if line["request_id"] == "trace-abc"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["model"] == "add_one" and entry["version"] == "1" and entry["status"] == 200
    assert entry["total_ms"] >= entry["queue_ms"] >= 0 and entry["compute_ms"] > 0
    assert "data" not in json.dumps(entry) and "1, 2, 3, 4" not in server.access_log.getvalue()


async def _flush_access_log(server):
    from appliance.api.state import ACCESS_LOG

    server.app[ACCESS_LOG].flush()


def test_tritonclient_reports_errors(client):
    tensor = triton.InferInput("INPUT0", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match="expected shape"):
        client.infer("add_one", [tensor])


def test_example_repository_and_alias(server_factory):
    from pathlib import Path

    example = server_factory(Path(__file__).resolve().parents[2] / "examples" / "models")
    body = {"inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))}]}
    for name in ("add_one", "plus-one"):
        response = requests.post(f"{example.url}/v2/models/{name}/infer", json=body, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["model_name"] == "add_one"
        assert response.json()["outputs"][0]["data"] == [float(i + 1) for i in range(8)]
