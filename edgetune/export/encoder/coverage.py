"""Operator coverage: which nodes an accelerator cannot take and would give back to the CPU.

Compares each node of an ONNX graph with the profile's ``[operators].supported`` list and
reports every unsupported node with its share of the model's work, measured two ways:

* **FLOPs**, estimated from shapes (inferred with the profile's static batch/sequence
  length): 2·M·N·K for MatMul/Gemm, per-element costs for the rest;
* **time** (optional): per-node kernel times from an onnxruntime CPU profiling run with
  graph optimizations off (so node names match the file), as a proxy for the share of
  work that would fall back.

For a QDQ model it also reports how much of the work is int8: a node counts as int8 when
every float tensor it reads comes out of a DequantizeLinear (the QDQ node units an EP like
Vitis AI can take as integer ops); the others compute in float (LayerNorm, Softmax, GELU's
Erf, residual Adds kept out of quantization) even when their op type is supported.

Needs onnx, numpy (and onnxruntime for timing): runs on a device too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph

# ops that move or reshape data (no arithmetic): 0 FLOPs
_ZERO = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Gather", "Shape",
    "Identity", "Constant", "ConstantOfShape", "Expand", "Cast", "Split", "Pad", "Tile", "Range",
    "QuantizeLinear", "DequantizeLinear", "Dropout", "Size", "NonZero", "GatherElements", "ScatterND",
}
# per output element cost of common non-linear ops
_PER_ELEMENT = {"Softmax": 5, "LayerNormalization": 8, "Erf": 8, "Gelu": 8, "FastGelu": 8, "Tanh": 4, "Sigmoid": 4,
                "Sqrt": 1, "Pow": 1, "Exp": 2, "Log": 2, "SkipLayerNormalization": 9, "BiasGelu": 9}


def _static_copy(model, batch: int, seq: int):
    """A copy with symbolic input dims replaced (batch, sequence) and shapes inferred."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if not d.HasField("dim_value"):
                d.dim_value = batch if i == 0 else seq
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # custom-domain ops: shapes stay partial, FLOPs get estimated where known
        return m


def _float_tensors(model) -> set[str]:
    """Names of the float32 tensors of an (inferred) model."""
    import onnx

    g = model.graph
    out = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            out.add(vi.name)
    return out


def _shapes(model) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def node_flops(node, shapes: dict[str, list[int]]) -> int:
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    n_out = int(np.prod(out)) if out is not None else 0
    if op in _ZERO:
        return 0
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulNBits"):
        a = shapes.get(node.input[0])
        if a is None or out is None:
            return 0
        k = a[-1]
        if op == "Gemm":
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            k = a[0] if trans_a else a[-1]
        return 2 * n_out * k
    if op == "Conv":
        w = shapes.get(node.input[1])
        if w is None or out is None:
            return 0
        return 2 * n_out * int(np.prod(w[1:]))
    if op == "Attention":
        a, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if a is None or w is None:
            return 0
        b, s, h = a
        return 2 * b * s * h * w[1] + 4 * b * s * s * h
    if op == "Einsum":
        # upper bound: product of all distinct index sizes
        eq = next((x.s.decode() for x in node.attribute if x.name == "equation"), "")
        sizes: dict[str, int] = {}
        for term, name in zip(eq.split("->")[0].split(","), node.input):
            shp = shapes.get(name)
            if shp is None or len(shp) != len(term):
                return n_out
            sizes.update(dict(zip(term, shp)))
        return 2 * int(np.prod(list(sizes.values()))) if sizes else n_out
    if op == "TopK":
        x = shapes.get(node.input[0])
        return int(np.prod(x)) * max(1, int(np.log2(max(2, x[-1])))) if x else 0
    return _PER_ELEMENT.get(op, 1) * n_out


def _op_key(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def node_times(model_path: Path, batch: int, seq: int, runs: int = 5) -> dict[str, float]:
    """Per-node kernel time (µs, summed over runs) from an onnxruntime CPU profile, optimizations off."""
    import onnxruntime as ort

    model = onnx_graph.read(model_path)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    elem = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 9: np.bool_}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq) for i, d in enumerate(t.shape.dim)]
        dtype = elem.get(t.elem_type, np.float32)
        feeds[inp.name] = np.ones(dims, dtype=dtype) if inp.name == "attention_mask" else np.zeros(dims, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix=f"edgetune-coverage-{os.getpid()}-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "cov")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up (still profiled; counted once, like the rest)
        for _ in range(runs):
            sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, float] = defaultdict(float)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            times[ev["name"][: -len("_kernel_time")]] += float(ev.get("dur", 0))
    return dict(times)


