"""Parity checks: how closely a built variant reproduces its reference graph.

Encoders are compared by the cosine of their embeddings; decoders by their greedy tokens, run through the same
:class:`~appliance.engines.onnxruntime_decoder.OnnxRuntimeDecoder` that serves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.base import Decoder
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder

# Varied lengths and content, so that padding, long inputs and punctuation are all exercised.
SAMPLE_TEXTS = [
    "",
    "Hello.",
    "The quick brown fox jumps over the lazy dog.",
    "An inference appliance keeps data on the device unless policy lets it leave.",
    "Wie spät ist es? Quelle heure est-il ? ¿Qué hora es?",
    "def add(a, b):\n    return a + b  # code is text too",
    "Revenue grew 12.5% year over year to $4.2B, driven by data-center demand and lower churn.",
    " ".join(["Batching many short requests together keeps the accelerator busy while latency stays low."] * 6),
]


def encode_batch(tokenizer_path: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Token ids and attention mask, right-padded, truncated to ``max_length`` (the last token kept)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    rows = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        rows.append(ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:])
    width = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def embeddings(model: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Run an encoder graph once on ``feed``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session.run(["sentence_embedding"], feed)[0]


def encoder_parity(reference: Path, candidate: Path, tokenizer: Path, max_length: int) -> dict[str, float]:
    """Cosine similarity of the candidate's embeddings with the reference graph's, over the sample texts."""
    feed = encode_batch(tokenizer, SAMPLE_TEXTS, max_length)
    want, got = embeddings(reference, feed), embeddings(candidate, feed)
    cosine = np.sum(want * got, axis=1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    return {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()), "samples": len(SAMPLE_TEXTS)}


def parity_decoder(model_path: Path, generation: Mapping[str, Any], max_capacity: int,
                   rows: int = 1) -> OnnxRuntimeDecoder:
    """A decoder for the parity checks: the graph's own weights (no float32 twin), ONNX Runtime's thread count,
    threads spinning between parallel regions (ONNX Runtime's default: the checks run alone).

    ``max_capacity``: the longest sequence (prompt plus continuation) it will be given.
    """
    return OnnxRuntimeDecoder(model_path, generation, rows=rows, max_capacity=max_capacity, spin=True)


def greedy(decoder: Decoder, prompt_ids: Sequence[int], steps: int, suppress: Sequence[int] = (),
           row: int = 0) -> tuple[list[int], np.ndarray]:
    """Greedy decoding of exactly ``steps`` tokens for one prompt, in ``row`` of ``decoder``'s cache.

    ``suppress``: ids never chosen; the end-of-generation ids make this transformers' ``min_new_tokens = steps``
    (how the parity reference was generated). Returns the generated ids and the raw logits [vocab] of the first
    generated position.
    """
    length = len(prompt_ids)
    decoder.ensure(length + steps)
    banned = list(suppress)
    logits = decoder.run(row, np.array([prompt_ids], np.int64), np.array([length - 1], np.int32))[0]
    first = logits.copy()
    ids: list[int] = []
    for _ in range(steps):
        logits[banned] = -np.inf
        token = int(np.argmax(logits))
        ids.append(token)
        if len(ids) == steps:
            break
        logits = decoder.run(row, np.array([[token]], np.int64), np.array([length], np.int32))[0]
        length += 1
    return ids, first


def teacher_forced_argmax(decoder: OnnxRuntimeDecoder, prompt_ids: Sequence[int], continuation: Sequence[int],
                          suppress: Sequence[int] = ()) -> np.ndarray:
    """The model's greedy choice at each of the ``len(continuation)`` positions when fed ``prompt_ids`` followed
    by ``continuation`` (teacher forcing), ``suppress`` ids never chosen. One prefill call when the graph returns
    the logits of every position, else one call per token.
    """
    sequence = list(prompt_ids) + list(continuation[:-1])
    decoder.ensure(len(sequence))
    if decoder.all_positions:
        logits = decoder.logits(0, np.array([sequence], np.int64), np.array([len(sequence) - 1], np.int32))
        logits = logits[0, len(prompt_ids) - 1:]
    else:
        length = len(prompt_ids)
        rows = [decoder.run(0, np.array([prompt_ids], np.int64), np.array([length - 1], np.int32))[0]]
        for token in continuation[:-1]:
            rows.append(decoder.run(0, np.array([[token]], np.int64), np.array([length], np.int32))[0])
            length += 1
        logits = np.stack(rows)
    logits[:, list(suppress)] = -np.inf
    return logits.argmax(axis=-1)
