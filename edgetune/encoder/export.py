"""Export an encoder (BERT family) to one ONNX file for a target profile.

Pipeline: optimum-onnx ``main_export`` (fp32, static shapes when the profile says
``graph.static_shapes``) -> graph optimization (transformer fusions on CPU/GPU profiles,
onnxruntime's portable offline optimizer for static-shape accelerator graphs) -> precision
(fp32, fp16, int8-dynamic, int8-static with calibration) -> power-of-two scales when the
profile asks -> operator coverage vs the profile's operator list. Output: ``model.onnx``,
tokenizer files, ``config.json`` (labels), ``coverage.json`` (accelerator profiles) and the
record ``edgetune.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import console
from ..artifacts import stage_output
from ..errors import BadInput, CheckFailed, require

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
TASKS = {
    # edgetune task -> optimum task
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "feature-extraction": "feature-extraction",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spm.model", "added_tokens.json")


def detect_task(config: dict[str, Any]) -> str:
    """sequence-classification / token-classification / feature-extraction from config.architectures."""
    archs = config.get("architectures") or []
    for a in archs:
        if a.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if a.endswith("ForTokenClassification"):
            return "token-classification"
    return "feature-extraction"


def _size_mb(p: Path) -> float:
    return round(p.stat().st_size / 2**20, 3)


def export_encoder(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target,
    precision: str | None = None,
    task: str | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_method: str | None = None,
    per_channel: bool | None = None,
    exclude_nodes: list[str] | None = None,
    exclude_op_types: list[str] | None = None,
    keep_head_float: bool = False,
) -> Path:
    """Export ``model_dir`` (HF encoder folder) to ``out`` for ``target``; returns ``out``.

    ``precision`` overrides the profile's ``precision.encoder``; ``task`` is detected from
    ``config.architectures`` when not given. The int8 options override the profile's
    ``[quantization.int8]``; ``keep_head_float`` keeps the classifier head in float.
    """
    from ..models import inspect
    from ..targets import load_target
    from . import coverage as cov
    from . import optimize, pow2, quantize

    target = load_target(target)
    info = inspect(model_dir)
    if info.kind != "encoder":
        raise BadInput(f"{model_dir} is a {info.kind} model ({info.model_type})", hint="export_encoder takes encoder models; use `edgetune export` for decoders")
    precision = precision or target.precision.encoder
    if precision not in PRECISIONS:
        raise BadInput(f"unknown encoder precision '{precision}'", hint=f"choose one of: {', '.join(PRECISIONS)}")
    task = task or detect_task(info.config)
    if task not in TASKS:
        raise BadInput(f"unknown encoder task '{task}'", hint=f"choose one of: {', '.join(TASKS)}")
    g = target.graph
    static = g.static_shapes
    int8 = quantize.Int8Options.from_target(
        target, calibration_method=calibration_method, per_channel=per_channel,
        exclude_nodes=exclude_nodes, exclude_op_types=exclude_op_types,
    )
    calib = None
    if precision == "int8-static":  # read (and fail on) the calibration file before any work
        calib = quantize.load_calibration(calibration, samples=int8.calibration_samples)
    fusions_on = g.transformer_fusions and precision != "int8-static"
    options = {
        "target": target.model_dump(mode="json", exclude={"source", "description", "budgets"}),
        "precision": precision, "task": task, "int8": int8.__dict__, "keep_head_float": keep_head_float,
        "fusions": fusions_on,
    }
    inputs = {"model": info.path, "calibration": calib.path if calib else None,
              "calibration_texts": calib.sha256 if calib else None}
    optimum_onnx = require("optimum.exporters.onnx", purpose="encoder export (optimum-onnx)")
    with console.step(f"export encoder {info.path.name} -> {precision} for {target.name}"), \
            stage_output(out, "export", inputs=inputs, options=options) as run, \
            tempfile.TemporaryDirectory(prefix="edgetune-encoder-") as tmpd:
        work = Path(tmpd)
        res = run.results
        res.update(kind="encoder", task=task, precision=precision, target=target.name, model_type=info.model_type,
                   opset=g.opset, execution_provider=target.runtime.execution_provider)
        # 1. fp32 export with optimum
        raw_dir = work / "optimum"
        shape_kwargs: dict[str, Any] = {}
        if static:
            shape_kwargs = {"no_dynamic_axes": True, "batch_size": g.batch_size, "sequence_length": g.sequence_length}
        with console.step("optimum main_export"):
            optimum_onnx.main_export(
                str(info.path), raw_dir, task=TASKS[task], opset=g.opset, do_validation=False,
                library_name="transformers", trust_remote_code=False, local_files_only=True, **shape_kwargs,
            )
        current = raw_dir / "model.onnx"
        if static:
            res.update(static_shapes=True, batch_size=g.batch_size, sequence_length=g.sequence_length)
        else:
            res.update(static_shapes=False)
        # 2. graph optimization
        res["fusions"] = {}
        if fusions_on:
            fused = work / "fused.onnx"
            with console.step("transformer fusions"):
                res["fusions"] = optimize.transformer_fusions(
                    current, fused, model_type=info.model_type,
                    num_heads=int(info.config.get("num_attention_heads", 0)), hidden_size=int(info.config.get("hidden_size", 0)),
                    fp16=precision == "fp16",
                )
            current = fused
        elif static or g.optimization_level != "disable":
            folded = work / "folded.onnx"
            res["offline_optimization"] = {"level": "basic", **optimize.offline_optimize(current, folded, level="basic")}
            current = folded
        # 3. precision
        final = run.dir / "model.onnx"
        if keep_head_float and precision.startswith("int8"):
            int8.exclude_nodes = list(dict.fromkeys(int8.exclude_nodes + quantize.head_nodes(current)))
        if precision == "fp32":
            shutil.copyfile(current, final)
        elif precision == "fp16":
            if fusions_on:  # the optimizer already converted (fusion-aware)
                shutil.copyfile(current, final)
                res["quantization"] = {"format": "fp16", "keep_io_types": True}
            else:
                res["quantization"] = quantize.to_fp16(current, final)
        elif precision == "int8-dynamic":
            with console.step("dynamic int8"):
                res["quantization"] = quantize.quantize_dynamic_int8(current, final, int8)
        else:
            names, batch, seq = quantize.model_input_spec(current)
            batches = quantize.encode_texts(info.path, calib.texts, input_names=names, sequence_length=seq,
                                            batch_size=batch or 1)
            qdq = final if not target.quantization.int8.power_of_two_scales else work / "qdq.onnx"
            res["quantization"] = quantize.quantize_static_int8(current, qdq, int8, batches=batches, work=work)
            res["calibration"] = {"file": str(calib.path), "samples": calib.count, "sha256": calib.sha256}
            if target.quantization.int8.power_of_two_scales:
                with console.step("power-of-two scales"):
                    res["pow2"] = {"rounded": pow2.round_scales(qdq, final)}
                check = pow2.check(final)
                res["pow2"]["check"] = {k: v for k, v in check.items() if k != "not_pow2"} | {"not_pow2": len(check["not_pow2"])}
                if not check["ok"]:
                    raise CheckFailed(f"power-of-two check failed on {len(check['not_pow2'])} scale tensor(s)",
                                      hint="report this as a bug with the model", result=check)
        if precision.startswith("int8"):
            res["quantization"]["ops"] = quantize.quant_summary(final)
        # 4. operator coverage for accelerator profiles
        if target.operators.supported:
            report = cov.coverage(final, target.operators.supported, batch=g.batch_size, sequence_length=g.sequence_length)
            (run.dir / "coverage.json").write_text(json.dumps(report, indent=2) + "\n")
            res["coverage"] = cov.summary(report)
            if report["unsupported_nodes"]:
                console.warn(f"{target.name}: " + cov.format_report(report, limit=0).splitlines()[0])
        # 5. tokenizer + config (labels)
        for name in TOKENIZER_FILES:
            if (raw_dir / name).is_file():
                shutil.copyfile(raw_dir / name, run.dir / name)
        shutil.copyfile(raw_dir / "config.json", run.dir / "config.json")
        cfg = info.config
        if task != "feature-extraction" and cfg.get("id2label"):
            res["labels"] = [cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int)]
        res["size_mb"] = _size_mb(final)
        res["fp32_size_mb"] = _size_mb(raw_dir / "model.onnx")
        res["inputs"], _, _ = quantize.model_input_spec(final)
    return Path(out)
