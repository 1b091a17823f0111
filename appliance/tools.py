"""Tool calling: the functions a chat request offers, how they reach the model, and how its answer becomes
OpenAI's ``tool_calls``.

A model whose chat template takes ``tools`` gets them there (and the history's ``tool_calls`` and ``tool``
messages as the template renders them). Any other template gets :func:`default_tool_prompt` in the system turn,
and the history's calls and results as text turns. The model answers a call as a JSON object ``{"name": ...,
"arguments": {...}}``, or several as a JSON array of them; ``tool_choice`` ``required`` or a named function
constrains the answer to exactly that form (:func:`call_schema`, compiled like a ``json_schema`` response format),
so its arguments always parse and follow the function's parameters.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ToolMode = Literal["auto", "none", "required", "function"]
MAX_CALLS_PER_FUNCTION = 2  # parallel calls in a constrained answer, per function offered


@dataclass(frozen=True)
class Tool:
    """One function the caller offers."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        """The definition in OpenAI's (and Hugging Face templates') shape."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolSet:
    """The request's tools, ``tool_choice`` (``function`` names one in ``function``) and ``parallel_tool_calls``."""

    tools: tuple[Tool, ...]
    mode: ToolMode = "auto"
    function: str = ""
    parallel: bool = True

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the model is told of: none for ``none``, the named one for a named choice."""
        if self.mode == "none":
            return ()
        if self.mode == "function":
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools

    @property
    def constrained(self) -> bool:
        """Whether the answer must be a call (``required`` or a named function)."""
        return self.mode in ("required", "function")

    def canonical(self) -> dict[str, Any]:
        """What changes the answer, for the response cache."""
        return {"tools": [t.as_openai() for t in self.tools], "mode": self.mode, "function": self.function,
                "parallel": self.parallel}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        """The call in a message's (or, with ``index``, a stream delta's) ``tool_calls``."""
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            call["index"] = index
        return call


def call_schema(tools: ToolSet) -> dict[str, Any]:
    """The JSON schema of an answer that is a call of an offered function (an array of calls when parallel calls
    are allowed and more than one function is offered: at most two per function, so that a sampled answer ends)."""
    one = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools.offered]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    if tools.parallel and len(one) > 1:
        return {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_CALLS_PER_FUNCTION * len(one)}
    return call


def default_tool_prompt(tools: ToolSet) -> str:
    """The system text that offers the tools to a model whose chat template does not take them."""
    listing = json.dumps([t.as_openai()["function"] for t in tools.offered], ensure_ascii=False)
    must = ("You must call one of them." if tools.constrained else
            "Call one only when it helps answer; otherwise answer in plain text.")
    several = " To call several, reply with a JSON array of such objects." if tools.parallel else ""
    return (f"You can call these functions: {listing}. {must} To call a function, reply with only a JSON object "
            f'{{"name": <function name>, "arguments": <arguments object>}}.{several}')


def template_messages(messages: list[dict[str, Any]], tools: ToolSet | None,
                      template_takes_tools: bool) -> list[dict[str, Any]]:
    """The messages to render: as they are for a template that takes tools, else with the tools offered in the
    system turn and earlier calls and results written as text."""
    if template_takes_tools:
        return messages
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append({"role": "assistant", "content": ((message.get("content") or "") + "\n" + text).strip()})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"Result of the call {message.get('tool_call_id', '')}: "
                                                   f"{message.get('content') or ''}"})
        else:
            out.append({"role": message["role"], "content": message.get("content") or ""})
    if tools is not None and tools.offered:
        prompt = default_tool_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str, tools: ToolSet) -> list[ToolCall] | None:
    """The calls in an answer that is only a call (or an array of calls) of offered functions; ``None`` when the
    answer is text."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {t.name for t in tools.offered}
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments"), dict)):
            return None
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"],
                              json.dumps(item["arguments"], ensure_ascii=False)))
    if not calls or (len(calls) > 1 and not tools.parallel):
        return None
    return calls


def may_become_a_call(text: str) -> bool:
    """Whether a streamed answer that begins with ``text`` may still turn out to be a call (so it is held back)."""
    stripped = text.lstrip()
    return not stripped or stripped[0] in "[{"
