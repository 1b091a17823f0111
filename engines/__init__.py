"""Engines (ONNX Runtime, TensorRT) and the schedulers that feed them."""
