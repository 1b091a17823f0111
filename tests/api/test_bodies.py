"""The OpenAI request bodies: what each parser accepts, what it makes of it, and every rejection's message and param."""

from __future__ import annotations

import time

import pytest

from appliance.api.bodies import GenerateBody, parse_embedding_request, parse_generate
from appliance.engines.generation import SamplingParams
from appliance.errors import BadRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
EMBEDDING = {"model": "e", "input": "x"}
CHAT_FIELDS = ['frequency_penalty', 'ignore_eos', 'logit_bias', 'logprobs', 'max_completion_tokens', 'max_tokens',
               'messages', 'min_p', 'model', 'n', 'parallel_tool_calls', 'presence_penalty', 'repetition_penalty',
               'response_format', 'seed', 'stop', 'stream', 'stream_options', 'temperature', 'timeout', 'tool_choice',
               'tools', 'top_k', 'top_logprobs', 'top_p', 'user']
COMPLETION_FIELDS = ['echo', 'frequency_penalty', 'ignore_eos', 'logit_bias', 'logprobs', 'max_tokens', 'min_p',
                     'model', 'n',
                     'presence_penalty', 'prompt', 'repetition_penalty', 'seed', 'stop', 'stream', 'stream_options',
                     'temperature', 'timeout', 'top_k', 'top_p', 'user']
EMBEDDING_FIELDS = ['dimensions', 'encoding_format', 'input', 'model', 'timeout', 'truncate', 'user']


def rejection(parse, body: dict) -> tuple[str, str | None]:
    with pytest.raises(BadRequest) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value.message, caught.value.param


def chat(body: dict) -> GenerateBody:
    return parse_generate(body, chat=True)


def completion(body: dict) -> GenerateBody:
    return parse_generate(body, chat=False)


# -- accepted ------------------------------------------------------------------------------------------------------

def test_a_minimal_body_gets_the_defaults():
    assert chat(CHAT) == GenerateBody(model="m", messages=[{"role": "user", "content": "hi"}])
    assert completion(COMPLETION) == GenerateBody(model="m", prompt="hi")
    assert chat(CHAT).params == SamplingParams()


