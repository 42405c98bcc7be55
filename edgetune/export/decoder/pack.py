"""Pack sibling quantized linears into one MatMulNBits: the same arithmetic in fewer, larger kernels.

The builder writes one MatMulNBits per projection. Projections that read the same input with the same quantization
(gate and up of every MLP; q and k when ``--mixed-8bit v_proj`` splits v off the packed qkv; q, k and v when an
adapter made the builder write them apart) can be one node whose weight rows are the siblings' rows stacked, followed
by a ``Split`` into the original outputs:

    [y_1 | y_2] = MatMulNBits(x; [B_1; B_2], [s_1; s_2], [z_1; z_2], N = N_1 + N_2)

Each output column is computed from its own rows, block scales and zero points exactly as before (the kernels work
per column; at accuracy_level 4 the int8 quantization of ``x`` is per input block, the same for every column), so the
graph computes bit for bit what the unpacked one did (checked in the tests). What changes is the dispatch: one kernel
call per group instead of one per projection, and at level 4 one quantization of ``x`` instead of one per projection.

Only exact siblings are packed: same input tensor, same ``K``, ``bits``, ``block_size`` and ``accuracy_level``, the
same optional inputs present, every weight input a constant initializer, no ``g_idx`` or bias. The packed node is named
for what it holds (``.../mlp/gate_up_proj/MatMul_Q4``, ``.../attn/qk_proj/MatMul_Q4``), so
:func:`edgetune.export.decoder.packed.hf_linears` maps it back to its HF linears.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph
from .packed import SIBLINGS, builder_linear, packed_name


def _key(node, G: onnx_graph.Graph) -> tuple | None:
    if node.op_type != "MatMulNBits" or node.domain != onnx_graph.MS_DOMAIN:
        return None
    ins = list(node.input)
    if len(ins) > 4 or any(i and i not in G.constants for i in ins[1:]):  # g_idx / bias, or a weight computed at run time
        return None
    a = onnx_graph.attributes(node)
    return (ins[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0), tuple(bool(i) for i in ins[1:]))


def pack_siblings(model) -> dict[str, Any]:
    """Pack every group of sibling MatMulNBits of ``model`` (in place); returns what was packed."""
    from onnx import helper, numpy_helper

    G = onnx_graph.Graph(model)
    groups: dict[tuple, list] = {}
    for node in G.g.node:
        key = _key(node, G)
        if key is not None:
            groups.setdefault(key, []).append(node)
    new_nodes, new_inits, replaced, packed = [], [], set(), []
    for key, nodes in groups.items():
        parsed = [builder_linear(n.name) for n in nodes]
        if len(nodes) < 2 or any(p is None for p in parsed) or len({(p[0], p[1]) for p in parsed}) != 1:
            continue  # only the linears of one block of one layer (the builder's names tell which)
        layer, block, _ = parsed[0]
        packed_proj = packed_name([p[2] for p in parsed])
        if packed_proj is None:
            continue
        order = SIBLINGS[packed_proj]  # the rows in the packed linear's own order (gate before up)
        nodes = [n for _, n in sorted(zip(parsed, nodes), key=lambda pn: order.index(pn[0][2]))]
        name = f"/model/layers.{layer}/{block}/{packed_proj}/MatMul_Q{key[2]}"
        a = onnx_graph.attributes(nodes[0])
        sizes = [int(onnx_graph.attributes(n)["N"]) for n in nodes]
        inputs = [nodes[0].input[0]]
        for j in range(1, len(nodes[0].input)):
            if not nodes[0].input[j]:
                inputs.append("")
                continue
            parts = [G.array(n.input[j]) for n in nodes]
            tensor = f"{name}.input{j}"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(np.concatenate(parts, axis=0)), tensor))
            inputs.append(tensor)
        out = f"{name}/output_0"
        attrs = {k: v for k, v in a.items() if k != "N"}
        new_nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=name, domain=onnx_graph.MS_DOMAIN, N=sum(sizes), **attrs))
        split = f"{name}/split_sizes"  # a Constant node, never external data: shape inference reads it
        new_nodes.append(helper.make_node("Constant", [], [split], name=f"{split}/Constant",
                                          value=numpy_helper.from_array(np.array(sizes, np.int64), f"{split}/value")))
        new_nodes.append(helper.make_node("Split", [out, split], [n.output[0] for n in nodes], name=f"{name}/Split", axis=-1))
        replaced.update(id(n) for n in nodes)
        packed.append({"node": name, "from": [n.name for n in nodes], "N": sizes})
    if packed:
        onnx_graph.set_nodes(G.g, [n for n in G.g.node if id(n) not in replaced] + new_nodes, new_inits)
    return {"groups": len(packed), "nodes": packed}


def pack_folder(folder: Path) -> dict[str, Any]:
    """:func:`pack_siblings` on ``folder/model.onnx`` (rewritten with its ``model.onnx.data`` only when a group was packed)."""
    path = Path(folder) / "model.onnx"
    model = onnx_graph.load(path)
    info = pack_siblings(model)
    if info["groups"]:
        onnx_graph.save(model, path, external=True, size_threshold=0)
    return info
