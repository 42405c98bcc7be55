"""int8 and fp16 for encoder ONNX models with ``onnxruntime.quantization``.

* ``dynamic``: int8 weights, activations quantized at run time (QOperator: MatMulInteger,
  DynamicQuantizeLinear). No calibration; the CPU default.
* ``static``: int8 weights and activations in QDQ format, activation ranges calibrated on
  real texts (:class:`TextCalibrationReader`, any file ``edgetune.data.load_dataset`` reads)
  with MinMax, Entropy, Percentile or Distribution; per-channel weights; symmetric or
  asymmetric activations; ``quant_pre_process`` first; nodes or op types kept in float.
  With ``power_of_two`` (profiles with ``power_of_two_scales``, Vitis AI XINT8) the QDQ
  model gets the recipe of :mod:`edgetune.export.encoder.pow2`: pow2 SmoothQuant/equalization
  before quantization, MinMSE pow2 activation and weight scales after it.
* ``fp16``: float16 weights and compute with fp32 inputs/outputs, for GPU profiles.
"""

from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ... import console, onnx_graph
from ...artifacts import sha256_bytes
from ...errors import BadInput, require
from ...resources import data_dir

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
PROJECT_CALIBRATION = data_dir("calibration")  # the checkout's, or <prefix>/share/edgetune/calibration
DEFAULT_CALIBRATION = "sms-like.jsonl"


@dataclass
class Int8Options:
    """What the profile's ``[quantization.int8]`` says, overridable per call."""

    per_channel: bool = True
    weight_type: str = "qint8"
    activation_type: str = "quint8"
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    calibration_method: str = "minmax"
    calibration_samples: int = 64
    exclude_op_types: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)
    reduce_range: bool = False
    # XINT8 (Vitis AI): power-of-two scales chosen by MinMSE, after SmoothQuant/equalization
    power_of_two: bool = False

    @classmethod
    def from_target(cls, target, **overrides: Any) -> "Int8Options":
        q = target.quantization.int8
        opts = cls(
            per_channel=q.per_channel,
            weight_type=q.weight_type,
            activation_type=q.activation_type,
            weight_symmetric=q.weight_symmetric,
            activation_symmetric=q.activation_symmetric,
            calibration_method=q.calibration_method,
            calibration_samples=q.calibration_samples,
            exclude_op_types=list(q.exclude_op_types),
            exclude_nodes=list(q.exclude_nodes),
            power_of_two=q.power_of_two_scales,
        )
        for k, v in overrides.items():
            if v is None:
                continue
            if k in ("exclude_op_types", "exclude_nodes"):
                v = list(getattr(opts, k)) + [x for x in v if x not in getattr(opts, k)]
            setattr(opts, k, v)
        if opts.calibration_method not in CALIBRATION_METHODS:
            raise BadInput(f"unknown calibration method '{opts.calibration_method}'", hint=f"choose one of: {', '.join(CALIBRATION_METHODS)}")
        return opts


# ---------------------------------------------------------------------------- calibration


@dataclass
class CalibrationSet:
    path: Path
    texts: list  # strings, or (question, context) pairs for SQuAD records (tokenized as pairs, as `run` does)
    sha256: str  # hash of the texts actually used (order and content)

    @property
    def count(self) -> int:
        return len(self.texts)


def resolve_calibration(path: str | os.PathLike | None) -> Path:
    """A calibration file: the given path, a name in the project's calibration/, or the default set."""
    if path is None:
        p = PROJECT_CALIBRATION / DEFAULT_CALIBRATION
        console.warn(f"no calibration data given; using the project's generic set {p.name} (pass --calibration with texts like yours)")
        return p
    p = Path(path).expanduser()
    if not p.exists() and (PROJECT_CALIBRATION / str(path)).is_file():
        return PROJECT_CALIBRATION / str(path)
    return p


def load_calibration(path: str | os.PathLike | None, *, samples: int, pairs: bool = False) -> CalibrationSet:
    """Read calibration texts (first ``samples`` records); missing/empty files raise BadInput (exit 2).

    ``pairs``: SQuAD records become (question, context) pairs (an encoder reads them as a pair),
    otherwise they are joined into one text."""
    from ...data import load_dataset, texts

    p = resolve_calibration(path)
    if p.is_dir():
        raise BadInput(f"calibration data must be a file, got the folder {p}", hint="give a .jsonl/.csv/.tsv/.txt file")
    try:
        ds = load_dataset(p, limit=samples)
    except BadInput as exc:
        raise BadInput(f"calibration: {exc.message}", hint=exc.hint) from None
    items: list = [t for t in texts(ds) if t.strip()]
    if pairs and ds.format == "qa":  # question answering: the model reads (question, context) pairs
        items = [(r["question"], r["context"]) for r in ds.records]
    if ds.path.suffix.lower() in (".txt", ".text", ".md"):
        # one record holding the whole text: calibrate on its non-empty lines
        items = [line for line in items[0].splitlines() if line.strip()][:samples]
    if not items:
        raise BadInput(f"calibration: no usable text in {p}", hint="give records with a non-empty 'text' field")
    digest = sha256_bytes("\n\0".join(t if isinstance(t, str) else "\x1f".join(t) for t in items).encode())
    return CalibrationSet(path=p, texts=items, sha256=digest)


