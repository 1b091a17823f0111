"""Tool calling and structured output with real clients over HTTP: the openai SDK (tool_choice auto, none,
required and named, streamed tool-call deltas, tool turns in the history), langchain-openai (``bind_tools``,
``with_structured_output`` by json_schema and by function calling) and litellm."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest
import requests

from conftest import RunningServer, make_config

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32},
                                            "unit": {"type": "string", "enum": ["C", "F"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def tool_server(smollm2_repo, tmp_path_factory):
    running = RunningServer(make_config(smollm2_repo, tmp_path_factory.mktemp("tools-state"))).start()
    yield running
    running.stop()


@pytest.fixture()
def client(tool_server):
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments


def test_required_named_none_and_auto(client):
    required = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS,
                                              tool_choice="required", temperature=0, max_tokens=80)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call)
    named = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=80)
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"] and named.choices[0].finish_reason == "tool_calls"
    check_call(calls[0])
    none = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=16)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS, temperature=0,
                                          max_tokens=40)
    message = auto.choices[0].message
    assert (message.tool_calls is None) == (auto.choices[0].finish_reason != "tool_calls")
    for call in message.tool_calls or []:
        check_call(call)


def test_streamed_tool_calls_arrive_as_deltas(client):
    stream = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0, max_tokens=80, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += part.id or ""
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_n_streamed_required_calls_each_arrive_as_their_choices_deltas(client):
    stream = client.chat.completions.create(model="smollm2-135m-fast", messages=ASK, tools=TOOLS,
                                            tool_choice="required", temperature=1.0, seed=2, n=3, max_tokens=80,
                                            stream=True)
    calls: dict[int, dict[int, dict]] = {0: {}, 1: {}, 2: {}}
    finishes: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for part in choice.delta.tool_calls or []:
                entry = calls[choice.index].setdefault(part.index, {"name": "", "arguments": ""})
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    for index, made in calls.items():
        assert made, index
        for entry in made.values():
            jsonschema.validate(json.loads(entry["arguments"]), PARAMETERS[entry["name"]])


def test_the_history_takes_calls_and_their_results(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=history, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=24)
    assert reply.choices[0].message.content


def test_a_hundred_sampled_required_calls_on_the_small_tier_all_validate(client):
    def one(seed: int):
        reply = client.chat.completions.create(model="smollm2-135m-fast", messages=ASK, tools=TOOLS, seed=seed,
                                               tool_choice="required", temperature=1.0, max_tokens=300)
        return reply.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(100)))
    for choice in choices:
        assert choice.finish_reason == "tool_calls", choice
        assert 1 <= len(choice.message.tool_calls) <= 4  # parallel calls: at most two per function
        for call in choice.message.tool_calls:
            check_call(call)


@pytest.mark.parametrize("change,message,param", [
    ({"tool_choice": "required"}, "the request has no tools", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools",
     "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "name a function twice", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools must be an array", "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be", "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "content": "18"}]}, "needs the tool_call_id", "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "content must be a string", "messages"),
])
def test_bad_tool_requests_get_400_naming_the_field(tool_server, change, message, param):
    body = {"model": "smollm2-135m", "messages": ASK, **change}
    answer = requests.post(f"{tool_server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["param"] == param


def test_langchain_bind_tools_and_structured_output(tool_server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city now; unit is C or F."""
        return "18"

    class City(BaseModel):
        """A city."""

        name: str = Field(max_length=32)
        population: int = Field(ge=0, le=100_000_000)

    model = ChatOpenAI(model="smollm2-135m", base_url=f"{tool_server.url}/v1", api_key="unused", temperature=0,
                       max_tokens=80, max_retries=0)
    answer = model.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Paris?")
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather"
    assert set(answer.tool_calls[0]["args"]) == {"city", "unit"}
    for method in ("json_schema", "function_calling"):
        city = model.with_structured_output(City, method=method).invoke("Describe Paris: its name and population.")
        assert isinstance(city, City) and city.name, method


def test_litellm_calls_a_tool(tool_server):
    import litellm

    reply = litellm.completion(model="openai/smollm2-135m", api_base=f"{tool_server.url}/v1", api_key="unused",
                               messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and calls
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMETERS[calls[0].function.name])


def test_models_say_their_context_length_and_what_they_support(client, smollm2_repo):
    import tomllib

    listed = {m.id: m for m in client.models.list().data}
    toml = tomllib.loads((smollm2_repo / "smollm2-135m" / "1" / "model.toml").read_text())
    kv_capacity = toml.get("generation", {}).get("kv_capacity", 2048)
    for name in ("smollm2-135m", "smollm2-135m-fast"):
        entry = listed[name].model_dump()
        assert entry["context_length"] == entry["max_model_len"] == kv_capacity  # a row of the KV cache
        assert entry["capabilities"] == {"tools": True, "structured_output": ["json_object", "json_schema"]}
    one = client.models.retrieve("smollm2-135m").model_dump()
    assert one["context_length"] == kv_capacity
