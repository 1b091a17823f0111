"""The OpenAI-compatible request bodies: their wire format, as dataclasses, and the parsers that check a body.

A field's annotation says what it accepts (the rules of :mod:`appliance.validation`), its default what leaving it
out means (and sending null, where the type allows null), and its metadata the 400 message when the value does not
fit (``param`` is the field's name) and the field's description. ``GET /openapi.json`` documents the request bodies
from these classes, so the document and the parsers cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from msgspec import Meta

from appliance import validation
from appliance.engines.constraints import strict_schema
from appliance.engines.generation import SamplingParams
from appliance.errors import BadRequest
from appliance.tools import Tool, ToolSet
from appliance.types import MAX_EMBED_INPUTS, EmbedRequest

MAX_INPUTS = MAX_EMBED_INPUTS
MAX_CHOICES = 128  # choices one generate request may ask for (OpenAI's limit on n)
MAX_PROMPTS = 32  # prompts in one completions request
EXACT_FLOAT_INTEGERS = 2**53  # below this, a float holds every integer exactly
ErrorText = str | Callable[[Any, validation.Invalid], str]  # a str is formatted with the value sent as {value!r}


def _says(error: ErrorText, description: str = "") -> dict[str, Any]:
    """Field metadata: the message of the 400 a value that does not fit gets, and what the field means."""
    return {"error": error, "description": description} if description else {"error": error}


# -- the wire format -----------------------------------------------------------------------------------------------

@dataclass
class TextPart:
    """A part of a message's content; a text model understands text parts only."""

    extra_keys: ClassVar[str] = validation.IGNORE
    type: Literal["text"]
    text: str


@dataclass
class CalledFunction:
    """The function an earlier assistant turn called, and its arguments (JSON text)."""

    extra_keys: ClassVar[str] = validation.IGNORE
    name: str
    arguments: str


@dataclass
class EarlierToolCall:
    """A tool call of an earlier assistant turn, in the history."""

    extra_keys: ClassVar[str] = validation.IGNORE
    id: str
    function: CalledFunction
    type: Literal["function"] = "function"


@dataclass
class ChatMessage:
    """One turn of a conversation; ``developer`` is read as ``system``, and content parts are joined. An assistant
    turn may carry the ``tool_calls`` it made (then its content may be null), a ``tool`` turn the result of one."""

    extra_keys: ClassVar[str] = validation.IGNORE
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[EarlierToolCall] | None = None
    tool_call_id: str | None = None