def encode_texts(tokenizer_dir: Path, items: list[str], *, input_names: list[str], sequence_length: int | None, batch_size: int = 1):
    """Tokenize texts into the ONNX model's int64 inputs, batch by batch (numpy only: no torch)."""
    import numpy as np
    from tokenizers import Tokenizer

    tj = Path(tokenizer_dir) / "tokenizer.json"
    if not tj.is_file():
        raise BadInput(f"no tokenizer.json in {tokenizer_dir}", hint="give the export folder, or --tokenizer with the model's tokenizer")
    tok = Tokenizer.from_file(str(tj))
    max_len = sequence_length or 128
    tok.enable_truncation(max_length=max_len)
    if sequence_length:
        tok.enable_padding(length=sequence_length, pad_id=tok.token_to_id("[PAD]") or 0)
    else:
        tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        if sequence_length and len(chunk) < batch_size:  # static batch: pad with repeats
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        enc = tok.encode_batch(chunk)
        feeds = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }
        batches.append({k: v for k, v in feeds.items() if k in input_names})
    return batches


def model_input_spec(model_path: Path) -> tuple[list[str], int | None, int | None]:
    """Input names and the static (batch, sequence_length) of the model, None where dynamic."""

    m = onnx_graph.read(model_path)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    batch = dims[0] if dims else None
    seq = dims[1] if len(dims) > 1 else None
    return [i.name for i in inputs], batch, seq


