"""The OpenAPI document matches the routes the server really has, and the bodies its parsers really take."""

from __future__ import annotations

import jsonschema
import pytest
import requests

from appliance import validation
from appliance.api.bodies import (FIELD_RULES, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                  parse_embedding_request, parse_generate)
from appliance.api.openapi import build_openapi
from appliance.app import create_app
from appliance.config import load_config
from appliance.errors import BadRequest


def test_every_route_is_documented_and_every_documented_route_exists():
    app = create_app(load_config(None, {}))
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info()
        routes.add((info.get("path") or info.get("formatter"), route.method.lower()))
    documented = {(path, method) for path, operations in build_openapi()["paths"].items() for method in operations}
    assert routes == documented


def test_served_document(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert "/v2/models/{model}/infer" in document["paths"]
    for operations in document["paths"].values():
        for operation in operations.values():
            assert operation["responses"]


# -- the request bodies are the parsers' definitions ---------------------------------------------------------------

PARSERS = {"/v1/chat/completions": lambda body: parse_generate(body, chat=True),
           "/v1/completions": lambda body: parse_generate(body, chat=False),
           "/v1/embeddings": parse_embedding_request}
MINIMAL = {"/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
           "/v1/completions": {"model": "m", "prompt": "hi"},
           "/v1/embeddings": {"model": "e", "input": "hi"}}


def _validator(document: dict, path: str) -> jsonschema.Draft202012Validator:
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_request_bodies_are_generated_from_the_parsers_definitions():
    document = build_openapi()
    generated: dict = {}
    for path, definition in {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                             "/v1/embeddings": EmbeddingRequest}.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == validation.json_schema(definition, generated)
    for definition, rules in FIELD_RULES.items():  # the rules between fields join the generated definitions
        generated[definition.__name__] = {**generated[definition.__name__], "allOf": rules}
    assert {name: document["components"]["schemas"][name] for name in generated} == generated
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("path", PARSERS)
def test_documented_fields_are_the_fields_the_parser_takes(path):
    schema = _validator(build_openapi(), path).schema
    schema = schema["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    parse, minimal = PARSERS[path], MINIMAL[path]
    assert schema["additionalProperties"] is False
    for name in schema["properties"]:
        try:
            parse({**minimal, name: minimal.get(name)})
        except BadRequest as exc:
            assert not exc.message.startswith("unknown"), name
    with pytest.raises(BadRequest, match="^unknown"):
        parse({**minimal, "undocumented": 1})
    for name in schema["required"]:
        with pytest.raises(BadRequest) as caught:
            parse({key: value for key, value in minimal.items() if key != name})
        assert caught.value.param == name


ACCEPTED = {
    "/v1/chat/completions": [
        {"model": "m", "messages": [{"role": "system", "content": "be brief", "name": "ops"},
                                    {"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]},
                                    {"role": "developer", "content": ""}, {"role": "assistant", "content": []}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8, "max_tokens": 9,
         "temperature": 0, "top_p": 0.9, "top_k": 40, "seed": -5, "ignore_eos": True, "stop": ["a", "b"],
         "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 20,
         "user": "u", "timeout": 0.5, "n": 1},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": None, "temperature": None,
         "top_p": None, "top_k": None, "seed": None, "stop": None, "stream_options": None, "user": None,
         "timeout": None, "top_logprobs": None, "max_completion_tokens": None},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "."},
    ],
    "/v1/completions": [
        {"model": "m", "prompt": " "}, {"model": "m", "prompt": ["one"]}, {"model": "m", "prompt": [1, 2, 3]},
        {"model": "m", "prompt": "x", "max_tokens": 2.0, "seed": -3e2, "top_k": 1e1, "n": 1.0},
        {"model": "m", "prompt": "x", "logprobs": 5, "stop": [], "stream": False, "seed": 2**63 - 1},
    ],
    "/v1/embeddings": [
        {"model": "e", "input": ["a", "b"]}, {"model": "e", "input": [1, 2]}, {"model": "e", "input": [[1], []]},
        {"model": "e", "input": "x", "encoding_format": "base64", "dimensions": 64, "truncate": True, "user": "u",
         "timeout": 3},
    ],
}


@pytest.mark.parametrize("path,body", [(path, body) for path, bodies in ACCEPTED.items() for body in bodies])
def test_bodies_the_parser_accepts_fit_the_document(path, body):
    PARSERS[path](body)
    _validator(build_openapi(), path).validate(body)


REFUSED = {
    "/v1/chat/completions": [{"extra": 1}, {"model": ""}, {"messages": []}, {"messages": [{"role": "tool",
                                                                                         "content": "x"}]},
                             {"messages": [{"role": "user", "content": 5}]},
                             {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                             {"n": 0}, {"n": 129}, {"max_tokens": 0}, {"max_tokens": 1.5}, {"temperature": 2.5},
                             {"top_p": 0},
                             {"top_k": -1}, {"stop": ["a"] * 5}, {"stop": ""}, {"stream": "yes"}, {"logprobs": 1},
                             {"logprobs": True, "top_logprobs": 21}, {"user": 5}, {"timeout": 0},
                             {"stream": True, "stream_options": {"include_usage": True, "chunk": 1}},
                             {"stream_options": {"include_usage": True}}, {"logprobs": False, "top_logprobs": 2},
                             {"top_logprobs": 0}, {"max_tokens": 2.5}, {"seed": -9223372036854775809}],
    "/v1/completions": [{"prompt": ["a", [1]]}, {"prompt": [[1], []]}, {"prompt": []}, {"prompt": [True]},
                        {"logprobs": 6}, {"seed": 2**63},
                        {"prompt": ""}, {"prompt": [""]}, {"stream": False, "stream_options": {}}],
    "/v1/embeddings": [{"input": []}, {"input": [1, "a"]}, {"input": [["a"]]}, {"encoding_format": "int8"},
                       {"dimensions": 0}, {"truncate": "yes"}, {"model": None}],
}


@pytest.mark.parametrize("path,change", [(path, change) for path, changes in REFUSED.items() for change in changes])
def test_bodies_refused_for_a_field_type_are_refused_by_the_document(path, change):
    body = {**MINIMAL[path], **change}
    with pytest.raises(BadRequest):
        PARSERS[path](body)
    assert not _validator(build_openapi(), path).is_valid(body)


def test_error_bodies_are_the_documented_ones(server):
    document = build_openapi()
    for method, path, route, body in [("post", "/v1/embeddings", "/v1/embeddings", {"model": "e"}),
                                      ("post", "/v1/chat/completions", "/v1/chat/completions", {"model": 1}),
                                      ("get", "/v2/models/absent", "/v2/models/{model}", None)]:
        response = requests.request(method, f"{server.url}{path}", json=body, timeout=10)
        assert response.status_code in (400, 404)
        documented = document["paths"][route][method]["responses"][str(response.status_code)]
        schema = documented["content"]["application/json"]["schema"]
        jsonschema.validate(response.json(), {**schema, "components": document["components"]})
        expected = "OpenAIError" if path.startswith("/v1/") else "Error"
        assert schema == {"$ref": f"#/components/schemas/{expected}"}
