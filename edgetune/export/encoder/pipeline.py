"""Export an encoder (BERT family) to one ONNX file for a target profile.

Pipeline: ``torch.onnx.export`` (TorchScript exporter, fp32, static shapes when the profile
says ``graph.static_shapes``; see torch_export.py), checked against PyTorch -> graph
optimization (transformer fusions on CPU/GPU profiles, onnxruntime's portable offline
optimizer for static-shape accelerator graphs) -> precision
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

from ... import console, onnx_graph
from ...artifacts import stage_output
from ...errors import BadInput, CheckFailed
from ...quant import ENCODER_PRECISIONS

PRECISIONS = ENCODER_PRECISIONS
TASKS = ("sequence-classification", "token-classification", "question-answering", "feature-extraction")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spm.model", "added_tokens.json")


def detect_task(config: dict[str, Any]) -> str:
    """sequence-classification / token-classification / question-answering / feature-extraction from config.architectures.

    A head edgetune does not export (masked LM, multiple choice, ...) is refused:
    exporting its body as feature-extraction would drop the head silently and ship a bundle that
    cannot answer what the model was trained for.
    """
    archs = config.get("architectures") or []
    for a in archs:
        if a.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if a.endswith("ForTokenClassification"):
            return "token-classification"
        if a.endswith("ForQuestionAnswering"):
            return "question-answering"
    heads = [a for a in archs if "For" in a]
    if heads:
        raise BadInput(f"the model's head ({heads[0]}) is not one edgetune exports: its export would drop the head",
                       hint="fine-tune for sequence or token classification or question answering, or pass --task feature-extraction to export "
                            "the encoder body on purpose")
    return "feature-extraction"


def _labels(config_json: Path, config: dict[str, Any]) -> list[str]:
    """Class labels in id order; transformers omits default LABEL_i maps, so write them back."""
    cfg = json.loads(config_json.read_text())
    id2label = cfg.get("id2label") or config.get("id2label")
    if not id2label:
        n = int(cfg.get("num_labels") or config.get("num_labels") or 2)
        id2label = {str(i): f"LABEL_{i}" for i in range(n)}
        cfg["id2label"] = id2label
        cfg["label2id"] = {v: int(k) for k, v in id2label.items()}
        config_json.write_text(json.dumps(cfg, indent=2) + "\n")
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


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
    from ...model_input import inspect
    from ...plan import encoder_precision
    from ...targets import resolve
    from . import optimize, quantize, torch_export

    target = resolve(target)
    info = inspect(model_dir)
    if info.kind != "encoder":
        raise BadInput(f"{model_dir} is a {info.kind} model ({info.model_type})", hint="export_encoder takes encoder models; use `edgetune export` for decoders")
    precision = encoder_precision(target, precision)
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
        calib = quantize.load_calibration(calibration, samples=int8.calibration_samples, pairs=True)
    fusions_on = g.transformer_fusions and precision != "int8-static"
    options = {
        "target": target.model_dump(mode="json", exclude={"source", "description", "budgets"}),
        "precision": precision, "task": task, "int8": int8.__dict__, "keep_head_float": keep_head_float,
        "fusions": fusions_on,
    }
    inputs = {"model": info.path, "calibration": calib.path if calib else None,
              "calibration_texts": calib.sha256 if calib else None}
    with console.step(f"export encoder {info.path.name} -> {precision} for {target.name}"), \
            stage_output(out, "export", inputs=inputs, options=options) as run, \
            tempfile.TemporaryDirectory(prefix=f"edgetune-encoder-{os.getpid()}-") as tmpd:
        work = Path(tmpd)
        res = run.results
        res.update(kind="encoder", task=task, precision=precision, target=target.name, model_type=info.model_type,
                   opset=g.opset, execution_provider=target.runtime.execution_provider)
        # 1. fp32 export with torch.onnx, checked against PyTorch on padded random tokens
        raw_dir = work / "fp32"
        with console.step("torch.onnx export"):
            ref, res["exporter"] = torch_export.export_fp32(
                info.path, raw_dir, task=task, opset=g.opset,
                static_shape=(g.batch_size, g.sequence_length) if static else None,
            )
        current = raw_dir / "model.onnx"
        parity = res["parity"] = {"inputs": "x".join(map(str, ref.shape)) + " random tokens, padded rows"}
        _check_parity("fp32", current, ref, parity)
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
            if precision != "fp16":  # the fp16 graph is measured below as the final model
                _check_parity("fused", current, ref, parity)
        elif static or g.optimization_level != "disable":
            folded = work / "folded.onnx"
            res["offline_optimization"] = {"level": "basic", **optimize.offline_optimize(current, folded, level="basic")}
            current = folded
        # 3. precision, 4. power-of-two scales and operator coverage
        _apply_precision(current, run.dir, precision=precision, target=target, int8=int8, calib=calib,
                         tokenizer_dir=info.path, work=work, res=res, fused_fp16=fusions_on,
                         keep_head_float=keep_head_float)
        # 5. tokenizer + config (labels)
        for name in TOKENIZER_FILES:
            if (raw_dir / name).is_file():
                shutil.copyfile(raw_dir / name, run.dir / name)
        shutil.copyfile(raw_dir / "config.json", run.dir / "config.json")
        if task in ("sequence-classification", "token-classification"):
            res["labels"] = _labels(run.dir / "config.json", info.config)
        res["size_mb"] = _size_mb(run.dir / "model.onnx")
        res["fp32_size_mb"] = _size_mb(raw_dir / "model.onnx")
        res["inputs"], _, _ = quantize.model_input_spec(run.dir / "model.onnx")
        parity["model_max_abs_diff"] = torch_export.max_abs_diff(run.dir / "model.onnx", ref)
    return Path(out)


def _check_parity(stage: str, model: Path, ref, parity: dict[str, Any]) -> None:
    """Record ``{stage}_max_abs_diff`` vs PyTorch; a float graph off by more than the tolerance is a bug."""
    from . import torch_export

    diff = parity[f"{stage}_max_abs_diff"] = torch_export.max_abs_diff(model, ref)
    if torch_export.relative(diff, ref) > torch_export.PARITY_TOLERANCE:
        raise CheckFailed(f"the {stage} ONNX graph disagrees with PyTorch (max |diff| {diff:.3g})",
                          hint="report this as a bug with the model", result=parity)


def _apply_precision(current: Path, out_dir: Path, *, precision: str, target, int8, calib, tokenizer_dir: Path,
                     work: Path, res: dict[str, Any], fused_fp16: bool = False, keep_head_float: bool = False) -> None:
    """Write ``out_dir/model.onnx`` from the float graph ``current`` at ``precision`` (+ pow2, coverage)."""
    from . import coverage as cov
    from . import pow2, quantize

    g = target.graph
    final = out_dir / "model.onnx"
    if keep_head_float and precision.startswith("int8"):
        int8.exclude_nodes = list(dict.fromkeys(int8.exclude_nodes + quantize.head_nodes(current)))
    if precision == "fp32":
        shutil.copyfile(current, final)
    elif precision == "fp16":
        if fused_fp16:  # the transformer optimizer already converted it (fusion-aware)
            shutil.copyfile(current, final)
            res["quantization"] = {"format": "fp16", "keep_io_types": True}
        else:
            res["quantization"] = quantize.to_fp16(current, final)
    elif precision == "int8-dynamic":
        with console.step("dynamic int8"):
            res["quantization"] = quantize.quantize_dynamic_int8(current, final, int8)
    else:
        names, batch, seq = quantize.model_input_spec(current)
        batches = quantize.encode_texts(tokenizer_dir, calib.texts, input_names=names, sequence_length=seq, batch_size=batch or 1)
        pow2_on = target.quantization.int8.power_of_two_scales
        qdq = work / "qdq.onnx" if pow2_on else final
        res["quantization"] = quantize.quantize_static_int8(current, qdq, int8, batches=batches, work=work)
        res["calibration"] = {"file": str(calib.path), "samples": calib.count, "sha256": calib.sha256}
        if pow2_on:
            with console.step("power-of-two scales"):
                res["pow2"] = {"rounded": pow2.round_scales(qdq, final)}
            check = pow2.check(final)
            res["pow2"]["check"] = {k: v for k, v in check.items() if k != "not_pow2"} | {"not_pow2": len(check["not_pow2"])}
            if not check["ok"]:
                raise CheckFailed(f"power-of-two check failed on {len(check['not_pow2'])} scale tensor(s)",
                                  hint="report this as a bug with the model", result=check)
    if precision.startswith("int8"):
        res["quantization"]["ops"] = quantize.quant_summary(final)
    if target.operators.supported:
        report = cov.coverage(final, target.operators.supported, batch=g.batch_size, sequence_length=g.sequence_length)
        (out_dir / "coverage.json").write_text(json.dumps(report, indent=2) + "\n")
        res["coverage"] = cov.summary(report)
        if report["unsupported_nodes"]:
            console.warn(f"{target.name}: " + cov.format_report(report, limit=0).splitlines()[0])


METHODS = {"dynamic": "int8-dynamic", "static": "int8-static", "fp16": "fp16"}
_FLOAT_SOURCE_HINT = "give the fp32 export (edgetune export --precision fp32) or a plain fp32 ONNX file"


def _source(model: Path) -> tuple[Path, Path | None]:
    """(model.onnx, folder with tokenizer/config files or None) for a file or an export folder."""
    if model.is_dir():
        onnx_file = model / "model.onnx"
        if not onnx_file.is_file():
            raise BadInput(f"no model.onnx in {model}", hint="give an ONNX file or an export folder")
        return onnx_file, model
    if model.suffix != ".onnx" or not model.is_file():
        raise BadInput(f"not an ONNX model: {model}", hint="give a .onnx file or an export folder containing model.onnx")
    return model, model.parent if (model.parent / "config.json").is_file() else None


def quantize_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target,
    method: str | None = None,
    calibration: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    calibration_method: str | None = None,
    per_channel: bool | None = None,
    exclude_nodes: list[str] | None = None,
    exclude_op_types: list[str] | None = None,
    keep_head_float: bool = False,
) -> Path:
    """Quantize an existing float encoder ONNX model (file or export folder) for ``target``.

    ``method``: dynamic | static | fp16 (default: from the profile's ``precision.encoder``).
    Static int8 tokenizes the calibration texts with the folder's tokenizer or ``tokenizer``.
    """

    from ...artifacts import read_record
    from ...plan import encoder_precision
    from ...targets import resolve
    from . import quantize

    target = resolve(target)
    onnx_file, folder = _source(Path(model))
    if method is None:
        precision = encoder_precision(target)
        if precision == "fp32":
            raise BadInput(f"target {target.name} keeps encoders in fp32: nothing to quantize", hint="pass --method dynamic|static|fp16")
    elif method in METHODS:
        precision = METHODS[method]
    else:
        raise BadInput(f"unknown method '{method}'", hint=f"choose one of: {', '.join(METHODS)}")
    record = read_record(folder) if folder else None
    prior = ((record or {}).get("results") or {}).get("precision")
    graph = onnx_graph.read(onnx_file).graph
    ops = {n.op_type for n in graph.node}
    if (prior and prior != "fp32") or ops & {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}:
        raise BadInput(f"{onnx_file} is already quantized ({prior or 'has Q/DQ nodes'})", hint=_FLOAT_SOURCE_HINT)
    fused = sorted({n.op_type for n in graph.node if n.domain == onnx_graph.MS_DOMAIN})
    if precision == "int8-static" and fused:
        raise BadInput(
            f"{onnx_file} has fused onnxruntime ops ({', '.join(fused)}); static QDQ needs the plain ONNX graph",
            hint="export with a profile that has graph.transformer_fusions = false, or use --method dynamic",
        )
    int8 = quantize.Int8Options.from_target(target, calibration_method=calibration_method, per_channel=per_channel,
                                            exclude_nodes=exclude_nodes, exclude_op_types=exclude_op_types)
    calib = tok_dir = None
    if precision == "int8-static":
        calib = quantize.load_calibration(calibration, samples=int8.calibration_samples, pairs=True)
        tok_dir = Path(tokenizer) if tokenizer else folder
        if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
            raise BadInput(f"static int8 needs the model's tokenizer to read the calibration texts; none next to {onnx_file}",
                           hint="pass --tokenizer DIR (a folder with tokenizer.json)")
    options = {"target": target.model_dump(mode="json", exclude={"source", "description", "budgets"}),
               "precision": precision, "int8": int8.__dict__, "keep_head_float": keep_head_float}
    inputs = {"model": onnx_file, "calibration": calib.path if calib else None,
              "calibration_texts": calib.sha256 if calib else None}
    with console.step(f"quantize {onnx_file.name} -> {precision} for {target.name}"), \
            stage_output(out, "quantize", inputs=inputs, options=options) as run, \
            tempfile.TemporaryDirectory(prefix=f"edgetune-quantize-{os.getpid()}-") as tmpd:
        res = run.results
        prev = (record or {}).get("results") or {}
        res.update(kind="encoder", task=prev.get("task"), precision=precision, target=target.name, source=str(onnx_file),
                   execution_provider=target.runtime.execution_provider)
        names, batch, seq = quantize.model_input_spec(onnx_file)
        res.update(static_shapes=bool(batch and seq))
        if batch and seq:
            res.update(batch_size=batch, sequence_length=seq)
        _apply_precision(onnx_file, run.dir, precision=precision, target=target, int8=int8, calib=calib,
                         tokenizer_dir=tok_dir, work=Path(tmpd), res=res, keep_head_float=keep_head_float)
        if folder:
            for name in TOKENIZER_FILES + ("config.json",):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, run.dir / name)
        if prev.get("labels"):
            res["labels"] = prev["labels"]
        res["size_mb"] = _size_mb(run.dir / "model.onnx")
        res["source_size_mb"] = _size_mb(onnx_file)
        res["inputs"] = names
    return Path(out)
