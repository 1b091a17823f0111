"""Engines and decoders by ``[engine] kind``: the registries, the ONNX Runtime defaults, and the model manager
making every version through the factories it was given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import tiny_models
from appliance.config import ConfigError
from appliance.engine_factory import create_engine, default_decoders, default_engines, onnxruntime_engine
from appliance.engine_registry import DecoderRegistry, EngineRegistry
from appliance.engines.base import Decoder, Engine
from appliance.engines.generation import SamplingParams
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine
from appliance.errors import ModelLoadFailed
from appliance.model_spec import ModelSpec, read_model_spec
from appliance.models import EmbeddingModel, GenerativeModel, ModelVersion, TensorModel
from appliance.repository import ModelManager
from conftest import make_config
from fake_decoders import FixedCacheDecoder

VOCAB = ["<eos>", "hello", "world", "again"]


def spec_of_kind(kind: str, folder: Path = Path("/models/m/1")) -> ModelSpec:
    spec = ModelSpec(name="m", version=1, path=folder)
    spec.engine.kind = kind
    return spec


def test_an_unknown_kind_is_refused_with_the_known_ones():
    engines = EngineRegistry({"onnxruntime": onnxruntime_engine, "variant": onnxruntime_engine})
    with pytest.raises(ConfigError) as refused:
        engines(spec_of_kind("tensorrt"), make_config(Path("/nowhere"), Path("/nowhere")))
    assert str(refused.value) == ("/models/m/1/model.toml: [engine] kind = 'tensorrt' has no engine; the engine "
                                  "kinds are 'onnxruntime', 'variant'")
    with pytest.raises(ConfigError, match="has no decoder; the decoder kinds are none"):
        DecoderRegistry().factory_for(spec_of_kind("onnxruntime"))


def test_a_registry_makes_what_the_spec_kind_names():
    made: list[str] = []

    def variant(spec, config):
        made.append(spec.engine.kind)
        return "a variant engine"

    engines = default_engines()
    engines.register("variant", variant)
    assert engines.kinds == ["auto", "onnxruntime", "tensorrt", "variant"]
    assert engines(spec_of_kind("variant"), None) == "a variant engine" and made == ["variant"]


def test_the_default_kinds_are_registered_for_engines_and_decoders(tmp_path):
    assert default_engines().kinds == ["auto", "onnxruntime", "tensorrt"]
    assert default_decoders().kinds == ["auto", "onnxruntime"]
    folder = tiny_models.write_version(tmp_path, "add_one", 1, 'task = "tensor"\n[engine]\nintra_op_threads = 2\n',
                                       tiny_models.add_constant)
    engine = create_engine(read_model_spec("add_one", 1, folder), make_config(tmp_path, tmp_path / "state"))
    assert isinstance(engine, OnnxRuntimeEngine) and isinstance(engine, Engine)
    engine.load()
    assert "intra_op_threads=2" in engine.description  # the model's [engine] table over the server's setting
    np.testing.assert_array_equal(engine.run({"INPUT0": np.zeros((1, 4), np.float32)})["OUTPUT0"], np.ones((1, 4)))


class CountingDecoder(FixedCacheDecoder):
    """A :class:`Decoder` that always predicts the token after the last one it was given."""

    description = "counting decoder"

    def __init__(self, rows: int, max_capacity: int) -> None:
        super().__init__(rows, max_capacity)
        self.calls: list[tuple[int, list[list[int]]]] = []
        self.closed = False

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        self.calls.append((start_row, input_ids.tolist()))
        logits = np.zeros((len(input_ids), len(VOCAB)), np.float32)
        logits[np.arange(len(input_ids)), (input_ids[:, -1] + 1) % len(VOCAB)] = 1.0
        return logits

    def close(self) -> None:
        self.closed = True


def write_generate_model(root: Path) -> None:
    folder = root / "counter" / "1"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text('task = "generate"\n[tokenizer]\nmax_seq_length = 32\n'
                                       "[generation]\nmax_running = 2\nkv_capacity = 32\n")
    (folder / "generation.json").write_text(json.dumps({"max_seq_len": 64, "eos_token_ids": [0]}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = Tokenizer(WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


async def test_the_manager_makes_every_version_with_the_factories_it_was_given(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, tiny_models.BATCHED.format(max_batch=4, delay_us=0),
                              tiny_models.add_constant)
    write_generate_model(repo)
    engines_made: list[str] = []
    decoders: list[CountingDecoder] = []

    def recording_engine(spec, config):
        engines_made.append(spec.name)
        return onnxruntime_engine(spec, config)

    def counting_decoder(spec, config, generation, limits):
        assert generation["eos_token_ids"] == [0] and (limits.slots, limits.capacity) == (2, 32)
        decoders.append(CountingDecoder(limits.slots, limits.capacity))
        return decoders[-1]

    manager = ModelManager(make_config(repo, tmp_path / "state"), EngineRegistry({"onnxruntime": recording_engine}),
                           decoder_factory=DecoderRegistry({"onnxruntime": counting_decoder}))
    states = await manager.load_all()
    assert [(s.name, s.state) for s in states] == [("add_one", "READY"), ("counter", "READY")]
    tensor, generative = manager.resolve("add_one"), manager.resolve("counter")
    assert engines_made == ["add_one"] and len(decoders) == 1 and isinstance(decoders[0], Decoder)
    assert isinstance(tensor, TensorModel) and isinstance(tensor, ModelVersion)
    assert isinstance(generative, GenerativeModel) and not isinstance(generative, EmbeddingModel)
    assert isinstance(tensor, TensorModel) and tensor.batcher is not None
    assert isinstance(generative, GenerativeModel) and generative.generator is not None and generative.engines == []
    assert generative.context_limit == 32
    assert generative.description == "counting decoder, prefill chunk 256"
    decoder = decoders[0]
    assert decoder.calls[0] == (0, [[1] * 8])  # the warmup: a short prefill, then one step
    assert len(decoder.calls) == 2
    prompt = generative.text.encode(["hello"], add_special_tokens=False)[0]
    sequence = generative.generator.submit(prompt, SamplingParams(temperature=0, max_tokens=5))
    tokens = []
    while not tokens or tokens[-1].finish_reason is None:
        tokens.append(await sequence.events.get())
    assert [t.token for t in tokens] == [2, 3, 0]  # hello -> world -> again -> <eos>
    assert tokens[-1].finish_reason == "stop"
    await manager.close()
    assert decoder.closed


async def test_a_decoder_smaller_than_the_model_asks_fails_the_load_not_the_swap(tmp_path):
    repo = tmp_path / "repo"
    write_generate_model(repo)
    made: list[CountingDecoder] = []

    def one_row(spec, config, generation, limits):
        made.append(CountingDecoder(1, limits.capacity))
        return made[-1]

    manager = ModelManager(make_config(repo, tmp_path / "state"), decoder_factory=one_row)
    with pytest.raises(ModelLoadFailed, match="the decoder holds 1 rows x 32 tokens, fewer than the 2 x 32"):
        await manager.load("counter")
    assert [(s.name, s.state) for s in manager.index()] == [("counter", "UNAVAILABLE")]
    assert made[0].closed and not made[0].calls  # released without a warmup