@dataclass
class FunctionDefinition:
    """A function the model may call: its name, what it does, and its parameters' JSON schema."""

    name: Annotated[str, Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # absent: no parameters
    strict: bool | None = None


@dataclass
class ToolDefinition:
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


@dataclass
class NamedFunction:
    """The function ``tool_choice`` names."""

    name: str


@dataclass
class NamedToolChoice:
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: that function must be called."""

    type: Literal["function"]
    function: NamedFunction


@dataclass
class StreamOptions:
    """What a stream carries besides the text."""

    include_usage: Any = field(default=False, metadata={
        "description": "true: a last chunk carries the usage (any value is read as true or false)"})


@dataclass
class JsonSchemaFormat:
    """``response_format.json_schema``: the JSON schema the answer follows."""

    name: Annotated[str, Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
    schema: dict[str, Any] | None = None  # absent: any JSON object
    strict: bool | None = None  # OpenAI's strict reading: objects take no properties beyond those named
    description: str | None = None


@dataclass
class ResponseFormat:
    """``response_format``: free text, any JSON object, or JSON following a schema (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


_RESPONSE_FORMAT = ('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                    '"json_schema": {"name": NAME, "schema": {...}, "strict": true}} (name: 1 to 64 letters, digits, '
                    '_ or -)')



def _messages_error(value: Any, error: validation.Invalid) -> str:
    if len(error.loc) == 1:
        return "'messages' must be a non-empty array of {role, content}"
    index = error.loc[1]
    if error.loc[2:] == ("content",):
        if isinstance(value[index].get("content"), list):
            return f"messages[{index}].content parts must all be text parts"
        return f"messages[{index}].content must be a string"
    return f"messages[{index}] needs a role of system, developer, user, assistant or tool"


def _top_p_error(value: Any, error: validation.Invalid) -> str:
    if value == 0 and not isinstance(value, bool):
        return "top_p must be above 0"
    return f"top_p must be a number from 0.0 to 1.0, not {value!r}"


_STREAM_OPTIONS = "stream_options needs stream: true and takes only include_usage"
_TOP_LOGPROBS = "top_logprobs needs logprobs: true"


@dataclass
class GenerationRequest:
    """The fields ``POST /v1/chat/completions`` and ``POST /v1/completions`` share."""

    model: Annotated[str, Meta(min_length=1)] = field(metadata=_says(
        "'model' is required: a model name, alias or tier (GET /v1/models)", "a model name, alias or tier"))
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = field(default=1, metadata=_says(
        f"n must be an integer from 1 to {MAX_CHOICES}, not {{value!r}}",
        "choices to generate for each prompt; they share one prefill of the prompt"))
    max_tokens: Annotated[int, Meta(ge=1)] | None = field(default=None, metadata=_says(
        "max_tokens must be an integer >= 1, not {value!r}", "at most this many tokens are generated"))
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = field(default=1.0, metadata=_says(
        "temperature must be a number from 0.0 to 2.0, not {value!r}", "0 picks the most likely token"))
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = field(default=1.0, metadata=_says(_top_p_error))
    top_k: Annotated[int, Meta(ge=0)] | None = field(default=0, metadata=_says(
        "top_k must be an integer >= 0, not {value!r}", "0: no limit"))
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = field(default=None, metadata=_says(
        "seed must be an integer from -9223372036854775808 to 9223372036854775807, not {value!r}"))
    ignore_eos: bool = field(default=False, metadata=_says("ignore_eos must be true or false"))
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = field(default=0.0, metadata=_says(
        "frequency_penalty must be a number from -2.0 to 2.0, not {value!r}",
        "subtracted from a token's logit once per time it was generated so far"))
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = field(default=0.0, metadata=_says(
        "presence_penalty must be a number from -2.0 to 2.0, not {value!r}",
        "subtracted from the logit of every token generated so far"))
    repetition_penalty: Annotated[float, Meta(ge=0.01, le=10.0)] | None = field(default=1.0, metadata=_says(
        "repetition_penalty must be a number from 0.01 to 10, not {value!r}",
        "extension: logits of tokens seen in the prompt or output divided by it (if positive) or multiplied by it"))
    logit_bias: Annotated[dict[Annotated[str, Meta(pattern="^[0-9]{1,9}$")],
                               Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=1024)] | None = field(
        default=None, metadata=_says(
            "logit_bias must map token ids (as strings of digits) to numbers from -100 to 100, at most 1024 of them",
            "added to those tokens' logits"))
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = field(default=0.0, metadata=_says(
        "min_p must be a number from 0.0 to 1.0, not {value!r}",
        "extension: tokens less likely than min_p times the most likely one are not sampled"))
    stop: (Annotated[str, Meta(min_length=1)] | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=4)]
           | None) = field(default=None, metadata=_says(
               "stop must be a non-empty string or an array of at most 4 such strings"))
    stream: bool = field(default=False, metadata=_says("stream must be true or false", "server-sent events"))
    stream_options: StreamOptions | None = field(default=None, metadata=_says(_STREAM_OPTIONS, _STREAM_OPTIONS))
    user: str | None = field(default=None, metadata=_says("user must be a string", "accepted, not stored"))
    timeout: Annotated[float, Meta(gt=0)] | None = field(default=None, metadata=_says(
        "timeout is in seconds and must be a positive number, not {value!r}", "seconds"))