def coverage(model_path: str | Path, supported: list[str], *, batch: int = 1, sequence_length: int = 128,
             timing: bool = False) -> dict[str, Any]:
    """Coverage report of a model against an operator list (empty list: everything is supported)."""

    model_path = Path(model_path)
    model = onnx_graph.read(model_path)
    inferred = _static_copy(model, batch, sequence_length)
    shapes = _shapes(inferred)
    floats = _float_tensors(inferred)
    producers = onnx_graph.Graph(model).producer
    qdq = any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    float_flops = 0
    float_ops: Counter = Counter()
    allowed = set(supported)
    everything = not allowed
    times = node_times(model_path, batch, sequence_length) if timing else {}
    total_flops = 0
    total_time = sum(times.values())
    rows = []
    for i, node in enumerate(model.graph.node):
        f = node_flops(node, shapes)
        total_flops += f
        key = _op_key(node)
        if qdq and node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(
                i in floats and (i not in producers or producers[i].op_type != "DequantizeLinear") for i in node.input if i):
            float_flops += f
            if f or node.op_type not in _ZERO:
                float_ops[key] += 1
        ok = everything or key in allowed or (node.domain in ("", "ai.onnx") and node.op_type in allowed)
        if not ok:
            rows.append({"node": node.name or f"#{i}", "op_type": key, "flops": f, "time_us": round(times.get(node.name, 0.0), 1)})
    n_nodes = len(model.graph.node)
    unsup_flops = sum(r["flops"] for r in rows)
    unsup_time = sum(r["time_us"] for r in rows)
    by_op = Counter(r["op_type"] for r in rows)
    return {
        "model": str(model_path),
        "nodes": n_nodes,
        "supported_nodes": n_nodes - len(rows),
        "unsupported_nodes": len(rows),
        "unsupported_pct_nodes": round(100 * len(rows) / n_nodes, 2) if n_nodes else 0.0,
        "total_flops": total_flops,
        "unsupported_flops": unsup_flops,
        "unsupported_pct_flops": round(100 * unsup_flops / total_flops, 3) if total_flops else 0.0,
        "unsupported_pct_time": round(100 * unsup_time / total_time, 2) if timing and total_time else None,
        "unsupported_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "unsupported": rows,
        "int8_pct_flops": round(100 * (total_flops - float_flops) / total_flops, 3) if qdq and total_flops else None,
        "float_compute_by_op": dict(sorted(float_ops.items(), key=lambda kv: -kv[1])) if qdq else None,
        "shapes": {"batch": batch, "sequence_length": sequence_length},
        "operator_list": "all" if everything else f"{len(allowed)} ops",
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short form kept in a record (no per-node list)."""
    return {k: report.get(k) for k in ("nodes", "unsupported_nodes", "unsupported_pct_nodes", "unsupported_pct_flops",
                                       "unsupported_pct_time", "unsupported_by_op", "int8_pct_flops", "float_compute_by_op")}


def format_report(report: dict[str, Any], *, limit: int = 20) -> str:
    lines = [
        f"{report['unsupported_nodes']} of {report['nodes']} nodes fall back to the CPU "
        f"({report['unsupported_pct_nodes']}% of nodes, {report['unsupported_pct_flops']}% of FLOPs"
        + (f", {report['unsupported_pct_time']}% of CPU time" if report.get("unsupported_pct_time") is not None else "")
        + ")",
    ]
    if report.get("int8_pct_flops") is not None:
        floats = ", ".join(f"{k} x{v}" for k, v in (report.get("float_compute_by_op") or {}).items())
        lines.append(f"int8 (Q/DQ) compute: {report['int8_pct_flops']}% of FLOPs" + (f"; in float: {floats}" if floats else ""))
    if report["unsupported_by_op"]:
        lines.append("by op type: " + ", ".join(f"{k} x{v}" for k, v in report["unsupported_by_op"].items()))
        rows = sorted(report["unsupported"], key=lambda r: -r["flops"])[:limit]
        from ...console import table

        lines.append(table(rows, ["node", "op_type", "flops", "time_us"]))
        if len(report["unsupported"]) > limit:
            lines.append(f"... {len(report['unsupported']) - limit} more (use --json for all)")
    return "\n".join(lines)
