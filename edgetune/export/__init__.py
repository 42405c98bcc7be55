"""`export`: one entry point for decoders (onnxruntime-genai builder, :mod:`.decoder`), encoders (torch.onnx +
onnxruntime's optimizer and quantizer, :mod:`.encoder`) and translation models (:mod:`.seq2seq`).

The automatic recipe search (export several recipes, validate each, keep one) is :mod:`edgetune.recipes`, above
this package: `edgetune export` and `edgetune build` call :func:`edgetune.recipes.export_with_recipe`."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import BadInput
from ..model_input import inspect, materialize
from ..quant import SEARCH_FLAGS
from ..targets import resolve

# options that only a decoder export takes: refused (exit 2) for an encoder or a translation model
DECODER_OPTIONS = ("int4", "adapters", "float_adapter", "mixed", "recipe", "candidates", "data", "time_budget_s",
                   "allow_slow_kernel", "fuse", "gguf_8bit", "pack")
# options of the encoder's int8 quantizer: refused for a translation model too
ENCODER_QUANT_OPTIONS = ("calibration", "calibration_method", "per_channel", "exclude_nodes", "exclude_op_types", "keep_head_float")


def export(model, out, *, target, precision=None, **options) -> Path:
    """Export ``model`` for ``target`` (a profile name or path, or a resolved Target: ``targets.resolve``).

    ``int4`` may be the overrides dict or an :class:`edgetune.plan.Int4Plan` already checked (the build's).
    """
    folder = Path(model) if Path(model).is_dir() else Path(materialize(model).path)
    info = inspect(folder)
    if info.kind == "decoder":
        from .decoder.dispatch import export_llm
        from .decoder.proof import check_runtime_shapes

        check_runtime_shapes(info.config, str(folder))
        options.pop("task", None)
        recipe = options.pop("recipe", None)
        if recipe == "auto":
            raise BadInput("the automatic recipe search is edgetune.recipes.export_with_recipe (it validates), not export",
                           hint="call edgetune.recipes.export_with_recipe, or `edgetune export --recipe auto`")
        if recipe not in (None, "profile"):
            raise BadInput(f"unknown recipe '{recipe}'", hint="use profile or auto")
        search = [flag for k, flag in SEARCH_FLAGS.items() if k in options]
        if search:
            raise BadInput(f"{', '.join(search)} only apply to --recipe auto", hint="add --recipe auto")
        return export_llm(folder, out, target=resolve(target), precision=precision, **options)
    if info.kind == "seq2seq":
        from .seq2seq.pipeline import export_seq2seq

        for k in DECODER_OPTIONS + ENCODER_QUANT_OPTIONS:
            if options.pop(k, None):
                raise BadInput(f"{k} options do not apply to a {info.model_type} translation model",
                               hint="translation exports take --precision fp32 or int8 (dynamic) only")
        return export_seq2seq(folder, out, target=target, precision=precision, task=options.pop("task", None))
    try:
        enc = importlib.import_module("edgetune.export.encoder.pipeline")
    except ImportError as e:
        raise BadInput(f"encoder export is unavailable ({e})", hint="install edgetune with its encoder extras") from None
    for k in DECODER_OPTIONS:
        if options.pop(k, None):
            raise BadInput(f"{k} options apply to decoder LLMs, not to a {info.model_type} encoder")
    return enc.export_encoder(folder, out, target=target, precision=precision, **options)