@dataclass
class ChatCompletionRequest(GenerationRequest):
    """The body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)] = field(kw_only=True,
                                                                       metadata=_says(_messages_error))
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = field(default=None, metadata=_says(
        "max_completion_tokens must be an integer >= 1, not {value!r}", "when set, max_tokens is not read"))
    logprobs: bool = field(default=False, metadata=_says("logprobs must be true or false"))
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = field(default=None, metadata=_says(
        "top_logprobs must be an integer from 0 to 20, not {value!r}", _TOP_LOGPROBS))
    tools: Annotated[list[ToolDefinition], Meta(max_length=128)] | None = field(default=None, metadata=_says(
        'tools must be an array of at most 128 {"type": "function", "function": {"name": NAME, "description": ..., '
        '"parameters": {JSON schema}}} (name: 1 to 64 letters, digits, _ or -)', "functions the model may call"))
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = field(default=None, metadata=_says(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": NAME}}',
        "required or a named function constrains the answer to a call"))
    parallel_tool_calls: bool | None = field(default=None, metadata=_says(
        "parallel_tool_calls must be true or false", "whether one answer may call several functions"))
    response_format: ResponseFormat | None = field(default=None, metadata=_says(
        _RESPONSE_FORMAT, "json_object and json_schema constrain decoding: the answer always parses (and follows "
                          "the schema)"))


@dataclass
class CompletionRequest(GenerationRequest):
    """The body of ``POST /v1/completions``."""

    prompt: (Annotated[str, Meta(min_length=1)]
             | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[int], Meta(min_length=1)]
             | Annotated[list[Annotated[list[int], Meta(min_length=1)]], Meta(min_length=1, max_length=MAX_PROMPTS)]
             ) = field(kw_only=True, metadata=_says(
                 f"'prompt' must be a non-empty string, an array of token ids, or an array of 1 to {MAX_PROMPTS} "
                 "prompts (all strings or all token arrays)",
                 "several prompts are answered in one response, choice i answering prompt i // n"))
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = field(default=None, metadata=_says(
        "logprobs must be an integer from 0 to 5, not {value!r}", "this many likely tokens besides the one chosen"))
    echo: bool = field(default=False, metadata=_says("echo must be true or false",
                                                     "the answer's text begins with the prompt"))


@dataclass
class EmbeddingRequest:
    """The body of ``POST /v1/embeddings``."""

    model: Annotated[str, Meta(min_length=1)] = field(metadata=_says(
        "'model' is required: the name or alias of an embedding model (GET /v1/models)"))
    input: (str | Annotated[list[str], Meta(min_length=1)] | Annotated[list[int], Meta(min_length=1)]
            | Annotated[list[list[int]], Meta(min_length=1)]) = field(metadata=_says(
                "'input' must be a string, a non-empty array of strings, an array of token ids, or an array of such "
                "arrays", f"at most {MAX_INPUTS} texts or token id arrays per request"))
    encoding_format: Literal["float", "base64"] = field(default="float", metadata=_says(
        "encoding_format must be 'float' or 'base64', not {value!r}"))
    dimensions: Annotated[int, Meta(ge=1)] | None = field(default=None, metadata=_says(
        "dimensions must be a positive integer, not {value!r}", "fewer dimensions, for models trained for it"))
    truncate: bool = field(default=False, metadata=_says(
        "truncate must be true or false, not {value!r}", "cut inputs over the limit instead of 400"))
    user: str | None = field(default=None, metadata=_says("user must be a string", "accepted, not stored"))
    timeout: Annotated[float, Meta(gt=0)] | None = field(default=None, metadata=_says(
        "timeout is in seconds and must be a positive number, not {value!r}", "seconds"))


def _needs_true(field_name: str, flag: str) -> dict[str, Any]:
    """JSON Schema: a non-null ``field_name`` needs ``flag: true``."""
    return {"anyOf": [{"properties": {field_name: {"type": "null"}}},
                      {"required": [flag], "properties": {flag: {"const": True}}}]}


# Rules between fields, which the parsers check after the fields themselves: the document states them too (each
# class's schema gets them as ``allOf``).
_TOOL_TURN = {"if": {"required": ["role"], "properties": {"role": {"const": "tool"}}},
              "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}}
_CONTENT_NEEDED = {"if": {"not": {"required": ["role", "tool_calls"],
                                  "properties": {"role": {"const": "assistant"},
                                                 "tool_calls": {"type": "array", "minItems": 1}}}},
                   "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}}

FIELD_RULES: dict[type, list[dict[str, Any]]] = {
    ChatMessage: [_TOOL_TURN, _CONTENT_NEEDED],
    ChatCompletionRequest: [_needs_true("stream_options", "stream"), _needs_true("top_logprobs", "logprobs")],
    CompletionRequest: [_needs_true("stream_options", "stream")],
}


# -- the parsers ---------------------------------------------------------------------------------------------------

@dataclass
class GenerateBody:
    """A checked chat or completions body."""

    model: str
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    prompts: list[str | list[int]] | None = None  # several prompts, in order
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    deadline: float | None = None
    response_format: tuple[str, Any, bool] | None = None  # (json_object | json_schema, schema, strict)
    tools: ToolSet | None = None
    echo: bool = False

    def canonical(self, chat: bool) -> dict[str, Any]:
        """Every field that changes the generated text: the response cache's view of the request."""
        p = self.params
        return {"chat": chat, "messages": self.messages, "prompt": self.prompts or self.prompt,
                "max_tokens": self.max_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "seed": p.seed,
                "stop": self.stop, "logprobs": p.logprobs, "ignore_eos": p.ignore_eos,
                "frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty,
                "repetition_penalty": p.repetition_penalty, "min_p": p.min_p,
                "logit_bias": sorted(p.logit_bias.items()), "response_format": self.response_format,
                "tools": self.tools.canonical() if self.tools is not None else None, "echo": self.echo}


