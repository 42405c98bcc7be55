"""edgetune: fine-tune, merge, export, quantize, validate and bundle small models for edge devices.

Importing this package must stay cheap and must never import torch: the device side
(`edgetune.device`, `edgetune run`, `edgetune verify`) runs with only onnxruntime(-genai),
numpy and tokenizers installed.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
