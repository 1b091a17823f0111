"""POST /v1/embeddings and GET /v1/models with the openai client, parity over HTTP, limits and their messages."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import requests

from conftest import RunningServer, make_config
from reference_data import reference_items


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return reference_items("minilm-l6-v2")


@pytest.fixture(scope="module")
def embed_server(minilm_repo, standard_repo, tmp_path_factory):
    import shutil

    repo = tmp_path_factory.mktemp("embed-repo")
    shutil.copytree(minilm_repo / "minilm-l6", repo / "minilm-l6")
    shutil.copytree(standard_repo / "add_one", repo / "add_one")
    running = RunningServer(make_config(repo, tmp_path_factory.mktemp("embed-state"))).start()
    yield running
    running.stop()


@pytest.fixture()
def client(embed_server):
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused", max_retries=0)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_client_float_and_base64(client, reference):
    texts = [item["text"] for item in reference[:3]]
    as_float = client.embeddings.create(model="minilm-l6", input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model="minilm-l6", input=texts)  # the client asks for base64 and decodes
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert as_float.model == "minilm-l6" and len(as_float.data[0].embedding) == 384
    for a, b in zip(as_float.data, as_base64.data):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-6)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > 0


def test_base64_on_the_wire_is_little_endian_float32(embed_server):
    body = {"model": "minilm-l6", "input": "base64 please", "encoding_format": "base64"}
    payload = requests.post(f"{embed_server.url}/v1/embeddings", json=body, timeout=30).json()
    vector = np.frombuffer(base64.b64decode(payload["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_parity_with_reference_through_http(client, reference):
    items = reference
    together = client.embeddings.create(model="minilm-l6", input=[i["text"] for i in items], encoding_format="float")
    for item, datum in zip(items, together.data):
        assert cosine(datum.embedding, item["embedding"]) >= 0.9999, item["text"][:40]
    for item in items[:4]:  # one at a time too: the batch a request lands in never changes its answer
        alone = client.embeddings.create(model="minilm-l6", input=item["text"], encoding_format="float")
        assert cosine(alone.data[0].embedding, item["embedding"]) >= 0.9999
    assert together.usage.prompt_tokens == sum(i["tokens_untruncated"] for i in items)


def test_token_id_inputs(client, embed_server, reference):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(next(embed_server.config.paths.models().glob("minilm-l6/*/tokenizer.json"))))
    item = reference[0]
    ids = tokenizer.encode(item["text"]).ids
    single = client.embeddings.create(model="minilm-l6", input=ids, encoding_format="float")
    assert cosine(single.data[0].embedding, item["embedding"]) >= 0.9999
    several = client.embeddings.create(model="minilm-l6", input=[ids, ids[:3] + ids[-1:]], encoding_format="float")
    assert len(several.data) == 2 and several.usage.prompt_tokens == len(ids) + 4


def test_models_list(client):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"minilm-l6", "add_one"}
    assert listed["minilm-l6"].owned_by == "appliance"


def test_long_input_is_refused_with_numbers_unless_truncation_is_asked(client, embed_server):
    long_text = " ".join(["word"] * 300)
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model="minilm-l6", input=["short", long_text])
    message = str(error.value)
    assert "input[1] has 302 tokens" in message and "limit of 256" in message and "truncate" in message
    body = {"model": "minilm-l6", "input": ["short", long_text], "truncate": True}
    response = requests.post(f"{embed_server.url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 3 + 256


BAD_REQUESTS = [
    ({"input": "x"}, "'model' is required", "model"),
    ({"model": "minilm-l6"}, "'input' must be", "input"),
    ({"model": "minilm-l6", "input": []}, "'input' must be", "input"),
    ({"model": "minilm-l6", "input": [1, "a"]}, "'input' must be", "input"),
    ({"model": "minilm-l6", "input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"model": "minilm-l6", "input": "x", "dimensions": 64}, "does not support fewer dimensions", "dimensions"),
    ({"model": "minilm-l6", "input": "x", "dimensions": 0}, "positive integer", "dimensions"),
    ({"model": "minilm-l6", "input": "x", "colour": "red"}, "unknown field 'colour'", "colour"),
    ({"model": "minilm-l6", "input": [[101, 99999999]]}, "outside the vocabulary", "input"),
    ({"model": "minilm-l6", "input": [[]]}, "input[0] is an empty token array", "input"),
    ({"model": "minilm-l6", "input": "x", "truncate": "yes"}, "truncate must be", "truncate"),
    ({"model": "add_one", "input": "x"}, "not an embedding model", "model"),
]


@pytest.mark.parametrize("body,message,param", BAD_REQUESTS, ids=[b[1][:24] for b in BAD_REQUESTS])
def test_bad_requests_are_400_in_openai_shape(embed_server, body, message, param):
    response = requests.post(f"{embed_server.url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_unknown_model_and_user_field(client, embed_server):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    ok = requests.post(f"{embed_server.url}/v1/embeddings", json={"model": "minilm-l6", "input": "x", "user": "u1"},
                       timeout=30)
    assert ok.status_code == 200
    assert requests.post(f"{embed_server.url}/v1/embeddings", data=b"{", timeout=30).status_code == 400


def test_full_queue_is_503_with_retry_after_and_deadline_is_504(minilm_repo, server_factory, tmp_path):
    import concurrent.futures
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(minilm_repo / "minilm-l6", repo / "minilm-l6")
    toml = repo / "minilm-l6" / "1" / "model.toml"
    toml.write_text(toml.read_text().replace("[batching]\n", "[batching]\nmax_queue_size = 8\n"))
    running = server_factory(repo)
    body = {"model": "minilm-l6", "input": [" ".join(["queue"] * 200)] * 8}

    def post(payload):
        return requests.post(f"{running.url}/v1/embeddings", json=payload, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, [body] * 6))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queued" in refused.json()["error"]["message"]
    late = post({"model": "minilm-l6", "input": [" ".join(["late"] * 200)] * 8, "timeout": 0.001})
    assert late.status_code == 504 and "timed out" in late.json()["error"]["message"]
