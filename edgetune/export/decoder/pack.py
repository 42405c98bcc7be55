"""Pack sibling quantized linears into one MatMulNBits: the same arithmetic in fewer, larger kernels.

The builder writes one MatMulNBits per projection. Projections that read the same input with the same quantization
(gate and up of every MLP; q and k when ``--mixed-8bit v_proj`` splits v off the packed qkv; q, k and v when an
adapter made the builder write them apart, or a GGUF transcode wrote them apart) can be one node whose weight rows are
the siblings' rows stacked, followed by a ``Split`` into the original outputs:

    [y_1 | y_2] = Split(MatMulNBits(x; [B_1; B_2], [s_1; s_2], [z_1; z_2], N = N_1 + N_2))

Each output column is computed from its own rows, block scales and zero points exactly as before (the kernels work
per column; at accuracy_level 4 the int8 quantization of ``x`` is per input block, the same for every column), so the
graph computes bit for bit what the unpacked one did (checked in the tests). What changes is the dispatch: one kernel
call per group instead of one per projection, and at level 4 one quantization of ``x`` instead of one per projection.

After the fusion of a GGUF export (:mod:`.fuse`) a linear with a side term is ``y_i = MatMulNBits_i(x) + z @ W2_i``
with the group's shared ``z`` (block sums of ``x``, LoRA ``x @ A``). Such siblings are packed with their side terms:

    [y_1 | y_2 | ...] = Split(MatMulNBits(x; [B_1; B_2; ...], ...) + z @ [W2_1 | W2_2 | ...])

one quantized kernel, one side MatMul (W2 a Concat of constants, folded at load) and one Add per group; the side
MatMul's columns are the same dot products over ``z``. A linear with a side term and one without stay apart. Siblings
whose side terms read different inputs (each its own LoRA ``x @ A``) have their quantized nodes packed alone, each Add
then reading its Split output.

Only exact siblings are packed: same input tensor, same ``K``, ``bits``, ``block_size`` and ``accuracy_level``, the
same optional inputs present, every weight input a constant initializer or a ``Cast`` of one (the GGUF transcode's
fp16 scales; beside fp32 ones, as a Q4_1 linear beside a Q4_K one, all are stored fp32: the Cast is exact), no
``g_idx`` or bias, the linears of one block of one layer (the builder's names tell which). The packed node is named for
what it holds, with the node name the siblings had (``.../mlp/gate_up_proj/MatMul_Q4`` in a builder graph,
``.../attn/qkv_proj/MatMulNBits`` or a GGUF plane's ``..._lo`` in a transcode), so
:func:`edgetune.export.decoder.packed.hf_linears` maps it back to its HF linears.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph
from ...onnx_graph import Graph, live_nodes, set_nodes
from .packed import SIBLINGS, builder_linear, packed_name


def _stored(G: Graph, name: str) -> tuple[np.ndarray, int | None] | None:
    """A MatMulNBits weight input as stored: a constant initializer (``(array, None)``) or a ``Cast`` of one (the GGUF
    transcode's fp16 scales: ``(fp16 array, to)``); None for anything computed."""
    if name in G.constants:
        return G.array(name), None
    p = G.producer.get(name)
    if p is not None and p.op_type == "Cast" and p.input[0] in G.constants:
        return G.array(p.input[0]), next(a.i for a in p.attribute if a.name == "to")
    return None


def _stack(parts: list) -> tuple[np.ndarray | None, int | None] | None:
    """The siblings' stored forms of one MatMulNBits input (:func:`_stored`) stacked along N: ``(array, Cast to)``;
    ``(None, None)`` for an absent input; fp16 scales behind a Cast beside fp32 ones (a Q4_1 linear beside a Q4_K one)
    are all stored in fp32 (the Cast is exact); None where they cannot be one tensor."""
    from onnx import TensorProto

    if parts[0][0] is None:
        return None, None
    to = parts[0][1]
    if any(p[1] != to for p in parts):
        if any(p[1] not in (None, TensorProto.FLOAT) or (p[1] is None and p[0].dtype != np.float32) for p in parts):
            return None
        parts, to = [(p[0].astype(np.float32), None) for p in parts], None
    if len({p[0].dtype for p in parts}) != 1 or len({p[0].shape[1:] for p in parts}) != 1:
        return None
    return np.ascontiguousarray(np.concatenate([p[0] for p in parts], axis=0)), to


def pack_siblings(model) -> dict[str, Any]:
    """Pack every group of sibling MatMulNBits of ``model`` (in place); returns what was packed."""
    from onnx import helper, numpy_helper

    G = Graph(model)
    groups: dict[tuple, list] = {}
    for m in G.g.node:
        if m.op_type != "MatMulNBits" or m.domain != onnx_graph.MS_DOMAIN:
            continue
        stored = [_stored(G, i) if i else (None, None) for i in m.input[1:]]
        parsed = builder_linear(m.name)
        if len(m.input) > 4 or any(st is None for st in stored) or parsed is None:
            continue  # g_idx / bias, a weight computed at run time, or no builder linear
        add, mm = G.only_consumer(m.output[0]), None  # the fused form: Add(MatMulNBits(x), MatMul(z, W2))
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") and list(add.input[:1]) == [m.output[0]]:
            mm = G.producer.get(add.input[1]) if len(add.input) == 2 else None
            if mm is None or mm.op_type != "MatMul" or G.only_consumer(add.input[1]) is not add:
                mm = None
        a = onnx_graph.attributes(m)
        key = (m.input[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0),
               tuple(st[0] is not None for st in stored), mm.input[0] if mm is not None else None,
               m.name.rsplit("/", 1)[-1], parsed[:2])  # (the node's own name: MatMulNBits, or a GGUF plane's _hi / _lo)
        groups.setdefault(key, []).append((parsed[2], m, mm, add if mm is not None else None, stored))
    # siblings whose side terms read different inputs (each linear its own LoRA ``x @ A``, say) cannot share one side
    # MatMul: their quantized nodes are packed alone, each Add reading its Split output as it read the node's
    alone: dict[tuple, list] = {}
    for key, members in groups.items():
        if key[6] is not None and len(members) == 1:
            alone.setdefault(key[:6] + (None,) + key[7:], []).append(members[0])
    for key, members in alone.items():
        if len(members) > 1 and len(groups.get(key, [])) < 2:
            for m in members:
                del groups[key[:6] + (m[2].input[0],) + key[7:]]
            groups[key] = groups.get(key, []) + [(proj, m, None, None, st) for proj, m, _, _, st in members]
    new_nodes, new_inits, removed, packed = [], [], set(), []
    for key, members in groups.items():
        proj = packed_name([mem[0] for mem in members])
        if len(members) < 2 or proj is None:
            continue
        order = SIBLINGS[proj]
        members.sort(key=lambda mem: order.index(mem[0]))
        layer, block = key[-1]
        name = f"/model/layers.{layer}/{block}/{proj}/{key[-2]}"
        sizes = [int(onnx_graph.attributes(mem[1])["N"]) for mem in members]
        stacked = [_stack([mem[4][j] for mem in members]) for j in range(len(members[0][4]))]
        if any(st is None for st in stacked):
            continue
        inputs = [key[0]]
        for j, (arr, to) in enumerate(stacked):
            if arr is None:
                inputs.append("")
                continue
            tensor = f"{name}.input{j + 1}"
            new_inits.append(numpy_helper.from_array(arr, tensor))
            if to is not None:
                new_nodes.append(helper.make_node("Cast", [tensor], [f"{tensor}/Cast/output_0"], name=f"{tensor}/Cast", to=to))
                tensor = f"{tensor}/Cast/output_0"
            inputs.append(tensor)
        attrs = {k: v for k, v in onnx_graph.attributes(members[0][1]).items() if k != "N"}
        y, split = f"{name}/output_0", f"{name}/split_sizes"
        new_nodes.append(helper.make_node("MatMulNBits", inputs, [y], name=name, domain=onnx_graph.MS_DOMAIN, N=sum(sizes),
                                          **attrs))
        total, outs = y, [mem[1].output[0] for mem in members]
        if key[6] is not None:  # the fused form: one side MatMul and one Add for the group
            w2, side, total = f"{name}/fused/W2", f"{name}/fused/MatMul/output_0", f"{name}/fused/Add/output_0"
            new_nodes += [helper.make_node("Concat", [mem[2].input[1] for mem in members], [w2], name=f"{w2}/Concat", axis=1),
                          helper.make_node("MatMul", [key[6], w2], [side], name=f"{name}/fused/MatMul"),
                          helper.make_node("Add", [y, side], [total], name=f"{name}/fused/Add")]
            outs = [mem[3].output[0] for mem in members]
        new_nodes += [
            helper.make_node("Constant", [], [split], name=f"{split}/Constant",
                             value=numpy_helper.from_array(np.array(sizes, np.int64), f"{split}/value")),
            helper.make_node("Split", [total, split], outs, name=f"{name}/Split", axis=-1)]
        removed.update(id(nd) for mem in members for nd in mem[1:4] if nd is not None)
        packed.append({"node": name, "from": [mem[1].name for mem in members], "N": sizes, "side": key[6] is not None})
    if packed:
        kept = live_nodes([nd for nd in G.g.node if id(nd) not in removed] + new_nodes, G.outputs, ("Cast", "Constant"))
        set_nodes(G.g, kept, new_inits, keep=G.outputs)
    return {"groups": len(packed), "nodes": packed}


def pack_folder(folder: Path) -> dict[str, Any]:
    """:func:`pack_siblings` on ``folder/model.onnx`` (rewritten with its ``model.onnx.data`` only when a group was packed)."""
    path = Path(folder) / "model.onnx"
    model = onnx_graph.load(path)
    info = pack_siblings(model)
    if info["groups"]:
        onnx_graph.save(model, path, external=True, size_threshold=0)
    return info
