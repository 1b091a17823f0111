"""Tiny real ONNX models, built with onnx.helper, and a repository folder holding them."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = [helper.make_opsetid("", 17)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="appliance-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def add_constant(path: Path, constant: float = 1.0, width: int = 4) -> Path:
    """FP32 [-1, width] -> OUTPUT0 = INPUT0 + constant."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "c"], ["OUTPUT0"])],
        "add_constant",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor("c", TensorProto.FLOAT, [1], [constant])],
    )
    return _save(graph, path)


def int64_double(path: Path) -> Path:
    """INT64 [-1, 3] -> DOUBLED = IDS * 2."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["IDS", "two"], ["DOUBLED"])],
        "int64_double",
        [helper.make_tensor_value_info("IDS", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("DOUBLED", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor("two", TensorProto.INT64, [1], [2])],
    )
    return _save(graph, path)


def two_in_two_out(path: Path) -> Path:
    """A, B FP32 [-1, 2] -> SUM = A + B, DIFF = A - B."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["SUM"]), helper.make_node("Sub", ["A", "B"], ["DIFF"])],
        "two_in_two_out",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2]) for n in ("A", "B")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2]) for n in ("SUM", "DIFF")],
    )
    return _save(graph, path)


def fixed_matmul(path: Path) -> Path:
    """No batch dimension: X FP32 [2, 2] -> Y = X @ [[1, 2], [3, 4]]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "fixed_matmul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor("W", TensorProto.FLOAT, [2, 2], [1, 2, 3, 4])],
    )
    return _save(graph, path)


def write_version(root: Path, name: str, version: int, model_toml: str, build) -> Path:
    """Create ``root/name/version`` with ``model.toml`` and the model built by ``build(path)``."""
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(model_toml)
    build(folder / "model.onnx")
    return folder


BATCHED = """
task = "tensor"
[batching]
max_batch_size = {max_batch}
max_queue_delay_microseconds = {delay_us}
"""


def standard_repository(root: Path) -> Path:
    """The repository most tests serve."""
    write_version(root, "add_one", 1, BATCHED.format(max_batch=64, delay_us=200),
                  lambda p: add_constant(p, 1.0))
    write_version(root, "int_double", 1, BATCHED.format(max_batch=16, delay_us=0), int64_double)
    write_version(root, "two_io", 1, BATCHED.format(max_batch=8, delay_us=0), two_in_two_out)
    write_version(root, "fixed", 1, 'task = "tensor"\n', fixed_matmul)
    return root


WORDS = ["<eos>", "[UNK]"] + [f"w{i}" for i in range(30)]  # the word-level vocabulary of write_word_generator


def write_word_generator(root: Path, name: str, model_toml: str) -> Path:
    """A generative entry with no weights: a word-level tokenizer over :data:`WORDS`, a chat template that joins the
    messages' contents; ``model_toml`` sets its tier and scheduler sizes. Its decoder is a test's own fake."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = root / name / "1"
    folder.mkdir(parents=True)
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    (folder / "generation.json").write_text(json.dumps({"max_seq_len": 64, "eos_token_ids": [0],
                                                        "vocab_size": len(WORDS)}))
    (folder / "model.toml").write_text(model_toml)
    return folder
