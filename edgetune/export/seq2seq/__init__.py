"""Sequence-to-sequence (translation) models on the host: Marian and T5-family export to ONNX.

``torch_export`` writes the encoder and decoder-with-past graphs and proves them against PyTorch;
``export`` is the export stage (tokenizer check, proof, int8). The device side is
``edgetune.device.seq2seq`` (greedy decoding with numpy over onnxruntime). See docs/translation.md.
"""
