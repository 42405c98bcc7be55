"""Which onnxruntime CPU kernel each MatMulNBits node of an export runs, read from the graph.

onnxruntime 1.32's CPU MatMulNBits is fast only when MLAS can prepack B at session start:

* 4-bit, no zero points or uint8 zero points, any accuracy_level: prepacked (level 4 = int8
  activations, ~2x faster than level 0 on an AVX-512 VNNI core).
* 8-bit with uint8/no zero points at accuracy_level 4: prepacked CompInt8 kernel (AVX-512 VNNI /
  AVX-VNNI / ARM dotprod). **At accuracy_level 0 an 8-bit node dequantizes B on every call**:
  measured here (AMD EPYC, AVX-512 VNNI, 1 thread, M=1, interleaved): 576x1536 9.96 ms at level 0
  vs 0.115 ms at level 4 (87x; 4-bit: 0.233 / 0.112 ms); the 576x49152 output head 689 ms vs
  6.4 ms. That is why the int8 export decoded at 1.8 tok/s (README).
* Float zero points (what onnxruntime's HQQ writes) or a ``g_idx`` input: no prepacking, B is
  dequantized to fp32 on every call (~20x slower, accuracy_level ignored).

:func:`kernel_paths` classifies every node; :func:`slow_nodes` lists those off the fast path.
Device-free: onnx and numpy only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ... import onnx_graph

PREPACKED = "prepacked"
SLOW_8BIT_LEVEL = "8-bit below accuracy_level 4: B dequantized every call"
SLOW_FLOAT_ZP = "float zero points: no prepacking, B dequantized every call"
SLOW_G_IDX = "g_idx (act-order): no prepacking, B dequantized every call"
# An int4 algorithm whose graph would miss the prepacked CPU kernels says so in its table entry
# (edgetune.quant.Int4Algorithm.slow_kernel; refused on CPU targets unless the caller allows slow
# kernels). None does today: HQQ's float zero points (onnxruntime's HQQWeightOnlyQuantConfig) are
# folded into the exact symmetric + block-sum form (edgetune.export.decoder.blockform.convert_float_zero_points),
# and every graph is still checked node by node.
# 8-bit MatMulNBits on the CPU wants accuracy_level 4 (see the module docstring).
CPU_8BIT_ACCURACY_LEVEL = 4


def eight_bit_level(profile_level: int, execution_provider: str) -> int:
    """accuracy_level to write on 8-bit MatMulNBits nodes: 4 on CPU (the only prepacked 8-bit kernel)."""
    return CPU_8BIT_ACCURACY_LEVEL if execution_provider == "cpu" else profile_level


def _zp_dtype(node, inits: dict, value_types: dict) -> str:
    import onnx

    if len(node.input) <= 3 or not node.input[3]:
        return "none"
    name = node.input[3]
    if name in inits:
        return onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type).name
    t = value_types.get(name)
    return onnx.helper.tensor_dtype_to_np_dtype(t).name if t else "unknown"


def kernel_paths(folder: Path | str) -> list[dict[str, Any]]:
    """Per MatMulNBits node of ``folder/model.onnx``: name, bits, block, accuracy_level, zero-point dtype, CPU path."""

    model = onnx_graph.read(Path(folder) / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    value_types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = onnx_graph.attributes(node)
        zp = _zp_dtype(node, inits, value_types)
        bits, level = int(a.get("bits", 4)), int(a.get("accuracy_level", 0))
        g_idx = len(node.input) > 4 and bool(node.input[4])
        if zp not in ("none", "uint8"):
            path = SLOW_FLOAT_ZP
        elif g_idx:
            path = SLOW_G_IDX
        elif bits == 8 and level != 4:
            path = SLOW_8BIT_LEVEL
        else:
            path = PREPACKED
        out.append({"node": node.name, "bits": bits, "block_size": int(a.get("block_size", 0)), "accuracy_level": level,
                    "zero_points": zp, "K": int(a.get("K", 0)), "N": int(a.get("N", 0)), "path": path})
    return out


def summary(paths: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per (bits, accuracy_level, zero points, path) and the slow nodes' names."""
    c = Counter((p["bits"], p["accuracy_level"], p["zero_points"], p["path"]) for p in paths)
    return {"groups": [{"bits": b, "accuracy_level": lv, "zero_points": z, "path": pa, "count": n} for (b, lv, z, pa), n in sorted(c.items())],
            "prepacked": sum(1 for p in paths if p["path"] == PREPACKED), "slow": [p["node"] for p in paths if p["path"] != PREPACKED]}


def slow_nodes(paths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in paths if p["path"] != PREPACKED]


def set_accuracy_level(folder: Path | str, level: int, *, bits: int | None = None) -> int:
    """Rewrite accuracy_level on the MatMulNBits nodes (of ``bits`` only, if given) of a saved export; returns the count.

    accuracy_level only selects the compute type: the stored weights do not change, so this is how the
    recipe search gets a level-4 twin of a candidate without quantizing again.
    """
    import onnx

    path = Path(folder) / "model.onnx"
    model = onnx_graph.read(path)
    n = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x for x in node.attribute}
        if bits is not None and onnx.helper.get_attribute_value(a["bits"]) != bits:
            continue
        if "accuracy_level" in a:
            a["accuracy_level"].i = level
        else:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        n += 1
    onnx_graph.save(model, path)  # graph only (read without weights): model.onnx.data is untouched
    return n
