"""Constrained decoding: a response format (a JSON schema, any JSON object) compiled by llguidance into a matcher
that masks each step's logits to the tokens the grammar allows, and follows the tokens chosen.

llguidance was chosen over xgrammar (needs torch) and outlines-core (regex-based: silently ignores some schema
keywords, and its allowed-token lists cost about 3 ms a step on SmolLM2's 49,152-token vocabulary against
llguidance's 15 us mask plus 50 us to apply it; measured in the README's "Structured output").
Compiling and masking run on the scheduler's thread or a worker thread, never on the event loop; the tokenizer
view llguidance needs (about 0.3 s to build) is made once per model, on the first constrained request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from appliance.errors import BadRequest


class SchemaUnsupported(BadRequest):
    """A response format the grammar engine cannot compile (400, naming what it refused)."""


def strict_schema(schema: Any) -> Any:
    """``schema`` as OpenAI's ``strict`` mode reads it: every object without ``additionalProperties`` takes none
    (JSON Schema's own default allows any)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if (is_object or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Constraint:
    """One sequence's grammar state. Used by one thread at a time (the scheduler's)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._mask = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)

    def apply(self, scores: np.ndarray) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place."""
        matcher = self._matcher
        matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: scores.size].view(bool)
        scores[: allowed.size][~allowed] = -np.inf
        scores[allowed.size:] = -np.inf  # logits past the tokenizer's vocabulary (padding rows of the head)

    def advance(self, token: int) -> None:
        """Follow the chosen token (which :meth:`apply` allowed)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    def copy(self) -> Constraint:
        """A constraint in the same state that moves on by itself (one per sample of a group)."""
        return Constraint(self._matcher.deep_copy(), self._vocab_size)

    @property
    def finished(self) -> bool:
        """Whether the answer is complete: the grammar takes nothing more but the end token."""
        return bool(self._matcher.is_stopped())


class GrammarCompiler:
    """Compiles response formats for one model's tokenizer (``tokenizer.json`` text) and end tokens."""

    def __init__(self, tokenizer_json: str, eos_ids: Sequence[int], vocab_size: int) -> None:
        self._tokenizer_json = tokenizer_json
        self._eos = list(eos_ids)
        self._vocab_size = vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self._vocab_size,
                                                         eos_token=self._eos[0] if self._eos else None)
            return self._tokenizer

    def compile(self, kind: str, schema: Any = None, strict: bool = False) -> Constraint:
        """A fresh constraint: ``kind`` ``json_object`` (any JSON object) or ``json_schema`` (``schema``, in
        OpenAI's strict reading when ``strict``). Blocking (up to a second for a very large schema)."""
        import llguidance

        tokenizer = self._llg_tokenizer()
        if kind == "json_object" or schema is None:
            schema = {"type": "object"}
        elif strict:
            schema = strict_schema(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as exc:
            raise SchemaUnsupported(f"response_format: the JSON schema cannot be compiled: {exc}",
                                    param="response_format") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if problem:
            raise SchemaUnsupported(f"response_format: the JSON schema is not supported: {problem}",
                                    param="response_format")
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise SchemaUnsupported(f"response_format: the JSON schema is not supported: {matcher.get_error()}",
                                    param="response_format")
        return Constraint(matcher, self._vocab_size)
