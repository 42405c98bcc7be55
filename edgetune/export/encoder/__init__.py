"""Encoder models (BERT family) to ONNX: torch.onnx export, transformer fusions, int8/fp16
quantization with onnxruntime, power-of-two scales for Vitis AI, operator coverage.

Host side: torch/transformers are imported lazily inside functions. ``pow2`` and
``coverage`` need only onnx + numpy (+ onnxruntime for timing), so a device can run them.
"""
