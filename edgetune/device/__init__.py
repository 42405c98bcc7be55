"""Device side: run and measure exported models with onnxruntime(-genai), numpy and tokenizers only.

Nothing in this package (nor in what it imports) may import torch or transformers at module
level: it must run on a board with the base install. ``tests/test_device_imports.py`` proves it
in a subprocess that blocks those imports.

* :mod:`edgetune.device.llm` - load an onnxruntime-genai folder, generate, score logits.
* :mod:`edgetune.device.encoder` - ORT session for an encoder export, classify.
* :mod:`edgetune.device.metrics` - perplexity (sliding window / llama.cpp chunks), KL, agreement, F1.
* :mod:`edgetune.device.measure` - latency percentiles, peak RSS, size on disk.
* :mod:`edgetune.device.report` - the versioned JSON report and its Markdown summary.
"""
