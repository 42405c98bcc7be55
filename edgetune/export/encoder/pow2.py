"""Power-of-two quantization scales for QDQ graphs (what the Vitis AI EP's XINT8 wants).

AMD's quantizer (amd-quark) does this but pins an older onnx, so edgetune makes the
scales of an onnxruntime QDQ model powers of two itself and checks the result. The XINT8
recipe (``quantize_static_int8`` with ``power_of_two``) is, in order:

1. :func:`equalize` on the float graph: SmoothQuant after LayerNorm and output-channel
   equalization of MatMul/Gemm outputs that feed float Adds, with power-of-two factors
   (exact rewrites; per-tensor scales then fit the outlier channels of BERT-like models);
2. onnxruntime ``quantize_static`` (QDQ, symmetric uint8 activations, int8 weights);
3. :func:`minmse_activation_scales`: each activation scale becomes the power of two with
   the lowest quantize-dequantize error over the calibration set (AMD's MinMSE), counted
   on real tokens only and, for tensors read by constant-weight MatMuls, measured on those
   MatMuls' outputs; candidates from 4x above onnxruntime's MinMax scale down through 6
   halvings (clipping outliers when that is cheaper);
4. :func:`round_scales` with the float graph: weights re-quantized from the float
   initializers with MinMSE pow2 scales (no-clipping scale and 5 halvings), int32 bias
   scales set to input scale x weight scale and the biases re-quantized.

:func:`round_scales` alone (no float graph) keeps pow2 scales as they are, rounds any
other activation scale **up** and re-quantizes the dequantized weights: a second pass
over a finished model changes nothing. :func:`check` reads every Q/DQ scale back.

Needs onnx and numpy (onnxruntime for the calibration passes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph

_QDQ = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_STEPS = 5  # MinMSE weight candidates: the no-clipping power of two and 5 halvings (32x)


def is_pow2(value: float) -> bool:
    """True when value is exactly 2**k (k any integer)."""
    if not (value > 0 and math.isfinite(value)):
        return False
    mantissa, _ = math.frexp(float(value))
    return mantissa == 0.5


def _pow2_ceil(s: np.ndarray) -> np.ndarray:
    return np.exp2(np.ceil(np.log2(s))).astype(np.float32)


def _qrange(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _requantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: np.dtype, axis: int | None) -> np.ndarray:
    lo, hi = _qrange(dtype)
    if axis is not None and scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    return np.clip(np.round(w / scale) + zp.astype(np.int64), lo, hi).astype(dtype)


def _weight_sse(w: np.ndarray, s: float, zp: int, dtype: np.dtype) -> float:
    q = np.clip(np.round(w / s) + zp, *_qrange(dtype))
    return float(np.sum(((q - zp) * s - w).astype(np.float64) ** 2))


def _best_weight_scale(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: np.dtype, axis: int | None,
                       steps: int = WEIGHT_STEPS) -> np.ndarray:
    """Per tensor/channel MinMSE: among 2**ceil(log2(scale)) and ``steps`` halvings of it (which
    clip the largest weights), the power of two that reconstructs w with the lowest squared error."""
    hi = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    if scale.size == 1:
        cands = [float(hi.reshape(-1)[0]) / 2**i for i in range(steps + 1)]
        errs = [_weight_sse(w, c, int(zp.reshape(-1)[0]), dtype) for c in cands]
        return np.array(cands[int(np.argmin(errs))], dtype=np.float32).reshape(scale.shape)
    out = np.empty_like(scale, dtype=np.float32)
    wt = np.moveaxis(w, axis, 0)
    for c in range(scale.size):
        cands = [float(hi.flat[c]) / 2**i for i in range(steps + 1)]
        errs = [_weight_sse(wt[c], x, int(zp.flat[c]), dtype) for x in cands]
        out.flat[c] = cands[int(np.argmin(errs))]
    return out


def round_scales(model_in: str | Path, model_out: str | Path, *, float_model: str | Path | None = None) -> dict[str, Any]:
    """Rewrite every Q/DQ scale of a QDQ model to a power of two; returns counts of what changed.

    ``float_model``: the float graph the QDQ model was quantized from. Its weights (found by
    the quantizer's ``NAME_quantized`` naming) are the ones re-quantized; without it the
    int8 weights are dequantized first, which keeps their current rounding (and makes a
    second pass over an already rounded model a no-op).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx_graph.load(model_in)
    G = onnx_graph.Graph(model)
    g, inits, producers = G.g, G.initializers, G.producer
    if any(n.op_type == "Constant" for n in g.node):
        raise ValueError("pow2: Constant nodes holding scales are not supported; run quant_pre_process first")

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    originals: dict[str, Any] = {}
    if float_model is not None:
        originals = {i.name: i for i in onnx_graph.load(float_model).graph.initializer}
    new_scale: dict[str, np.ndarray] = {}
    weights = biases = activations = from_float = 0
    dq_nodes = [n for n in g.node if n.op_type == "DequantizeLinear"]
    # 1. weights: DQ nodes whose quantized input is an 8-bit initializer
    for n in dq_nodes:
        q_name, s_name = n.input[0], n.input[1]
        if q_name not in inits or s_name in new_scale:
            continue
        q = arr(q_name)
        if q.dtype not in (np.int8, np.uint8):
            continue
        s = arr(s_name).astype(np.float32)
        zp = arr(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros_like(s, dtype=q.dtype)
        axis = None
        for a in n.attribute:
            if a.name == "axis":
                axis = a.i
        if s.size > 1 and axis is None:
            axis = 1
        if axis is not None and axis < 0:
            axis += q.ndim
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis] = -1
        orig = originals.get(q_name.removesuffix("_quantized"))
        if orig is not None and tuple(orig.dims) == q.shape and orig.data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(orig).astype(np.float32)
            from_float += 1
        else:
            w = (q.astype(np.float32) - zp.astype(np.float32).reshape(shape if s.size > 1 else ())) * s.reshape(shape if s.size > 1 else ())
        s2 = _best_weight_scale(w, s, zp, q.dtype, axis if s.size > 1 else None).reshape(s.shape)
        put(q_name, _requantize(w, s2, zp, q.dtype, axis if s.size > 1 else None))
        put(s_name, s2.astype(np.float32))
        new_scale[s_name] = s2
        weights += 1
    # 2. activations: every other scale of a Q/DQ node, rounded up
    for n in g.node:
        if n.op_type not in _QDQ:
            continue
        s_name = n.input[1]
        if s_name in new_scale or s_name not in inits:
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and arr(n.input[0]).dtype == np.int32:
            continue  # bias, below
        s = arr(s_name).astype(np.float32)
        s2 = _pow2_ceil(s).reshape(s.shape)
        put(s_name, s2)
        new_scale[s_name] = s2
        activations += 1
    # 3. int32 biases: scale = input scale * weight scale of the consuming node, re-quantized
    consumers = G.consumers
    for n in dq_nodes:
        q_name, s_name = n.input[0], n.input[1]
        if q_name not in inits or arr(q_name).dtype != np.int32:
            continue
        s = arr(s_name).astype(np.float32)
        b = arr(q_name).astype(np.float64) * s.astype(np.float64)
        orig = originals.get(q_name.removesuffix("_quantized"))
        if orig is not None and tuple(orig.dims) == b.shape and orig.data_type == onnx.TensorProto.FLOAT:
            b = numpy_helper.to_array(orig).astype(np.float64)
        target = None
        for user in consumers.get(n.output[0], []):
            ins = [producers.get(x) for x in user.input[:2]]
            if all(p is not None and p.op_type == "DequantizeLinear" for p in ins):
                sa = new_scale.get(ins[0].input[1])
                sw = new_scale.get(ins[1].input[1])
                if sa is not None and sw is not None and sa.size == 1:
                    target = (sa.reshape(()) * sw).astype(np.float32).reshape(s.shape)
                    break
        s2 = target if target is not None else _pow2_ceil(s).reshape(s.shape)
        put(q_name, np.clip(np.round(b / s2), -(2**31), 2**31 - 1).astype(np.int32))
        put(s_name, s2.astype(np.float32))
        new_scale[s_name] = s2
        biases += 1
    onnx_graph.save(model, model_out)
    out = {"weight_scales": weights, "activation_scales": activations, "bias_scales": biases}
    if float_model is not None:
        out["weights_from_float"] = from_float
    return out


def check(model_path: str | Path) -> dict[str, Any]:
    """Read every Q/DQ scale of the graph and check it is an exact power of two."""
    from onnx import numpy_helper

    model = onnx_graph.read(model_path)
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    total = 0
    bad: list[dict[str, Any]] = []
    missing: list[str] = []
    for n in model.graph.node:
        if n.op_type not in _QDQ:
            continue
        s_name = n.input[1]
        if s_name in seen:
            continue
        seen.add(s_name)
        if s_name not in inits:
            missing.append(s_name)
            continue
        values = numpy_helper.to_array(inits[s_name]).astype(np.float64).ravel()
        total += values.size
        off = [float(v) for v in values if not is_pow2(float(v))]
        if off:
            bad.append({"scale": s_name, "values": off[:3], "count": len(off)})
    return {
        "ok": not bad and not missing and total > 0,
        "scale_tensors": len(seen),
        "scale_values": total,
        "not_pow2": bad,
        "not_constant": missing,
    }


# ---------------------------------------------------------------------------- MinMSE (activations)

_PASSTHROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def activation_groups(model) -> dict[str, list[str]]:
    """Activation scale initializer -> the float tensors quantized with it (QuantizeLinear inputs).

    Tensors that only move data (Reshape/Transpose/... outputs whose input uses the same
    scale) carry the same values as their source and are left out of the list.
    """
    G = onnx_graph.Graph(model)
    g, inits, producers = G.g, set(G.initializers), G.producer
    q_scale = {n.input[0]: n.input[1] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    groups: dict[str, list[str]] = {}
    for tensor, s_name in q_scale.items():
        p = producers.get(tensor)
        if p is not None and p.op_type in _PASSTHROUGH:
            # the passthrough's input comes through a DQ of a Q with the same scale: same values
            src = producers.get(p.input[0])
            if src is not None and src.op_type == "DequantizeLinear" and src.input[1] == s_name:
                groups.setdefault(s_name, [])
                continue
        groups.setdefault(s_name, []).append(tensor)
    return groups


def _sse(x: np.ndarray, scales: np.ndarray, zp: int, qmin: int, qmax: int, w: np.ndarray | None = None) -> np.ndarray:
    """Sum of squared quantize-dequantize errors of x for each candidate scale (float64 sums).

    With ``w`` (the [K, N] weights of the MatMuls reading x, K = last axis of x) the error
    is measured where it matters, on their outputs: ``sum(((Q(x) - x) @ w) ** 2)``.
    """
    out = np.empty(len(scales), dtype=np.float64)
    lo, hi = qmin - zp, qmax - zp
    if w is not None:
        x = x.reshape(-1, w.shape[0])
    for i, s in enumerate(scales):
        q = np.clip(np.rint(x / s), lo, hi)
        q *= s
        q -= x
        if w is not None:
            q = q @ w
        out[i] = float(np.dot(q.ravel(), q.ravel()))
    return out


def _reader_weights(inits: dict, consumers: dict, tensor: str) -> np.ndarray | None:
    """[K, N]: the constant weights of every MatMul/Gemm reading ``tensor`` as its A input
    (directly or through one Reshape), side by side; None if anything else reads it."""
    from onnx import numpy_helper

    mats = []
    for n in consumers.get(tensor, []):
        users = consumers.get(n.output[0], []) if n.op_type == "Reshape" and n.input[0] == tensor else [n]
        for u in users:
            w = _const_weight(u, inits)
            if w is None or u.input[0] not in (tensor, n.output[0]):
                return None
            arr = numpy_helper.to_array(inits[w[0]]).astype(np.float32)
            mats.append(arr.T if w[1] else arr)
    if not mats or len({m.shape[0] for m in mats}) != 1:
        return None
    return np.concatenate(mats, axis=1)


def minmse_activation_scales(qdq_model: str | Path, float_model: str | Path, batches: list[dict],
                             model_out: str | Path, *, steps: int = 6, headroom: int = 2,
                             details: dict | None = None, real_only: bool = True,
                             objective: str = "output") -> dict[str, Any]:
    """Set every activation scale of a QDQ model to the power of two with the lowest MSE (MinMSE).

    ``float_model`` is the float graph the QDQ model was made from (its tensor names);
    ``batches`` the calibration feeds. For each activation scale, the candidates are the
    powers of two from ``2**headroom`` times the no-clipping scale (``ceil(log2(absmax/qmax))``)
    down through ``steps`` halvings; the whole calibration set is streamed once through an
    augmented copy of the float model and each candidate's sum of squared errors kept.
    Zero points (128 for symmetric uint8, 0 for int8) and dtypes stay as the quantizer set them.
    """
    from onnx import numpy_helper

    model = onnx_graph.load(qdq_model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups = activation_groups(model)
    fm = onnx_graph.load(float_model)
    fnames = {o for n in fm.graph.node for o in n.output} | {i.name for i in fm.graph.input}

    def float_name(t: str) -> str | None:
        for cand in (t, t.removesuffix("_QuantizeLinear_Input")):
            if cand in fnames:
                return cand
        return None

    wanted: dict[str, list[str]] = {}
    for s_name, tensors in groups.items():
        wanted[s_name] = [f for f in (float_name(t) for t in tensors) if f is not None]
    # candidates: centred on the quantizer's own (MinMax) scale; the true absmax, seen while
    # streaming, can only move the no-clipping candidate up by a little (moving-average MinMax)
    meta: dict[str, tuple[np.ndarray, int, int, int]] = {}
    for s_name in list(wanted):
        s0 = float(numpy_helper.to_array(inits[s_name]).reshape(-1)[0])
        if not (s0 > 0 and math.isfinite(s0)):
            wanted[s_name] = []
            s0 = 1.0
        zp_name = next(n.input[2] for n in g.node if n.op_type == "QuantizeLinear" and n.input[1] == s_name)
        zp_arr = numpy_helper.to_array(inits[zp_name])
        qmin, qmax = _qrange(zp_arr.dtype)
        k0 = int(math.ceil(math.log2(s0)))
        ks = np.arange(k0 + headroom, k0 - steps - 1, -1)
        meta[s_name] = (np.exp2(ks).astype(np.float32), int(zp_arr.reshape(-1)[0]), qmin, qmax)
    fetch = sorted({t for ts in wanted.values() for t in ts})
    readers: dict[str, np.ndarray | None] = {}
    if objective == "output":
        F = onnx_graph.Graph(fm)
        readers = {t: _reader_weights(F.initializers, F.consumers, t) for t in fetch}
    sse = {s: np.zeros(len(meta[s][0])) for s in wanted}
    absmax = {s: 0.0 for s in wanted}
    by_tensor: dict[str, list[str]] = {}
    for s_name, ts in wanted.items():
        for t in ts:
            by_tensor.setdefault(t, []).append(s_name)
    for values, mask in _stream(fm, fetch, batches):
        for t, arr in values.items():
            x = real_tokens(np.asarray(arr, dtype=np.float32), mask if real_only else None)
            w = readers.get(t)
            if w is not None and x.shape[-1] != w.shape[0]:
                w = None
            for s_name in by_tensor[t]:
                scales, zp, qmin, qmax = meta[s_name]
                sse[s_name] += _sse(x, scales, zp, qmin, qmax, w)
                absmax[s_name] = max(absmax[s_name], float(np.abs(x).max()) if x.size else 0.0)
    changed = clipped = 0
    for s_name in wanted:
        scales, zp, qmin, qmax = meta[s_name]
        if not wanted[s_name]:
            continue
        best = float(scales[int(np.argmin(sse[s_name]))])
        old = numpy_helper.to_array(inits[s_name])
        new = np.full(old.shape, best, dtype=np.float32)
        inits[s_name].CopyFrom(numpy_helper.from_array(new, s_name))
        if details is not None:
            details[s_name] = {"candidates": scales.tolist(), "sse": sse[s_name].tolist(), "absmax": absmax[s_name],
                               "chosen": best, "tensors": wanted[s_name], "zero_point": zp}
        changed += 1
        if absmax[s_name] > (qmax - zp) * best:
            clipped += 1
    # scales whose tensors the float model lacks (or pure passthroughs): leave to round_scales (ceil)
    onnx_graph.save(model, model_out)
    return {"method": "minmse", "objective": objective, "weighted": sum(w is not None for w in readers.values()),
            "activation_scales": changed, "clipping": clipped,
            "not_calibrated": len(groups) - changed, "batches": len(batches)}


# ---------------------------------------------------------------------------- equalization (float graph)


def real_tokens(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The part of an activation that belongs to real tokens (``attention_mask`` 1), padding dropped.

    With static shapes most positions of a short text are padding: their values never reach
    the output (the mask removes them from attention) but would dominate calibration
    statistics. Tensors laid out [B*S, ...] or [B, ..., S, ...] (first axis after the batch
    with the sequence length) are cut to the real rows; anything else is returned as is.
    """
    if mask is None or x.ndim < 2:
        return x
    b, seq = mask.shape
    keep = mask.astype(bool)
    if seq <= 1 or keep.all():
        return x
    if x.ndim == 2 and x.shape[0] == b * seq:
        return x[keep.reshape(-1)]
    if x.ndim >= 3 and x.shape[0] == b:
        for ax in range(1, x.ndim):
            if x.shape[ax] == seq:
                return np.moveaxis(x, ax, 1)[keep]
    return x


def _stream(model, tensors: list[str], batches: list[dict]):
    """Run a copy of ``model`` exposing ``tensors`` as outputs; yield ({name: array}, attention mask or None) per batch."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for feeds in batches:
        yield dict(zip(tensors, sess.run(list(tensors), feeds))), feeds.get("attention_mask")


def _const_weight(node, inits) -> tuple[str, bool] | None:
    """(weight initializer, transposed) of a MatMul/Gemm whose B is a 2-D initializer; else None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("transA", 0) or len(inits[node.input[1]].dims) != 2:
        return None
    return node.input[1], bool(attrs.get("transB", 0))


def _pow2_round(x: np.ndarray) -> np.ndarray:
    return np.exp2(np.round(np.log2(x))).astype(np.float32)


def _fake_pow2(x: np.ndarray, *, weights: np.ndarray | None = None) -> np.ndarray:
    """x quantized per tensor to symmetric int8 with the MinMSE power-of-two scale (errors
    measured on ``x @ weights`` when given), then dequantized."""
    amax = float(np.abs(x).max())
    if not amax > 0:
        return x
    k0 = math.ceil(math.log2(amax / 127))
    best = None
    for k in range(k0, k0 - WEIGHT_STEPS - 1, -1):
        s = 2.0**k
        e = np.clip(np.rint(x / s), -128, 127) * s - x
        err = float(np.sum((e @ weights) ** 2 if weights is not None else e**2))
        if best is None or err < best[0]:
            best = (err, s)
    s = best[1]
    return (np.clip(np.rint(x / s), -128, 127) * s).astype(np.float32)


def _matmul_error(x: np.ndarray, w: np.ndarray, a: np.ndarray) -> float:
    """Squared error of (x/a) @ (a*w) with both sides int8 pow2 per tensor, against x @ w."""
    xs, ws = x / a[None, :], w * a[:, None]
    return float(np.sum((_fake_pow2(xs, weights=ws) @ _fake_pow2(ws) - x @ w) ** 2))


def equalize(float_in: str | Path, float_out: str | Path, batches: list[dict], *, smooth_after: tuple[str, ...] = ("LayerNormalization",),
             migrations: tuple = (None, 0.25, 0.5, 0.75), outlier_ratio: float = 4.0, real_only: bool = True) -> dict[str, Any]:
    """Move per-channel ranges between activations and weights so per-tensor scales fit.

    An exact rewrite of the float graph, before quantization, with power-of-two factors (a
    multiply by 2**k is a shift for fixed-point hardware and exact in float):

    * **SmoothQuant** (AMD's quantizer offers it for transformers): where a tensor X made
      by a float op (``smooth_after``, LayerNormalization by default) feeds MatMul/Gemm
      with constant weights (directly or through a Reshape keeping the last axis), those
      consumers read ``X * (1/a)`` from a new ``Mul`` and the weight rows are multiplied by
      ``a``; ``a_c = max|X_c|**m / max|W_c|**(1-m)`` rounded to a power of two and normalised
      so the median channel keeps 1. The migration strength m is searched per site among
      ``migrations`` (None: no smoothing) for the lowest error of the int8 MatMul output
      on the calibration rows. Other consumers (the residual Add) still read X. This takes
      the LayerNorm outlier channels out of the int8 MatMul inputs.
    * **output-channel equalization** (as cross-layer equalization does, with an explicit
      float ``Mul`` because a residual Add and LayerNorm follow): a MatMul/Gemm with
      constant weights whose output (directly or through one Reshape) only feeds float Adds
      and whose output channels c reach more than ``outlier_ratio`` times the median channel
      range gets weight column c (and bias) divided by ``b_c`` (power of two) and a
      ``Mul(b)`` after it, so its int8 output is not dominated by one outlier channel.

    Channel ranges come from the calibration ``batches``. Returns counts.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx_graph.load(float_in)
    G = onnx_graph.Graph(model)
    g, inits, consumers = G.g, G.initializers, G.consumers

    def keeps_last_axis(reshape, channels: int) -> bool:
        shape = inits.get(reshape.input[1]) if len(reshape.input) > 1 else None
        return shape is not None and int(numpy_helper.to_array(shape).reshape(-1)[-1]) == channels

    def channels_of(name: str) -> int | None:
        for n in consumers.get(name, []):
            w = _const_weight(n, inits)
            if w is not None and n.input[0] == name:
                dims = inits[w[0]].dims
                return int(dims[1] if w[1] else dims[0])
        return None

    # 1. SmoothQuant sites: X -> [(matmul, reshape or None)]
    smooth: dict[str, list] = {}
    for n in g.node:
        if n.op_type not in smooth_after:
            continue
        x = n.output[0]
        users = []
        for c in consumers.get(x, []):
            if _const_weight(c, inits) is not None and c.input[0] == x:
                users.append((c, None))
            elif c.op_type == "Reshape":
                k = channels_of(c.output[0])
                if k is not None and keeps_last_axis(c, k):
                    users += [(c2, c) for c2 in consumers.get(c.output[0], [])
                              if _const_weight(c2, inits) is not None and c2.input[0] == c.output[0]]
        if users and all(len(consumers.get(r.output[0], [])) == 1 for _, r in users if r is not None):
            smooth[x] = users
    # 2. output-equalization sites: matmul output -> (matmul, reshape or None)
    outeq: dict[str, tuple] = {}
    for n in g.node:
        if _const_weight(n, inits) is None:
            continue
        via, users = None, consumers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type == "Reshape":
            via = users[0]
            users = consumers.get(via.output[0], [])
        if users and all(u.op_type == "Add" for u in users):
            outeq[n.output[0]] = (n, via)
    # channel ranges over the calibration set
    ranges: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {x: [] for x in smooth}
    wanted = list(smooth) + list(outeq)
    if wanted:
        for values, mask in _stream(model, wanted, batches):
            for t, v in values.items():
                v = real_tokens(np.asarray(v, dtype=np.float32), mask if real_only else None)
                v = v.reshape(-1, v.shape[-1])
                a = np.abs(v).max(axis=0)
                ranges[t] = a if t not in ranges else np.maximum(ranges[t], a)
                if t in samples:
                    samples[t].append(v)
    new_nodes: dict[str, list] = {}
    smoothed = equalized = 0
    chosen: list[float] = []
    for x, users in smooth.items():
        mats, wmax = [], np.zeros_like(ranges[x])
        for c, _ in users:
            name, trans = _const_weight(c, inits)
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            mats.append(w.T if trans else w)
            wmax = np.maximum(wmax, np.abs(mats[-1]).max(axis=1))
        xs = np.concatenate(samples.pop(x))
        if len(xs) > 4096:
            xs = xs[np.linspace(0, len(xs) - 1, 4096).astype(int)]
        wcat = np.concatenate(mats, axis=1)
        # migration strength per site (as AWQ/SmoothQuant's auto search): the candidate whose
        # per-tensor pow2 int8 MatMul output is closest to the float one on the calibration rows
        best = None
        for m in migrations:
            if m is None:
                a = np.ones_like(wmax)
            else:
                a = np.power(np.maximum(ranges[x], 1e-6), m) / np.power(np.maximum(wmax, 1e-6), 1 - m)
                a = _pow2_round(a)
                a = (a / _pow2_round(np.array([np.median(a)]))[0]).astype(np.float32)
            err = _matmul_error(xs, wcat, a)
            if best is None or err < best[0]:
                best = (err, m, a)
        _, m, a = best
        chosen.append(-1.0 if m is None else m)
        if np.all(a == 1):
            continue
        inv = numpy_helper.from_array((1.0 / a).astype(np.float32), f"{x}_smooth_inv")
        g.initializer.append(inv)
        xs = f"{x}_smooth"
        new_nodes.setdefault(x, []).append(helper.make_node("Mul", [x, inv.name], [xs], name=f"{x}_smooth_mul"))
        done: set[str] = set()
        for c, via in users:
            (via if via is not None else c).input[0] = xs
            name, trans = _const_weight(c, inits)
            if name in done:
                continue
            done.add(name)
            w = numpy_helper.to_array(inits[name])
            w = w * (a[None, :] if trans else a[:, None])
            inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))
        smoothed += 1
    for y, (n, via) in outeq.items():
        r = ranges[y]
        b = np.exp2(np.maximum(0.0, np.ceil(np.log2(np.maximum(r, 1e-12) / (outlier_ratio * np.median(r)))))).astype(np.float32)
        if np.all(b == 1):
            continue
        name, trans = _const_weight(n, inits)
        w = numpy_helper.to_array(inits[name])
        w = w / (b[:, None] if trans else b[None, :])
        inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits:
            bias = numpy_helper.to_array(inits[n.input[2]])
            inits[n.input[2]].CopyFrom(numpy_helper.from_array((bias / b).astype(np.float32), n.input[2]))
        last = via if via is not None else n
        out = last.output[0]
        last.output[0] = f"{out}_equalized"
        factor = numpy_helper.from_array(b, f"{out}_equalize_scale")
        g.initializer.append(factor)
        new_nodes.setdefault(last.output[0], []).append(
            helper.make_node("Mul", [last.output[0], factor.name], [out], name=f"{out}_equalize_mul"))
        equalized += 1
    if new_nodes:
        nodes = []
        for n in g.node:
            nodes.append(onnx.NodeProto.FromString(n.SerializeToString()))
            for o in n.output:
                nodes.extend(new_nodes.get(o, []))
        del g.node[:]
        g.node.extend(nodes)
    onnx_graph.save(model, float_out)
    return {"smoothquant": smoothed, "output_equalized": equalized, "migration": chosen, "outlier_ratio": outlier_ratio}
