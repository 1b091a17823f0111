"""Bad input gets a 4xx that says what to change, never a 5xx; a request that could never succeed is not called
retryable; work whose client left stops, and the access log says the client left (499)."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
import requests

from appliance.keys import KeyStore
from conftest import RunningServer, make_config
from waiting import wait_until

ADD_ONE = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def mixed(minilm_repo, standard_repo, smollm2_repo, tmp_path_factory):
    """A server with a tensor model, an embedding model and the exact generation tier."""
    repo = tmp_path_factory.mktemp("mixed-repo")
    shutil.copytree(minilm_repo / "minilm-l6", repo / "minilm-l6")
    shutil.copytree(standard_repo / "add_one", repo / "add_one")
    (repo / "smollm2-135m").symlink_to(smollm2_repo / "smollm2-135m")
    running = RunningServer(make_config(repo, tmp_path_factory.mktemp("mixed-state"))).start()
    yield running
    running.stop()


def access_lines(server: RunningServer) -> list[dict]:
    return [json.loads(line) for line in server.access_log.getvalue().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("body, field", [
    ({**ADD_ONE, "parameters": 1}, "the request.parameters"),
    ({**ADD_ONE, "parameters": "x"}, "the request.parameters"),
    ({"inputs": [{**ADD_ONE["inputs"][0], "parameters": [1]}]}, "inputs[0].parameters"),
    ({**ADD_ONE, "outputs": [{"name": "OUTPUT0", "parameters": 7}]}, "outputs[0].parameters"),
])
def test_tensor_parameters_that_are_not_objects_are_400(mixed, body, field):
    response = requests.post(f"{mixed.url}/v2/models/add_one/infer", json=body, timeout=10)
    assert response.status_code == 400 and f"{field} must be an object" in response.json()["error"]


def test_embedding_tensors_outside_the_vocabulary_or_of_two_shapes_are_400(mixed):
    def infer(ids: list[list[int]], mask: list[list[int]]) -> requests.Response:
        tensors = [{"name": "input_ids", "shape": [len(ids), len(ids[0])], "datatype": "INT64",
                    "data": sum(ids, [])},
                   {"name": "attention_mask", "shape": [len(mask), len(mask[0])], "datatype": "INT64",
                    "data": sum(mask, [])}]
        return requests.post(f"{mixed.url}/v2/models/minilm-l6/infer", json={"inputs": tensors}, timeout=30)

    good = infer([[101, 2023, 102]], [[1, 1, 1]])
    assert good.status_code == 200
    outside = infer([[101, 10_000_000, 102]], [[1, 1, 1]])
    assert outside.status_code == 400 and "outside the vocabulary" in outside.json()["error"]
    negative = infer([[101, -5, 102]], [[1, 1, 1]])
    assert negative.status_code == 400 and "token id -5" in negative.json()["error"]
    shapes = infer([[101, 2023, 102]], [[1, 1]])
    assert shapes.status_code == 400 and "the same shape" in shapes.json()["error"]


def raw_request(port: int, head: bytes) -> bytes:
    """Send bytes as they are (headers no client library would send) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_id_that_is_not_printable_ascii_or_too_long_is_replaced(mixed):
    answer = raw_request(mixed.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-request-id: caf\xc3\xa9-\xff\xfe\r\n"
                                     b"Connection: close\r\n\r\n")
    head = answer.split(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 200")
    replaced = next(line for line in head.splitlines() if line.startswith("x-request-id:")).split(":", 1)[1].strip()
    assert replaced and replaced.isascii() and "caf" not in replaced
    long = requests.get(f"{mixed.url}/v2/health/live", headers={"x-request-id": "r" * 129}, timeout=10)
    assert long.status_code == 200 and long.headers["x-request-id"] != "r" * 129
    kept = requests.get(f"{mixed.url}/v2/health/live", headers={"x-request-id": "r" * 128}, timeout=10)
    assert kept.headers["x-request-id"] == "r" * 128
    wait_until(lambda: any(line.get("request_id") == replaced for line in access_lines(mixed)), 10,
               "the replaced id's access log line")


def test_the_largest_embeddings_request_the_api_takes_succeeds_on_an_idle_server(mixed):
    response = requests.post(f"{mixed.url}/v1/embeddings", json={"model": "minilm-l6", "input": ["a b"] * 2048},
                             timeout=300)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2048


def running_sequences(server: RunningServer) -> float:
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    line = next(line for line in metrics.splitlines()
                if line.startswith('appliance_running_sequences{model="smollm2-135m"'))
    return float(line.split()[-1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_whose_client_left_stops_and_is_logged_499(mixed, stream):
    request_id = f"left-{'stream' if stream else 'whole'}"
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": stream}
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", mixed.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"x-request-id: " + request_id.encode() + b"\r\nContent-Length: " + str(len(payload)).encode()
                     + b"\r\n\r\n" + payload)
        wait_until(lambda: running_sequences(mixed) == 1, 60, "the generation to start")
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    left = time.monotonic()
    wait_until(lambda: running_sequences(mixed) == 0, 10, "the abandoned generation to stop")
    assert time.monotonic() - left < 10
    line = wait_until(lambda: next((entry for entry in access_lines(mixed) if entry.get("request_id") == request_id),
                                   None), 10, "the access log line")
    assert line["status"] == 499


def test_v2_metadata_config_and_ready_honour_the_keys_model_list(standard_repo, tmp_path):
    state = tmp_path / "state"
    _, token = KeyStore(state / "keys.json").create(name="narrow", tenant="t", models=("add_one",))
    running = RunningServer(make_config(standard_repo, state)).start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        for suffix in ("", "/ready", "/config", "/versions/1", "/versions/1/ready", "/versions/1/config"):
            allowed = requests.get(f"{running.url}/v2/models/add_one{suffix}", headers=headers, timeout=10)
            assert allowed.status_code == 200, suffix
            other = requests.get(f"{running.url}/v2/models/int_double{suffix}", headers=headers, timeout=10)
            assert other.status_code == 403 and "may not call model 'int_double'" in other.json()["error"], suffix
            unknown = requests.get(f"{running.url}/v2/models/no-such{suffix}", headers=headers, timeout=10)
            assert unknown.status_code == 403, suffix  # as for inference: nothing is told of models outside the list
    finally:
        running.stop()


def test_token_id_input_needs_a_key_that_opted_in(minilm_repo, tmp_path):
    state = tmp_path / "state"
    store = KeyStore(state / "keys.json")
    _, texts_only = store.create(name="texts", tenant="t")
    _, ids_too = store.create(name="ids", tenant="t", token_input=True)
    running = RunningServer(make_config(minilm_repo, state)).start()
    try:
        def embed(token: str, value: object) -> requests.Response:
            return requests.post(f"{running.url}/v1/embeddings", json={"model": "minilm-l6", "input": value},
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30)

        refused = embed(texts_only, [[101, 7592, 102]])
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
        assert "check_embedding_ctx_length=False" in refused.json()["error"]["message"]
        assert embed(texts_only, ["hello"]).status_code == 200
        assert embed(ids_too, [[101, 7592, 102]]).status_code == 200
    finally:
        running.stop()
