"""The model compile pipeline: import checkpoints to ONNX, optimize, quantize, build engines, write entries."""
