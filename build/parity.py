"""Parity checks: how closely a built variant reproduces its reference graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