def test_every_chat_field_is_read():
    before = time.monotonic()
    body = chat({
        "model": "m", "messages": [{"role": "developer", "content": "be brief", "name": "ops"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b", "extra": 1}]},
                                   {"role": "assistant", "content": ""}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": -1, "ignore_eos": True,
        "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
        "user": "u", "timeout": 2, "n": 1,
    })
    assert body.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                             {"role": "assistant", "content": ""}]
    assert (body.max_tokens, body.stop, body.stream, body.include_usage) == (7, ["\n"], True, True)
    assert body.params == SamplingParams(temperature=0.0, top_p=0.5, top_k=3, seed=2**64 - 1, ignore_eos=True,
                                         logprobs=2)
    assert isinstance(body.params.temperature, float)
    assert before + 2 <= body.deadline <= time.monotonic() + 2


def test_completion_prompts_and_logprobs():
    assert completion({**COMPLETION, "prompt": ["one"]}).prompt == "one"
    assert completion({**COMPLETION, "prompt": [1, 2]}).prompt == [1, 2]
    several = completion({**COMPLETION, "prompt": ["one", "two"], "n": 3})
    assert (several.prompt, several.prompts, several.n) == (None, ["one", "two"], 3)
    assert completion({**COMPLETION, "prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    assert completion({**COMPLETION, "prompt": [[1, 2]]}).prompt == [1, 2]
    for empty in ("", [""]):  # nothing to continue from: refused here, before it reaches the scheduler
        with pytest.raises(BadRequest, match="non-empty string") as caught:
            completion({**COMPLETION, "prompt": empty})
        assert caught.value.param == "prompt"
    assert completion({**COMPLETION, "logprobs": 0}).params.logprobs == 0
    assert completion({**COMPLETION, "logprobs": None}).params.logprobs == -1
    assert chat({**CHAT, "logprobs": True}).params.logprobs == 0


def test_null_means_the_default():
    shared = dict.fromkeys(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream_options", "user",
                            "timeout"])
    assert chat({**CHAT, **shared, "top_logprobs": None, "max_completion_tokens": None}) == chat(CHAT)
    assert completion({**COMPLETION, **shared, "logprobs": None}) == completion(COMPLETION)


def test_long_standing_leniencies_are_kept():
    assert completion({**COMPLETION, "n": 1.0}) == completion(COMPLETION)
    # With max_completion_tokens set, max_tokens is not read at all.
    assert chat({**CHAT, "max_completion_tokens": 3, "max_tokens": "ignored"}).max_tokens == 3
    assert completion({**COMPLETION, "stream": True, "stream_options": {"include_usage": 1}}).include_usage is True
    assert completion({**COMPLETION, "stream": True, "stream_options": {}}).include_usage is False
    assert completion({**COMPLETION, "stop": []}).stop == []
    assert chat({**CHAT, "messages": [{"role": "user", "content": []}]}).messages == [{"role": "user",
                                                                                       "content": ""}]


def test_embedding_inputs():
    request, encoding = parse_embedding_request(EMBEDDING)
    assert (request.model, request.texts, request.token_ids, encoding) == ("e", ["x"], None, "float")
    assert (request.dimensions, request.truncate, request.deadline) == (None, False, None)
    assert parse_embedding_request({**EMBEDDING, "input": ["a", "b"]})[0].texts == ["a", "b"]
    assert parse_embedding_request({**EMBEDDING, "input": [1, 2]})[0].token_ids == [[1, 2]]
    assert parse_embedding_request({**EMBEDDING, "input": [[1], []]})[0].token_ids == [[1], []]
    assert parse_embedding_request({**EMBEDDING, "input": list(range(5000))})[0].token_ids == [list(range(5000))]
    request, encoding = parse_embedding_request({**EMBEDDING, "encoding_format": "base64", "dimensions": 8,
                                                 "truncate": True, "user": "u", "timeout": 1.5})
    assert (request.dimensions, request.truncate, encoding) == (8, True, "base64")
    assert request.deadline is not None and request.deadline <= time.monotonic() + 1.5


# -- rejected ------------------------------------------------------------------------------------------------------

MODEL = "'model' is required: a model name, alias or tier (GET /v1/models)"
MESSAGES = "'messages' must be a non-empty array of {role, content}"
ROLE = "messages[{}] needs a role of system, developer, user, assistant or tool"
PROMPT = ("'prompt' must be a non-empty string, an array of token ids, or an array of 1 to 32 prompts (all strings or "
          "all token arrays)")
CONTENT = "messages[0].content must be a string (only an assistant turn with tool_calls may have none)"
STOP = "stop must be a non-empty string or an array of at most 4 such strings"
STREAM_OPTIONS = "stream_options needs stream: true and takes only include_usage"
SEED = "seed must be an integer from -9223372036854775808 to 9223372036854775807, not {}"
TIMEOUT = "timeout is in seconds and must be a positive number, not {}"


@pytest.mark.parametrize("body,message,param", [
    ({**CHAT, "functions": []}, f"unknown or unsupported field 'functions'; this endpoint takes {CHAT_FIELDS}",
     "functions"),
    ({**CHAT, "prompt": "x", "best_of": 2}, "unknown or unsupported field 'best_of'; this endpoint takes "
                                             f"{CHAT_FIELDS}", "best_of"),
    ({"messages": CHAT["messages"]}, MODEL, "model"),
    ({**CHAT, "model": ""}, MODEL, "model"),
    ({**CHAT, "model": 5}, MODEL, "model"),
    ({"model": "m"}, MESSAGES, "messages"),
    ({**CHAT, "messages": []}, MESSAGES, "messages"),
    ({**CHAT, "messages": {"role": "user"}}, MESSAGES, "messages"),
    ({**CHAT, "messages": ["hi"]}, ROLE.format(0), "messages"),
    ({**CHAT, "messages": [{"content": "hi"}]}, ROLE.format(0), "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, ROLE.format(1),
     "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     "messages[1] is a tool message and needs the tool_call_id of the call it answers", "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content parts must all be text parts", "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": ["text"]}]},
     "messages[0].content parts must all be text parts", "messages"),
    ({**CHAT, "messages": [{"role": "user"}]}, CONTENT, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": None}]}, CONTENT, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string", "messages"),
    ({**CHAT, "n": 0}, "n must be an integer from 1 to 128, not 0", "n"),
    ({**CHAT, "n": 129}, "n must be an integer from 1 to 128, not 129", "n"),
    ({**CHAT, "n": None}, "n must be an integer from 1 to 128, not None", "n"),
    ({**CHAT, "n": True}, "n must be an integer from 1 to 128, not True", "n"),  # as the document says
    ({**CHAT, "max_tokens": 0}, "max_tokens must be an integer >= 1, not 0", "max_tokens"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens must be an integer >= 1, not 1.5", "max_tokens"),
    ({**CHAT, "max_tokens": True}, "max_tokens must be an integer >= 1, not True", "max_tokens"),
    ({**CHAT, "max_completion_tokens": 0, "max_tokens": 5},
     "max_completion_tokens must be an integer >= 1, not 0", "max_completion_tokens"),
    ({**CHAT, "temperature": 2.5}, "temperature must be a number from 0.0 to 2.0, not 2.5", "temperature"),
    ({**CHAT, "temperature": "hot"}, "temperature must be a number from 0.0 to 2.0, not 'hot'", "temperature"),
    ({**CHAT, "top_p": 0}, "top_p must be above 0", "top_p"),
    ({**CHAT, "top_p": 1.5}, "top_p must be a number from 0.0 to 1.0, not 1.5", "top_p"),
    ({**CHAT, "top_p": False}, "top_p must be a number from 0.0 to 1.0, not False", "top_p"),
    ({**CHAT, "top_k": -1}, "top_k must be an integer >= 0, not -1", "top_k"),
    ({**CHAT, "seed": 2**63}, SEED.format(2**63), "seed"),
    ({**CHAT, "seed": "7"}, SEED.format("'7'"), "seed"),
    ({**CHAT, "ignore_eos": None}, "ignore_eos must be true or false", "ignore_eos"),
    ({**CHAT, "stop": ""}, STOP, "stop"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, STOP, "stop"),
    ({**CHAT, "stop": ["a", ""]}, STOP, "stop"),
    ({**CHAT, "stop": 5}, STOP, "stop"),
    ({**CHAT, "stream": "yes"}, "stream must be true or false", "stream"),
    ({**CHAT, "stream_options": {"include_usage": True}}, STREAM_OPTIONS, "stream_options"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": True, "chunk": 1}}, STREAM_OPTIONS,
     "stream_options"),
    ({**CHAT, "stream": True, "stream_options": "usage"}, STREAM_OPTIONS, "stream_options"),
    ({**CHAT, "logprobs": 1}, "logprobs must be true or false", "logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer from 0 to 20, not 21",
     "top_logprobs"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs: true", "top_logprobs"),
    ({**CHAT, "user": 5}, "user must be a string", "user"),
    ({**CHAT, "timeout": 0}, TIMEOUT.format(0), "timeout"),
    ({**CHAT, "timeout": True}, TIMEOUT.format(True), "timeout"),
    ({**CHAT, "timeout": "1"}, TIMEOUT.format("'1'"), "timeout"),
    # The first field that is wrong, in the order they have always been checked, is the one reported.
    ({**CHAT, "model": "", "messages": []}, MODEL, "model"),
    ({**CHAT, "temperature": 9, "top_k": -1}, "temperature must be a number from 0.0 to 2.0, not 9", "temperature"),
    ({**CHAT, "top_p": 0, "top_k": -1}, "top_p must be above 0", "top_p"),
    ({**CHAT, "stream_options": {}, "logprobs": "x"}, STREAM_OPTIONS, "stream_options"),
    ({**CHAT, "top_logprobs": 1, "user": 5}, "top_logprobs needs logprobs: true", "top_logprobs"),
])
def test_chat_rejections(body, message, param):
    assert rejection(chat, body) == (message, param)


@pytest.mark.parametrize("body,message,param", [
    ({**COMPLETION, "messages": []}, "unknown or unsupported field 'messages'; this endpoint takes "
                                      f"{COMPLETION_FIELDS}", "messages"),
    ({**COMPLETION, "max_completion_tokens": 5}, "unknown or unsupported field 'max_completion_tokens'; this "
                                                  f"endpoint takes {COMPLETION_FIELDS}", "max_completion_tokens"),
    ({"model": "m"}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": None}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": []}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": ["a", [1]]}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": ["a"] * 33}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": [[1], []]}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": ["a"] * 32, "n": 5}, "32 prompts x n=5 is 160 choices; one request may ask for at most "
     "128", "n"),
    ({**COMPLETION, "prompt": [1, "a"]}, PROMPT, "prompt"),
    ({**COMPLETION, "prompt": [True]}, PROMPT, "prompt"),
    ({**COMPLETION, "logprobs": 6}, "logprobs must be an integer from 0 to 5, not 6", "logprobs"),
    ({**COMPLETION, "logprobs": True}, "logprobs must be an integer from 0 to 5, not True", "logprobs"),
    ({**COMPLETION, "model": None, "prompt": 5}, MODEL, "model"),
])
def test_completion_rejections(body, message, param):
    assert rejection(completion, body) == (message, param)


INPUT = ("'input' must be a string, a non-empty array of strings, an array of token ids, or an array of such "
         "arrays")


@pytest.mark.parametrize("body,message,param", [
    ({**EMBEDDING, "foo": 1}, f"unknown field 'foo'; this endpoint takes {EMBEDDING_FIELDS}", "foo"),
    ({"input": "x"}, "'model' is required: the name or alias of an embedding model (GET /v1/models)", "model"),
    ({"model": "e"}, INPUT, "input"),
    ({**EMBEDDING, "input": []}, INPUT, "input"),
    ({**EMBEDDING, "input": [1, "a"]}, INPUT, "input"),
    ({**EMBEDDING, "input": [[1], "a"]}, INPUT, "input"),
    ({**EMBEDDING, "input": [["a"]]}, INPUT, "input"),
    ({**EMBEDDING, "input": [True]}, INPUT, "input"),
    ({**EMBEDDING, "input": None}, INPUT, "input"),
    ({**EMBEDDING, "input": ["a"] * 2049}, "'input' has 2049 items; at most 2048 per request", "input"),
    ({**EMBEDDING, "input": [[1]] * 2049}, "'input' has 2049 items; at most 2048 per request", "input"),
    ({**EMBEDDING, "encoding_format": "int8"}, "encoding_format must be 'float' or 'base64', not 'int8'",
     "encoding_format"),
    ({**EMBEDDING, "encoding_format": None}, "encoding_format must be 'float' or 'base64', not None",
     "encoding_format"),
    ({**EMBEDDING, "dimensions": 0}, "dimensions must be a positive integer, not 0", "dimensions"),
    ({**EMBEDDING, "dimensions": 1.5}, "dimensions must be a positive integer, not 1.5", "dimensions"),
    ({**EMBEDDING, "truncate": "yes"}, "truncate must be true or false, not 'yes'", "truncate"),
    ({**EMBEDDING, "truncate": None}, "truncate must be true or false, not None", "truncate"),
    ({**EMBEDDING, "user": ["u"]}, "user must be a string", "user"),
    ({**EMBEDDING, "timeout": -1}, TIMEOUT.format(-1), "timeout"),
    ({**EMBEDDING, "input": [], "dimensions": 0}, INPUT, "input"),
])
def test_embedding_rejections(body, message, param):
    assert rejection(parse_embedding_request, body) == (message, param)


def test_canonical_view_holds_what_changes_the_text():
    body = chat({**CHAT, "temperature": 0, "seed": 3, "stop": ["x"], "user": "not in it", "stream": True})
    assert body.canonical(True) == {"chat": True, "messages": [{"role": "user", "content": "hi"}], "prompt": None,
                                    "max_tokens": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 3,
                                    "stop": ["x"], "logprobs": -1, "ignore_eos": False, "frequency_penalty": 0.0,
                                    "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                                    "logit_bias": [], "response_format": None, "tools": None, "echo": False}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    formatted = chat({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                                                       "strict": True}}})
    assert formatted.canonical(True)["response_format"] == ("json_schema", schema, True)
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    with_tools = chat({**CHAT, "tools": tools, "tool_choice": "required"}).canonical(True)["tools"]
    assert with_tools == {"tools": [{"type": "function", "function": {"name": "f", "description": "",
                                                                       "parameters": schema}}],
                          "mode": "required", "function": "", "parallel": True}
    biased = chat({**CHAT, "logit_bias": {"7": 2, "3": -1.5}, "frequency_penalty": 0.5})
    assert biased.canonical(True)["logit_bias"] == [(3, -1.5), (7, 2.0)]  # one order, whatever the client's
    assert biased.canonical(True)["frequency_penalty"] == 0.5


def test_numbers_without_a_fraction_are_integers_as_the_document_counts_them():
    body = completion({**COMPLETION, "max_tokens": 8.0, "seed": -3e2, "top_k": 1e1, "logprobs": 2.0, "n": 1.0})
    assert (body.max_tokens, body.params.top_k, body.params.logprobs) == (8, 10, 2)
    assert body.params.seed == -300 & (1 << 64) - 1
    with pytest.raises(BadRequest, match="max_tokens must be an integer"):
        completion({**COMPLETION, "max_tokens": 8.5})
    with pytest.raises(BadRequest, match="seed must be an integer"):  # a 65-bit literal, which JSON parsers round
        completion({**COMPLETION, "seed": -9223372036854775809.0})