def _reader(batches: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class TextCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    return TextCalibrationReader()


# ---------------------------------------------------------------------------- quantizers


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[name]


def _op_types(model_path: Path, registry: Iterable[str], exclude: list[str]) -> list[str]:

    present = {n.op_type for n in onnx_graph.read(model_path).graph.node}
    return sorted(op for op in registry if op in present and op not in set(exclude))


def _check_nodes(model_path: Path, names: list[str]) -> None:

    have = {n.name for n in onnx_graph.read(model_path).graph.node}
    missing = [n for n in names if n not in have]
    if missing:
        raise BadInput(
            f"node(s) to exclude not in the model: {', '.join(missing[:5])}",
            hint="list node names with `edgetune quantize MODEL --coverage-only --json` or Netron",
        )


def head_nodes(model_path: Path) -> list[str]:
    """Names of the classifier head: the quantizable nodes producing a graph output."""

    g = onnx_graph.read(model_path).graph
    outs = {o.name for o in g.output}
    return [n.name for n in g.node if set(n.output) & outs and n.op_type in ("Gemm", "MatMul", "Add")]


def mask_only_nodes(model_path: Path) -> list[str]:
    """Nodes computing only from ``attention_mask`` (and constants): the additive mask path.

    Its fill value (float32 min, -3.4e38) cannot be quantized meaningfully and breaks
    histogram calibration (Entropy/Percentile), so static quantization keeps it in float.
    """

    g = onnx_graph.read(model_path).graph
    inits = {i.name for i in g.initializer}
    deps: dict[str, frozenset[str]] = {i.name: frozenset([i.name]) for i in g.input if i.name not in inits}
    out = []
    for n in g.node:  # ONNX graphs are topologically sorted
        d = frozenset().union(*(deps.get(i, frozenset()) for i in n.input if i))
        for o in n.output:
            deps[o] = d
        if d == frozenset(["attention_mask"]):
            out.append(n.name)
    return out


def quantize_dynamic_int8(src: Path, dst: Path, opts: Int8Options) -> dict[str, Any]:
    """Dynamic int8 (QOperator): int8 weights, activation ranges computed at run time."""
    require("onnxruntime", purpose="int8 quantization")
    import onnx
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    _check_nodes(src, opts.exclude_nodes)
    ops = _op_types(src, IntegerOpsRegistry, opts.exclude_op_types)
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=ops,
        per_channel=opts.per_channel,
        reduce_range=opts.reduce_range,
        weight_type=_qtype(opts.weight_type),
        nodes_to_exclude=opts.exclude_nodes or None,
        # fused com.microsoft ops (Attention, SkipLayerNormalization) have no ONNX shape
        # inference: tell the quantizer their outputs are float
        extra_options={"WeightSymmetric": opts.weight_symmetric, "MatMulConstBOnly": True,
                       "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"format": "qoperator", "op_types": ops, "per_channel": opts.per_channel, "weight_type": opts.weight_type,
            "excluded_nodes": opts.exclude_nodes, "excluded_op_types": opts.exclude_op_types}


def quantize_static_int8(src: Path, dst: Path, opts: Int8Options, *, batches: list[dict], work: Path) -> dict[str, Any]:
    """Static int8 QDQ: quant_pre_process, calibrate on ``batches``, quantize weights and activations."""
    require("onnxruntime", purpose="int8 quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_nodes(src, opts.exclude_nodes)
    pre = work / "preprocessed.onnx"
    with console.step("quant_pre_process"):
        # when symbolic shape inference is incomplete, onnxruntime saves "sym_shape_infer_temp.onnx"
        # (+ external data) into the current directory: keep that inside the work folder
        src_abs, pre_abs = str(Path(src).resolve()), str(pre.resolve())
        with contextlib.chdir(work):
            quant_pre_process(src_abs, pre_abs, skip_optimization=False, auto_merge=True)
    xint8: dict[str, Any] = {}
    if opts.power_of_two:
        from . import pow2

        eq = work / "equalized.onnx"
        with console.step(f"SmoothQuant + output equalization on {len(batches)} batches"):
            xint8["equalize"] = pow2.equalize(pre, eq, batches)
        pre = eq
    ops = _op_types(pre, QDQRegistry, opts.exclude_op_types)
    mask_nodes = mask_only_nodes(pre)
    # pre-processing renames nothing the user can name, but may drop folded nodes
    excluded = list(dict.fromkeys(opts.exclude_nodes + mask_nodes))
    # calibration goes by op type, not by node: drop op types whose every node is excluded,
    # or their tensors (the -3.4e38 mask) still reach the histogram calibrators

    nodes = onnx_graph.read(pre).graph.node
    ops = [op for op in ops if any(n.op_type == op and n.name not in set(excluded) for n in nodes)]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }[opts.calibration_method]
    extra = {
        "ActivationSymmetric": opts.activation_symmetric,
        "WeightSymmetric": opts.weight_symmetric,
        "CalibTensorRangeSymmetric": opts.activation_symmetric,
        "CalibMovingAverage": opts.calibration_method == "minmax",
    }
    if opts.calibration_method == "percentile":
        extra["CalibPercentile"] = 99.999
    # onnxruntime's histogram calibrators print progress on stdout: keep stdout for results
    raw = work / "qdq-float-scales.onnx" if opts.power_of_two else dst
    with console.step(f"calibrate {opts.calibration_method} on {len(batches)} batches"), console.results_only_stdout():
        quantize_static(
            str(pre),
            str(raw),
            _reader(batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=opts.per_channel,
            reduce_range=opts.reduce_range,
            activation_type=_qtype(opts.activation_type),
            weight_type=_qtype(opts.weight_type),
            nodes_to_exclude=excluded or None,
            calibrate_method=method,
            extra_options=extra,
        )
    if opts.power_of_two:
        mse = work / "qdq-minmse.onnx"
        with console.step(f"MinMSE power-of-two activation scales on {len(batches)} batches"):
            xint8["activations"] = pow2.minmse_activation_scales(raw, pre, batches, mse)
        with console.step("MinMSE power-of-two weight scales"):
            xint8["weights"] = pow2.round_scales(mse, dst, float_model=pre)
    res = {"format": "qdq", "op_types": ops, "per_channel": opts.per_channel, "weight_type": opts.weight_type,
            "activation_type": opts.activation_type, "weight_symmetric": opts.weight_symmetric,
            "activation_symmetric": opts.activation_symmetric, "calibration_method": opts.calibration_method,
            "excluded_nodes": opts.exclude_nodes, "excluded_op_types": opts.exclude_op_types, "pre_process": True,
            "mask_path_kept_float": len(mask_nodes)}
    if xint8:
        res["xint8"] = xint8
    return res


def to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """float16 weights and compute, fp32 inputs/outputs (for GPU profiles)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx_graph.load(src), keep_io_types=True)
    onnx_graph.save(m, dst)
    return {"format": "fp16", "keep_io_types": True}


def quant_summary(model_path: Path) -> dict[str, int]:
    """Counts of the quantization ops in a graph (what a reader checks first)."""

    counts: dict[str, int] = {}
    for n in onnx_graph.read(model_path).graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                         "QLinearMatMul", "QGemm", "QAttention", "DynamicQuantizeMatMul"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