_ABSENT = object()
Specs = dict[str, validation.FieldSpec]


def whole_numbers(value: Any) -> Any:
    """``value`` with every number that has no fraction (``2.0``, ``1e3``) as an int: JSON has one kind of number,
    and JSON Schema (so the document) counts those as integers wherever an integer is asked for. Floats from 2**53
    on stay floats: they may be an integer literal too large for 64 bits that the JSON parser rounded."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < EXACT_FLOAT_INTEGERS else value
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    return value


def parse_generate(body: dict[str, Any], chat: bool) -> GenerateBody:
    """Check every field; unknown fields and unsupported values get 400 naming the field."""
    body = whole_numbers(body)
    specs = validation.fields(ChatCompletionRequest if chat else CompletionRequest)
    _refuse_unknown(body, specs, "unknown or unsupported field")
    parsed = GenerateBody(model=_read(body, specs, "model"))
    if chat:
        parsed.messages = [_turn(index, message) for index, message in enumerate(_read(body, specs, "messages"))]
    else:
        prompt = _read(body, specs, "prompt")
        several = isinstance(prompt, list) and not isinstance(prompt[0], int)
        if several and len(prompt) > 1:
            parsed.prompts = prompt
        else:
            parsed.prompt = prompt[0] if several else prompt
    parsed.n = _read(body, specs, "n")
    if parsed.prompts is not None and parsed.n * len(parsed.prompts) > MAX_CHOICES:
        raise BadRequest(f"{len(parsed.prompts)} prompts x n={parsed.n} is {parsed.n * len(parsed.prompts)} "
                         f"choices; one request may ask for at most {MAX_CHOICES}", param="n")
    newer = chat and body.get("max_completion_tokens") is not None  # then max_tokens is not read
    parsed.max_tokens = _read(body, specs, "max_completion_tokens" if newer else "max_tokens")
    params = parsed.params
    params.temperature = _read(body, specs, "temperature")
    params.top_p = _read(body, specs, "top_p")
    params.top_k = _read(body, specs, "top_k")
    seed = _read(body, specs, "seed")
    params.seed = seed & (1 << 64) - 1 if seed is not None and seed < 0 else seed
    params.ignore_eos = _read(body, specs, "ignore_eos")
    params.frequency_penalty = _read(body, specs, "frequency_penalty")
    params.presence_penalty = _read(body, specs, "presence_penalty")
    params.repetition_penalty = _read(body, specs, "repetition_penalty")
    params.min_p = _read(body, specs, "min_p")
    params.logit_bias = {int(token): float(bias) for token, bias in (_read(body, specs, "logit_bias") or {}).items()}
    stop = _read(body, specs, "stop")
    parsed.stop = [stop] if isinstance(stop, str) else stop or []
    parsed.stream = _read(body, specs, "stream")
    options = _read(body, specs, "stream_options")
    if options is not None:
        if not parsed.stream:
            raise BadRequest(_STREAM_OPTIONS, param="stream_options")
        parsed.include_usage = bool(options.include_usage)
    if chat:
        wanted = _read(body, specs, "logprobs")
        top = _read(body, specs, "top_logprobs")
        if top is not None and not wanted:
            raise BadRequest(_TOP_LOGPROBS, param="top_logprobs")
        params.logprobs = (top or 0) if wanted else -1
        parsed.response_format = _response_format(_read(body, specs, "response_format"))
        parsed.tools = _tools(_read(body, specs, "tools"), _read(body, specs, "tool_choice"),
                              _read(body, specs, "parallel_tool_calls"))
    else:
        count = _read(body, specs, "logprobs")
        params.logprobs = -1 if count is None else count
        parsed.echo = _read(body, specs, "echo")
        if parsed.echo and count is not None:
            raise BadRequest("echo with logprobs is not supported: the prompt's tokens get no logprobs here; drop "
                             "one of them", param="echo")
    _read(body, specs, "user")
    parsed.deadline = _deadline(_read(body, specs, "timeout"))
    return parsed


def _tools(tools: list[ToolDefinition] | None, choice: str | NamedToolChoice | None,
           parallel: bool | None) -> ToolSet | None:
    """The request's tools and how they may be used; ``None`` without tools."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice asks for a call, but the request has no tools", param="tool_choice")
        return None
    defined = tuple(Tool(t.function.name, t.function.description or "",
                         strict_schema(t.function.parameters or {"type": "object", "properties": {}})
                         if t.function.strict else t.function.parameters or {"type": "object", "properties": {}})
                    for t in tools)
    names = [t.name for t in defined]
    if len(set(names)) != len(names):
        raise BadRequest(f"tools name a function twice: {sorted(n for n in set(names) if names.count(n) > 1)}",
                         param="tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise BadRequest(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                             param="tool_choice")
        return ToolSet(defined, "function", choice.function.name, parallel is not False)
    return ToolSet(defined, choice or "auto", "", parallel is not False)


def _response_format(given: ResponseFormat | None) -> tuple[str, Any, bool] | None:
    """``(kind, schema, strict)`` of a constrained format; ``None`` for free text."""
    if given is None or given.type == "text":
        return None
    if given.type == "json_object":
        return "json_object", None, False
    if given.json_schema is None:
        raise BadRequest('response_format type "json_schema" needs json_schema: {"name": NAME, "schema": {...}}',
                         param="response_format")
    return "json_schema", given.json_schema.schema, bool(given.json_schema.strict)


def parse_embedding_request(body: dict[str, Any]) -> tuple[EmbedRequest, str]:
    """Check an embeddings body field by field; returns the request and the encoding format."""
    body = whole_numbers(body)
    specs = validation.fields(EmbeddingRequest)
    _refuse_unknown(body, specs, "unknown field")
    request = EmbedRequest(id="", model=_read(body, specs, "model"))
    value = _read(body, specs, "input")
    if isinstance(value, str):
        request.texts = [value]
    elif isinstance(value[0], str):
        request.texts = value
    elif isinstance(value[0], int):
        request.token_ids = [value]
    else:
        request.token_ids = value
    count = len(request.texts or request.token_ids or [])
    if count > MAX_INPUTS:
        raise BadRequest(f"'input' has {count} items; at most {MAX_INPUTS} per request", param="input")
    encoding = _read(body, specs, "encoding_format")
    request.dimensions = _read(body, specs, "dimensions")
    request.truncate = _read(body, specs, "truncate")
    _read(body, specs, "user")
    request.deadline = _deadline(_read(body, specs, "timeout"))
    return request, encoding


def _refuse_unknown(body: dict[str, Any], specs: Specs, words: str) -> None:
    unknown = sorted(set(body) - specs.keys())
    if unknown:
        raise BadRequest(f"{words} {unknown[0]!r}; this endpoint takes {sorted(specs)}", param=unknown[0])


def _read(body: dict[str, Any], specs: Specs, name: str) -> Any:
    """The field ``name`` of ``body``, checked against its declared type: its default when absent (or null, where
    null is allowed); a 400 with the field's message when it does not fit."""
    spec = specs[name]  # the wire classes' defaults are plain values, made by no factory
    value = body.get(name, _ABSENT)
    if value is _ABSENT:
        if spec.required:
            raise _bad(spec, name, None, validation.Invalid("missing", (name,), hint=spec.hint))
        return spec.default
    try:
        checked = spec.check(value, (name,))
    except validation.Invalid as exc:
        raise _bad(spec, name, value, exc) from None
    return spec.default if checked is None else checked


def _bad(spec: validation.FieldSpec, name: str, value: Any, error: validation.Invalid) -> BadRequest:
    text: ErrorText = spec.field.metadata["error"]
    # Only the {value!r} placeholder is filled: messages quote JSON, braces and all.
    return BadRequest(text.replace("{value!r}", repr(value)) if isinstance(text, str) else text(value, error),
                      param=name)


def _turn(index: int, message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    if content is None and not (message.role == "assistant" and message.tool_calls):
        raise BadRequest(f"messages[{index}].content must be a string (only an assistant turn with tool_calls may "
                         "have none)", param="messages")
    if message.role == "tool" and not message.tool_call_id:
        raise BadRequest(f"messages[{index}] is a tool message and needs the tool_call_id of the call it answers",
                         param="messages")
    turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                            "content": content or ""}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": call.id, "type": "function",
                               "function": {"name": call.function.name, "arguments": call.function.arguments}}
                              for call in message.tool_calls]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _deadline(timeout: float | None) -> float | None:
    """The ``timeout`` extension (seconds) as a deadline on the monotonic clock."""
    return None if timeout is None else time.monotonic() + timeout
