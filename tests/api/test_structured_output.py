"""Structured output by constrained decoding (llguidance), through HTTP with the openai SDK: json_schema (strict)
and json_object answers always parse, cut answers say "length", unsupported schemas get 400, and constrained rows
share decode steps with unconstrained ones without changing them."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest
import requests

from conftest import RunningServer, make_config
from reference_data import reference_items

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
    "capital": {"type": "boolean"},
    "languages": {"type": "array", "items": {"type": "string", "enum": ["French", "English", "German", "other"]},
                  "minItems": 1, "maxItems": 3}},
    "required": ["city", "population", "capital", "languages"]}
ASK = [{"role": "user", "content": "Describe Paris as JSON: its name, population, whether it is a capital, and its "
                                   "languages."}]


@pytest.fixture(scope="module")
def so_server(smollm2_repo, tmp_path_factory):
    running = RunningServer(make_config(smollm2_repo, tmp_path_factory.mktemp("so-state"))).start()
    yield running
    running.stop()


@pytest.fixture()
def client(so_server):
    return openai.OpenAI(base_url=f"{so_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def city_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": strict}}


def test_a_hundred_sampled_answers_on_the_small_tier_all_follow_the_schema(client):
    def one(seed: int) -> tuple[str, str]:
        reply = client.chat.completions.create(model="smollm2-135m-fast", messages=ASK, temperature=1.0,
                                               seed=seed, max_tokens=120, response_format=city_format())
        return reply.choices[0].finish_reason, reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(100)))
    for finish, content in answers:
        assert finish == "stop", content
        value = json.loads(content)
        jsonschema.validate(value, CITY)
        assert set(value) == set(CITY["properties"])  # strict: no property beyond those named
    assert len({content for _, content in answers}) > 10  # sampled, not one answer repeated


def test_each_of_n_sampled_choices_follows_the_schema_with_its_own_grammar_state(client):
    reply = client.chat.completions.create(model="smollm2-135m-fast", messages=ASK, temperature=1.0, seed=3, n=4,
                                           max_tokens=120, response_format=city_format())
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), CITY)
    assert len({c.message.content for c in reply.choices}) > 1


def test_json_object_parses_and_a_cut_answer_says_length(client):
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Reply with a JSON object whose key answer "
                                                                     "holds the capital of France."}],
        temperature=0, max_tokens=200, response_format={"type": "json_object"},
        extra_body={"response_format": {"type": "json_object"}})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    cut = client.chat.completions.create(model="smollm2-135m", messages=ASK, temperature=0, max_tokens=3,
                                         response_format=city_format())
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


def test_a_streamed_constrained_answer_joins_into_valid_json(client):
    stream = client.chat.completions.create(model="smollm2-135m", messages=ASK, temperature=0, max_tokens=120,
                                            response_format=city_format(), stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), CITY)


@pytest.mark.parametrize("response_format,message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}}},
     "look-around"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "colour"}}},
     "Unknown format"),
    ({"type": "json_schema"}, 'needs json_schema: {"name": NAME'),
    ({"type": "xml"}, "response_format must be"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "response_format must be"),
])
def test_a_schema_the_engine_cannot_compile_gets_400_naming_why(so_server, response_format, message):
    body = {"model": "smollm2-135m", "messages": ASK, "response_format": response_format}
    answer = requests.post(f"{so_server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["param"] == "response_format"


def test_constrained_and_free_rows_share_steps_without_changing_the_free_answer(client):
    item = next(i for i in reference_items("smollm2-135m-instruct") if "messages" in i)

    def free() -> str:
        reply = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], temperature=0,
                                               max_tokens=48, extra_body={"ignore_eos": True})
        return reply.choices[0].message.content

    def constrained() -> str:
        reply = client.chat.completions.create(model="smollm2-135m", messages=ASK, temperature=0, max_tokens=120,
                                               response_format=city_format())
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        frees = [pool.submit(free) for _ in range(2)]
        constraineds = [pool.submit(constrained) for _ in range(2)]
        answers = [f.result() for f in frees]
        for f in constraineds:
            jsonschema.validate(json.loads(f.result()), CITY)
    assert answers == [item["greedy_text"]] * 2  # the exact tier is batch-invariant: as if alone
