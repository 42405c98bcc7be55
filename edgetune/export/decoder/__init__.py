"""Decoder LLMs: ONNX export through onnxruntime-genai's model builder."""
