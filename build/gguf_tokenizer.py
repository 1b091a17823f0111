"""Tokenizer and chat template from a GGUF file's own metadata.

The tokenizer is rebuilt with the ``tokenizers`` library from ``tokenizer.ggml.tokens``, ``tokenizer.ggml.merges``
and ``tokenizer.ggml.token_type`` (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``). The pre-tokenizer is
chosen by ``tokenizer.ggml.pre``, which names the pre-tokenization the model was trained with; only names whose
splitting rule is known here are accepted (an unknown one raises rather than silently tokenizing differently).

The chat template is rendered like the Hugging Face chat templating does it: a jinja2 immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, ``raise_exception`` and ``strftime_now``.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn or a document in the common chat formats; added to the end-of-generation ids when present.
_END_OF_GENERATION_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "</s>",
                            "<end_of_turn>", "<|end_of_text|>")

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre families whose pre-tokenization is every digit on its own, then the GPT-2 byte-level split.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}




class UnsupportedModel(ValueError):
    """The model file uses a feature the importer does not handle; the message names it."""


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("default", "gpt-2", "gpt2", ""):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise UnsupportedModel(f"GGUF pre-tokenizer {pre!r} is not supported")


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to the GGUF's byte-level BPE (``meta``: GGUF metadata, key -> value)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModel(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate token strings")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False,
                     unk_token=None if unk_id is None else tokens[int(unk_id)])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = []
    for text, kind_ in zip(tokens, types, strict=True):
        if kind_ == TOKEN_CONTROL:
            added.append(AddedToken(text, special=True, normalized=False, single_word=False, lstrip=False,
                                    rstrip=False))
        elif kind_ == TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False, single_word=False, lstrip=False,
                                    rstrip=False))
    # The tokens are already in the vocabulary, so adding them keeps their ids; it only makes them atomic.
    tok.add_tokens(added)
    for a in added:
        if tok.token_to_id(a.content) != vocab[a.content]:
            raise ValueError(f"added token {a.content!r} changed id")
    return tok


def special_token_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos / eos / pad / unk ids, end-of-generation ids and the add-bos flag, from the GGUF metadata."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def opt(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    eos = opt("eos_token_id")
    eog = [i for i in (eos, opt("eot_token_id"), opt("eom_token_id")) if i is not None]
    for i, text in enumerate(tokens):
        if text in _END_OF_GENERATION_TEXTS and i not in eog:
            eog.append(i)
    return {
        "bos_token_id": opt("bos_token_id"),
        "eos_token_id": eos,
        "eos_token_ids": eog,
        "pad_token_id": opt("padding_token_id"),
        "unk_token_id": opt("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": None if opt("bos_token_id") is None else tokens[opt("bos_token_id")],
        "eos_token": None if eos is None else tokens[eos],
    }


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in an immutable sandbox (the template is data from the model file)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads a ``tools`` variable (then tool definitions are rendered by it)."""
    from jinja2 import meta

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return "tools" in meta.find_undeclared_variables(env.parse(template))


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render ``messages`` with a chat template string (``extra``: e.g. ``bos_token``, ``tools``)."""
    return compile_chat_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **extra)
