"""Decoder export: which export a request needs, and the one call that makes it.

:func:`export_llm` resolves the precision (a GGUF that was not fine-tuned keeps its own weights on a CPU
target) and dispatches: a float adapter (:mod:`.float_adapter`), runtime adapters (:mod:`.adapters`),
the exact GGUF transcode (:mod:`.gguf_export`), or the builder export (:mod:`.builder`, the core the others
build on). The adapter variants wrap a base export; they are handed :func:`base_export` rather than
importing this module, so the import graph points one way: export -> variants -> builder.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ... import console
from ...errors import BadInput
from ...plan import check_llm_precision, int4_plan, llm_precision
from ...quant import GGUF_8BIT, GGUF_8BIT_DEFAULT, LLM_PRECISIONS
from ...targets import resolve
from ...tokenizer_parity import check_tokenizer_files
from .adapters import export_with_adapters
from .builder import export_builder
from .float_adapter import export_with_float_adapter
from .gguf_export import export_gguf, gguf_source


def base_export(model_dir, out, *, target, precision: str, int4=None, calibration=None, fuse: bool = True,
                default_gguf: bool = False, gguf_8bit: str | None = None) -> Path:
    """The export of a base model at ``precision``: the GGUF transcode for gguf, else the builder's."""
    if precision == "gguf":  # the GGUF's own quantized weights, transcoded exactly (edgetune/export/decoder/gguf_export.py)
        if calibration is not None:
            raise BadInput("--calibration is not used by --precision gguf (the GGUF's weights are kept)", hint="drop --calibration")
        return export_gguf(model_dir, out, target=target, int4=int4, default=default_gguf, fuse=fuse,
                           planes=(gguf_8bit or GGUF_8BIT_DEFAULT) == "planes")
    if gguf_8bit is not None:
        raise BadInput("--gguf-8bit applies to --precision gguf only", hint="drop --gguf-8bit")
    return export_builder(model_dir, out, target=target, precision=precision, int4=int4, calibration=calibration)


def export_llm(model_dir, out, *, target, precision=None, int4=None, adapters=(), calibration=None, mixed=None,
               allow_slow_kernel=False, float_adapter=None, fuse=True, gguf_8bit: str | None = None, pack: bool = False) -> Path:
    """Export an HF decoder folder for ``target``.

    ``mixed``: layer-wise mixed precision (int4 builder algorithms): ``{"layers": [builder node names]}``
    kept at 8 bits, or ``{"fraction": f}`` / ``{"count": n}`` of the body MatMuls chosen by measured
    sensitivity on the calibration texts (:mod:`edgetune.export.decoder.mixed`). ``allow_slow_kernel``: ship a graph
    whose MatMulNBits miss the CPU's prepacked kernels (:mod:`edgetune.export.decoder.kernels`), refused otherwise.
    ``float_adapter``: a LoRA adapter folder kept as float side branches over this base (:mod:`.float_adapter`).
    ``fuse``: precision gguf (alone or under a float adapter): fuse the block-sum corrections and LoRA branches of
    the linears that share an input into one MatMul per group + one MatMul/Add per linear (:mod:`.fuse`, exact);
    ``"int8"``: fuse, then store those side weights as 8-bit MatMulNBits at accuracy_level 4
    (:func:`.fuse.quantize_side_weights`: 4x fewer side bytes per token, not exact).
    ``pack``: an int4/int8 builder export for a CPU target gets its sibling MatMulNBits (gate+up; q+k when v is 8-bit)
    packed into one node + Split (:mod:`.pack`, bit-exact; +3.5 % decode at 2 threads, none at 1, docs/llm.md).
    ``gguf_8bit``: precision gguf, the form of the GGUF's 5-, 6- and 8-bit linears: ``planes`` (a 4-bit node
    at the profile's level + a 2-/4-bit low-bits node, :meth:`~.blockform.GraphEdit.planes`) or ``int8`` (one
    8-bit node at level 4 on the CPU); default :data:`GGUF_8BIT_DEFAULT`. docs/llm.md has the measurements.
    """
    if fuse not in (True, False, "int8"):
        raise BadInput(f"unknown fuse option {fuse!r}", hint="use true, false or \"int8\"")
    if gguf_8bit not in (None, *GGUF_8BIT):
        raise BadInput(f"unknown --gguf-8bit '{gguf_8bit}'", hint=f"use {' or '.join(GGUF_8BIT)}")
    base_export_ = functools.partial(base_export, gguf_8bit=gguf_8bit)
    model_dir, out = Path(model_dir), Path(out)
    t = resolve(target)  # once: the variants and the core are handed the Target and the int4 plan
    int4 = int4_plan(t, int4)
    default_gguf = False
    if precision is None and t.runtime.resolved_builder_provider == "cpu":
        try:
            default_gguf = gguf_source(model_dir) is not None  # a GGUF not fine-tuned: keep its own weights
        except BadInput as exc:  # its GGUF moved or changed: the profile's precision, said so
            console.warn(f"precision gguf not used by default: {exc.one_line()}")
    precision = llm_precision(t, precision, gguf=default_gguf)
    if precision not in LLM_PRECISIONS:
        raise BadInput(f"unknown precision '{precision}'", hint=f"use {', '.join(LLM_PRECISIONS[:-1])} or {LLM_PRECISIONS[-1]}")
    check_llm_precision(t, precision)
    if fuse == "int8" and precision != "gguf":
        raise BadInput(f"--side-int8 stores the fused side weights of a GGUF transcode; precision {precision} has none",
                       hint="add --precision gguf (with a GGUF base), or drop --side-int8")
    if pack and (precision not in ("int4", "int8") or adapters or float_adapter):
        raise BadInput(f"--pack-siblings packs the builder's MatMulNBits: int4 or int8 exports without adapters, not "
                       f"{precision}{' with adapters' if adapters or float_adapter else ''}", hint="drop --pack-siblings")
    with console.step("tokenizer: onnxruntime-genai vs transformers (before any weight work)"):
        check_tokenizer_files(model_dir)  # exit 2 in seconds, not exit 1 after the build
    if float_adapter:  # one graph: this base export + the LoRA as float side branches (never quantized)
        if adapters:
            raise BadInput("--float-adapter and --adapter cannot be combined",
                           hint="bake one adapter in float (--float-adapter) or keep adapters switchable (--adapter), not both")
        return export_with_float_adapter(model_dir, out, target=t, precision=precision, int4=int4, adapter=float_adapter,
                                         calibration=calibration, fuse=fuse, base_export=base_export_)
    if adapters:  # runtime-switchable LoRAs: the base graph once (base_export) + one .onnx_adapter each
        return export_with_adapters(model_dir, out, target=t, precision=precision, int4=int4, adapters=adapters,
                                    calibration=calibration, base_export=base_export_)
    if precision == "gguf":
        return base_export_(model_dir, out, target=t, precision=precision, int4=int4, calibration=calibration, fuse=fuse,
                            default_gguf=default_gguf)
    if gguf_8bit is not None:
        raise BadInput("--gguf-8bit applies to --precision gguf only", hint="drop --gguf-8bit")
    return export_builder(model_dir, out, target=t, precision=precision, int4=int4, calibration=calibration, mixed=mixed,
                          allow_slow_kernel=allow_slow_kernel, pack=pack)
