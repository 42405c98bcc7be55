"""Power-of-two quantization scales for QDQ graphs (what the Vitis AI EP's XINT8 wants).

AMD's quantizer (amd-quark) does this but pins an older onnx, so edgetune rounds the scales
of an onnxruntime QDQ model itself and checks the result:

* activation scales (QuantizeLinear/DequantizeLinear pairs share one scale initializer):
  rounded **up** to the next power of two, so the calibrated range is never clipped;
* weight scales: for each tensor (or channel) the power of two (floor or ceil of log2)
  with the lower quantization error on the original weights, which are re-quantized;
* int32 bias scales: set to the product of the (new) input and weight scales, as the
  integer accumulator needs, and the bias re-quantized.

Needs only onnx and numpy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

_QDQ = ("QuantizeLinear", "DequantizeLinear")


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


def _best_weight_scale(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: np.dtype, axis: int | None) -> np.ndarray:
    """Per tensor/channel: floor or ceil power of two, whichever reconstructs w better (MinMSE)."""
    lo_s = np.exp2(np.floor(np.log2(scale))).astype(np.float32)
    hi_s = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    if scale.size == 1:
        errs = []
        for cand in (lo_s, hi_s):
            q = _requantize(w, cand, zp, dtype, None)
            errs.append(float(np.mean(((q.astype(np.float32) - zp.astype(np.float32)) * cand - w) ** 2)))
        return lo_s if errs[0] <= errs[1] else hi_s
    out = np.empty_like(scale, dtype=np.float32)
    wt = np.moveaxis(w, axis, 0)
    for c in range(scale.size):
        best, best_err = None, None
        for cand in (lo_s[c], hi_s[c]):
            q = np.clip(np.round(wt[c] / cand) + int(zp.flat[c]), *_qrange(dtype))
            err = float(np.mean(((q - int(zp.flat[c])) * cand - wt[c]) ** 2))
            if best_err is None or err < best_err:
                best, best_err = cand, err
        out[c] = best
    return out


def round_scales(model_in: str | Path, model_out: str | Path) -> dict[str, Any]:
    """Rewrite every Q/DQ scale of a QDQ model to a power of two; returns counts of what changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_in))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    if consts:
        raise ValueError("pow2: Constant nodes holding scales are not supported; run quant_pre_process first")
    producers = {o: n for n in g.node for o in n.output}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    new_scale: dict[str, np.ndarray] = {}
    weights = biases = activations = 0
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
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in dq_nodes:
        q_name, s_name = n.input[0], n.input[1]
        if q_name not in inits or arr(q_name).dtype != np.int32:
            continue
        s = arr(s_name).astype(np.float32)
        b = arr(q_name).astype(np.float64) * s.astype(np.float64)
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
    onnx.save(model, str(model_out))
    return {"weight_scales": weights, "activation_scales": activations, "bias_scales": biases}


def check(model_path: str | Path) -> dict[str, Any]:
    """Read every Q/DQ scale of the graph and check it is an exact power of two."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
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
