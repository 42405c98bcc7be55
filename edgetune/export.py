"""`export`: one entry point for decoders (onnxruntime-genai) and encoders (optimum)."""

from __future__ import annotations

import importlib
from pathlib import Path

from .errors import BadInput
from .models import inspect, materialize


def export(model, out, *, target, precision=None, **options) -> Path:
    folder = Path(model) if Path(model).is_dir() else Path(materialize(model).path)
    info = inspect(folder)
    if info.kind == "decoder":
        from .llm.export import export_llm

        options.pop("task", None)
        return export_llm(folder, out, target=target, precision=precision, **options)
    try:
        enc = importlib.import_module("edgetune.encoder.export")
    except ImportError as e:
        raise BadInput(f"encoder export is unavailable ({e})", hint="install edgetune with its encoder extras") from None
    for k in ("int4", "adapters", "float_adapter"):
        if options.pop(k, None):
            raise BadInput(f"{k} options apply to decoder LLMs, not to a {info.model_type} encoder")
    return enc.export_encoder(folder, out, target=target, precision=precision, **options)
