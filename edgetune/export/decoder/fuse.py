"""Fuse the small side branches of quantized linears: fewer nodes per token, same arithmetic.

An exact GGUF base (:mod:`.gguf_export`) computes each Q4_1/Q4_K linear as
``MatMulNBits(x) + blocksums(x) @ O^T`` (Reshape -> ReduceSum -> MatMul -> Add), and a float adapter
(:mod:`.float_adapter`) adds ``(x @ A) @ B`` (MatMul -> MatMul -> Add) per targeted linear. On a
small model these ~20 tiny nodes per layer cost more in onnxruntime's per-node dispatch than in
arithmetic (SmolLM2: the correction alone is 14 of 57 ms per token, docs/llm.md). Every one of these
side terms is a *linear* function of the linear's input ``x``, so for the group of linears that read
the same ``x`` (q/k/v or the packed qkv, gate/up, o, down):

    z   = x @ W1,  W1 = [A_1 | A_2 | ... | S_b]        ONE float MatMul per group
    y_i = MatMulNBits_i(x) + z @ W2_i                  ONE MatMul + ONE Add per linear

where ``S_b`` is the [K, K/b] 0/1 matrix of b-element block sums (``x @ S_b`` == Reshape+ReduceSum up
to summation order) and ``W2_i`` stacks, on the rows of ``z``, ``B_i`` for the linear's own LoRA
(``scaling`` is already folded into B by the builder), zeros for the other linears' LoRA and ``O_i^T``
for its block offsets. The MatMulNBits nodes are untouched, so their kernels (and accuracy_level) are
the same; only fp32 summation order changes in the side terms (relative error ~1e-7).

File size: W1/W2 are written as ``Concat`` of the initializers already there (the LoRA A/B, the fp16
offsets through their ``Cast``), one shared 0/1 ``S_b`` per (K, b) and shared zero blocks, all
constants, so onnxruntime folds them into one fp32 matrix at session start (checked in the tests).

Only the exact patterns are rewritten; any tensor with another consumer, a weight that is not a
constant, an unexpected shape or attribute leaves that linear as it is. Why own code: onnxruntime's
graph optimizer has no fusion across sibling MatMuls with different weights (it fuses MatMul+Add into
Gemm only for a constant bias), and onnxruntime-genai's builder has no such pass.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph
from ...onnx_graph import Graph, live_nodes, set_nodes
from .pack import pack_siblings

PREFIX = "/edgetune/fuse"


def _float_weight(G: Graph, name: str) -> np.ndarray | None:
    w = G.const(name)
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return None
    return w


def _blocksum_block(G: Graph, bs: str, x: str, k: int) -> tuple[int, list] | None:
    """``bs = ReduceSum(Reshape(x, [0, 0, K/b, b]), axes=[-1], keepdims=0)`` -> (b, [Reshape, ReduceSum])."""
    rs = G.producer.get(bs)
    if rs is None or rs.op_type != "ReduceSum" or rs.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: a for a in rs.attribute}
    if "keepdims" not in attrs or attrs["keepdims"].i != 0:
        return None
    if len(rs.input) > 1 and rs.input[1]:
        axes = G.const(rs.input[1])
    elif "axes" in attrs:
        axes = np.array(list(attrs["axes"].ints))
    else:
        return None
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, 3):
        return None
    rh = G.producer.get(rs.input[0])
    if rh is None or rh.op_type != "Reshape" or rh.input[0] != x:
        return None
    shape = G.const(rh.input[1])
    if shape is None or shape.shape != (4,) or list(shape[:2]) != [0, 0]:
        return None
    nb, b = int(shape[2]), int(shape[3])
    if b <= 0 or nb * b != k:
        return None
    return b, [rh, rs]


def _term(G: Graph, add, cur: str, x: str, k: int):
    """The side term the Add adds onto ``cur``: ('corr', b, O [K/b, N] name, nodes) or ('lora', A, B, nodes), else None."""
    other = add.input[1] if add.input[0] == cur else add.input[0]
    if add.input[0] == add.input[1]:
        return None
    mm = G.producer.get(other)
    if mm is None or mm.op_type != "MatMul" or G.only_consumer(other) is not add:
        return None
    w = _float_weight(G, mm.input[1])
    if w is None:
        return None
    lhs = mm.input[0]
    bsum = _blocksum_block(G, lhs, x, k)
    if bsum is not None:
        b, _ = bsum
        if w.shape[0] != k // b:
            return None
        return {"kind": "corr", "block": b, "w": mm.input[1], "n": int(w.shape[1]), "rows": int(w.shape[0]),
                "nodes": [mm, add], "blocksum": lhs}
    a_mm = G.producer.get(lhs)
    if a_mm is None or a_mm.op_type != "MatMul" or a_mm.input[0] != x or G.only_consumer(lhs) is not mm:
        return None
    a = _float_weight(G, a_mm.input[1])
    if a is None or a.shape[0] != k or a.shape[1] != w.shape[0]:
        return None
    return {"kind": "lora", "a": a_mm.input[1], "rank": int(a.shape[1]), "w": mm.input[1], "n": int(w.shape[1]),
            "nodes": [a_mm, mm, add]}


def _linears(G: Graph) -> list[dict[str, Any]]:
    """Every MatMulNBits followed by a chain of Adds of fusable side terms."""
    found = []
    for node in G.g.node:
        if node.op_type != "MatMulNBits" or len(node.output) != 1:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        k, n = attrs.get("K"), attrs.get("N")
        x = node.input[0]
        cur, terms = node.output[0], []
        while True:
            add = G.only_consumer(cur)
            if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
                break
            t = _term(G, add, cur, x, k)
            if t is None or t["n"] != n:
                break
            terms.append(t)
            cur = add.output[0]
        if terms:
            found.append({"node": node, "x": x, "k": k, "n": n, "terms": terms, "out": cur})
    return found


def fuse_side_branches(model, *, min_gain: int = 1, blocksums: str = "auto", s_max_bytes: int | None = 65536,
                       align: int = 1) -> dict[str, Any]:
    """Rewrite ``model`` (onnx ModelProto, in place) into the fused form; returns what was fused.

    ``blocksums``: ``"reduce"`` keeps the shared Reshape -> ReduceSum and concatenates its output after ``x @ A_cat``
    (no extra weight bytes); ``"matmul"`` puts the 0/1 block-sum matrix S into W1 (one node less per group, but
    K*K/b more fp32 bytes read per group and token: slower on SmolLM2, see docs/llm.md); ``"auto"``: ``"matmul"``
    for a group without LoRA terms (W1 is then the one shared S of that K), ``"reduce"`` otherwise.
    ``s_max_bytes``: with ``"auto"``, use S only where its fp32 size ``4*K*K/b`` is at most this (64 KiB: on SmolLM2
    S for K=576 (41 KB) is faster than Reshape -> ReduceSum, S for down_proj's K=1536 (295 KB) is not; docs/llm.md).
    ``align``: each LoRA's columns of ``z`` are followed by zero columns up to a multiple of this (zeros in W1, zero rows
    in W2), so that a kernel working on blocks of ``align`` along z (:func:`quantize_side_weights`) never puts two
    parts in one block; 1 (no padding) for the float graph.
    """
    assert blocksums in ("reduce", "matmul", "auto")
    mode = blocksums
    from onnx import TensorProto, helper, numpy_helper


    G = Graph(model)
    ops_before = Counter(n.op_type for n in G.g.node)
    nodes_before = len(G.g.node)
    runtime_before = runtime_nodes(G.g)
    groups: dict[str, list] = {}
    for lin in _linears(G):
        groups.setdefault(lin["x"], []).append(lin)

    new_nodes, new_inits, removed = [], [], set()
    shared: dict[tuple, str] = {}
    fused_groups = []

    def shared_const(key: tuple, make) -> str:
        if key not in shared:
            arr, name = make()
            h = arr.astype(np.float16)
            if np.array_equal(h.astype(np.float32), arr):  # 0/1 and zeros: exact in fp16, folded Cast
                new_inits.append(numpy_helper.from_array(h, name))
                out = f"{name}/f32"
                new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{name}/Cast", to=TensorProto.FLOAT))
            else:
                new_inits.append(numpy_helper.from_array(arr, name))
                out = name
            shared[key] = out
        return shared[key]

    def s_matrix(k: int, b: int) -> str:
        def make():
            s = np.zeros((k, k // b), np.float32)
            s[np.arange(k), np.arange(k) // b] = 1.0
            return s, f"{PREFIX}/blocksum_matrix/K{k}_b{b}"
        return shared_const(("S", k, b), make)

    def zeros(r: int, n: int) -> str:
        return shared_const(("Z", r, n), lambda: (np.zeros((r, n), np.float32), f"{PREFIX}/zeros/{r}x{n}"))

    for gi, (x, lins) in enumerate(groups.items()):
        k = lins[0]["k"]
        if any(lin["k"] != k for lin in lins):
            continue
        # columns of z: every LoRA A of the group, then one S per block size
        cols, col_of = [], {}
        for li, lin in enumerate(lins):
            for ti, t in enumerate(lin["terms"]):
                if t["kind"] == "lora":
                    col_of[(li, ti)] = len(cols)
                    cols.append(("A", t["a"], t["rank"]))
                    if t["rank"] % align:
                        cols.append(("P", None, align - t["rank"] % align))
        blocks = sorted({t["block"] for lin in lins for t in lin["terms"] if t["kind"] == "corr"})
        for b in blocks:
            col_of[("S", b)] = len(cols)
            cols.append(("S", b, k // b))
        old = {id(nd) for lin in lins for t in lin["terms"] for nd in t["nodes"]}
        old_count = len(old) + 2 * len(blocks)  # + the Reshape/ReduceSum pairs (removed when no one else reads them)
        has_lora = any(c[0] == "A" for c in cols)
        blocksums = ("reduce" if has_lora else "matmul") if mode == "auto" else mode
        if mode == "auto" and s_max_bytes is not None and any(4 * k * (k // b) > s_max_bytes for b in blocks):
            blocksums = "reduce"
        if blocksums == "matmul":
            new_count = 1 + 2 * len(lins)
        else:  # MatMul(x, A_cat) if any LoRA, the Reshape/ReduceSum pairs kept, a Concat if more than one part
            new_count = int(has_lora) + 2 * len(blocks) + int(int(has_lora) + len(blocks) > 1) + 2 * len(lins)
        if old_count - new_count < min_gain:
            continue
        tag = x.strip("/").replace("/", "_")
        base = f"{PREFIX}/{tag}"
        if blocksums == "matmul":
            w1_parts = [c[1] if c[0] == "A" else zeros(k, c[2]) if c[0] == "P" else s_matrix(k, c[1]) for c in cols]
            w1 = w1_parts[0]
            if len(w1_parts) > 1:
                w1 = f"{base}/W1"
                new_nodes.append(helper.make_node("Concat", w1_parts, [w1], name=f"{base}/W1/Concat", axis=1))
            z = f"{base}/MatMul/output_0"
            new_nodes.append(helper.make_node("MatMul", [x, w1], [z], name=f"{base}/MatMul"))
        else:
            parts = []
            a_parts = [c[1] if c[0] == "A" else zeros(k, c[2]) for c in cols if c[0] in ("A", "P")]
            if a_parts:
                w1 = a_parts[0]
                if len(a_parts) > 1:
                    w1 = f"{base}/A/W1"
                    new_nodes.append(helper.make_node("Concat", a_parts, [w1], name=f"{base}/A/Concat", axis=1))
                za = f"{base}/A/MatMul/output_0"
                new_nodes.append(helper.make_node("MatMul", [x, w1], [za], name=f"{base}/A/MatMul"))
                parts.append(za)
            for b in blocks:  # the existing shared block sums of x
                parts.append(next(t["blocksum"] for lin in lins for t in lin["terms"] if t["kind"] == "corr" and t["block"] == b))
            z = parts[0]
            if len(parts) > 1:
                z = f"{base}/Concat/output_0"
                new_nodes.append(helper.make_node("Concat", parts, [z], name=f"{base}/Concat", axis=-1))
        info_lins = []
        for li, lin in enumerate(lins):
            n = lin["n"]
            rows: list[str] = []
            mine = {}
            for ti, t in enumerate(lin["terms"]):
                if t["kind"] == "lora":
                    mine[col_of[(li, ti)]] = t["w"]
                else:
                    key = col_of[("S", t["block"])]
                    if key in mine:  # two corrections with the same block size: not a pattern we make
                        raise AssertionError("duplicate correction")
                    mine[key] = t["w"]
            for ci, c in enumerate(cols):
                rows.append(mine.get(ci) or zeros(c[2], n))
            w2 = rows[0]
            lname = lin["node"].name.rsplit("/", 1)[0] if "/" in lin["node"].name else lin["node"].name
            if len(rows) > 1:
                w2 = f"{lname}/fused/W2"
                new_nodes.append(helper.make_node("Concat", rows, [w2], name=f"{lname}/fused/W2/Concat", axis=0))
            side = f"{lname}/fused/MatMul/output_0"
            new_nodes.append(helper.make_node("MatMul", [z, w2], [side], name=f"{lname}/fused/MatMul"))
            new_nodes.append(helper.make_node("Add", [lin["node"].output[0], side], [lin["out"]], name=f"{lname}/fused/Add"))
            for t in lin["terms"]:
                removed.update(id(nd) for nd in t["nodes"])
            info_lins.append({"node": lin["node"].name, "output": lin["out"],
                              "terms": [t["kind"] if t["kind"] == "corr" else f"lora r={t['rank']}" for t in lin["terms"]]})
        fused_groups.append({"input": x, "z_columns": sum(c[2] for c in cols), "blocksums": blocksums if blocks else None,
                             "linears": info_lins})

    if not fused_groups:
        return {"fused": False, "groups": 0, "linears": 0, "nodes_before": nodes_before, "nodes_after": nodes_before,
                "runtime_nodes_before": runtime_before, "runtime_nodes_after": runtime_before,
                "ops_before": dict(ops_before), "ops_after": dict(ops_before), "groups_detail": []}
    # drop what became dead: the Reshape/ReduceSum pairs, Casts/Constants that only fed removed nodes
    kept = live_nodes([nd for nd in G.g.node if id(nd) not in removed] + new_nodes, G.outputs, ("Reshape", "ReduceSum", "Cast", "Constant"))
    g = G.g
    set_nodes(g, kept, new_inits, keep=G.outputs)
    ops_after = Counter(n.op_type for n in g.node)
    return {"fused": True, "groups": len(fused_groups), "linears": sum(len(f["linears"]) for f in fused_groups),
            "nodes_before": nodes_before, "nodes_after": len(g.node),
            "runtime_nodes_before": runtime_before, "runtime_nodes_after": runtime_nodes(g), "ops_before": dict(ops_before), "ops_after": dict(ops_after),
            "constant_nodes_folded_at_load": {k: v for k, v in ops_after.items() if k in ("Concat", "Cast")},
            "groups_detail": fused_groups}


SIDE_BLOCK = 16  # the 8-bit side weights' block along K: z's parts (each rank-16 LoRA, each block-sum group) own whole blocks


def _folded(G: Graph, name: str) -> np.ndarray | None:
    """A constant tensor, Concats of constants (the fused W1/W2) included; None for anything computed."""
    v = G.const(name)
    if v is not None:
        return v
    p = G.producer.get(name)
    if p is None or p.op_type != "Concat":
        return None
    parts = [_folded(G, i) for i in p.input]
    if any(x is None for x in parts):
        return None
    return np.concatenate(parts, axis=next(a.i for a in p.attribute if a.name == "axis"))


def quantize_side_weights(model, *, block: int = SIDE_BLOCK) -> dict[str, Any]:
    """The fused graph's float side MatMuls (``x @ W1`` and ``z @ W2``: LoRA A/B, GGUF block offsets) as 8-bit
    MatMulNBits at accuracy_level 4 (``model`` changed in place); returns what changed.

    Why: on SmolLM2 these fp32 weights are 42 MB of the ~134 MB a decode step reads (the 4-bit body reads ~70): at
    8 bits they read 4x fewer bytes through the int8 kernels (docs/benchmarks.md has the measured speed and quality).
    Not exact: each weight is rounded to 8 bits per block of ``block`` along K (symmetric, scale = max|w|/127), and at
    level 4 the kernel rounds its input (``z``: the LoRA's rank columns, then the block sums) to int8 per block too.
    With block 16 and LoRA ranks that are multiples of 16 every part of ``z`` owns its blocks, so a large block sum
    never sets the int8 step of a LoRA column. Only a MatMul whose weight is a 2-D float32 constant (or a Concat of
    constants) and whose input is computed is rewritten.
    """
    from onnx import helper, numpy_helper

    G = Graph(model)
    new_nodes, new_inits, done = [], [], []
    fp32_bytes = int8_bytes = 0
    worst = 0.0
    for nd in G.g.node:
        w = None
        if nd.op_type == "MatMul" and nd.domain in ("", "ai.onnx") and G.const(nd.input[0]) is None:
            w = _folded(G, nd.input[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            new_nodes.append(nd)
            continue
        k, n = w.shape
        nb = -(-k // block)
        wp = np.zeros((nb * block, n), np.float32)
        wp[:k] = w
        wb = wp.T.reshape(n, nb, block)
        scale = np.abs(wb).max(-1) / np.float32(127)
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(wb / scale[..., None]), -127, 127)
        deq = (q * scale[..., None]).reshape(n, -1)[:, :k].T
        worst = max(worst, float(np.abs(deq - w).max() / max(float(np.abs(w).max()), 1e-30)))
        name = f"{nd.name or nd.output[0]}/Q8"
        new_inits += [numpy_helper.from_array((q + 128).astype(np.uint8), f"{name}/B"),
                      numpy_helper.from_array(scale.reshape(-1), f"{name}/scales")]
        new_nodes.append(helper.make_node("MatMulNBits", [nd.input[0], f"{name}/B", f"{name}/scales"], list(nd.output), name=name,
                                          domain=onnx_graph.MS_DOMAIN, K=k, N=n, bits=8, block_size=block, accuracy_level=4))
        done.append(nd.name)
        fp32_bytes += w.nbytes
        int8_bytes += n * nb * (block + 4)
    if done:  # the Concats/Casts that built W1/W2 and the fp32 weights are dropped: nothing reads them any more
        set_nodes(G.g, live_nodes(new_nodes, G.outputs, ("Concat", "Cast", "Constant")), new_inits, keep=G.outputs)
    return {"bits": 8, "block_size": block, "accuracy_level": 4, "matmuls": len(done), "fp32_mb": round(fp32_bytes / 1e6, 2),
            "int8_mb": round(int8_bytes / 1e6, 2), "max_weight_error_rel": round(worst, 6)}


def fuse_folder(folder: Path, *, side_int8: bool = False) -> dict[str, Any]:
    """Fuse ``folder/model.onnx`` (external data in ``model.onnx.data``) in place, then pack the fused siblings
    (:func:`.pack.pack_siblings`); ``side_int8``: then store the fused side weights at 8 bits (:func:`quantize_side_weights`)."""

    folder = Path(folder)
    model = onnx_graph.load(folder / "model.onnx")
    info = fuse_side_branches(model, align=SIDE_BLOCK if side_int8 else 1)
    # then q/k/v and gate/up as one node each, fused or not (+6-16 % decode on the demo at 1 thread, docs/llm.md)
    packed = pack_siblings(model)
    info["packed"] = {"groups": packed["groups"], "nodes": [p["node"] for p in packed["nodes"]]}
    if packed["groups"]:
        info["runtime_nodes_after"] = runtime_nodes(model.graph)
        info["nodes_after"] = len(model.graph.node)
        info["ops_after"] = dict(Counter(n.op_type for n in model.graph.node))
    if info["fused"] and side_int8:
        info["side_int8"] = quantize_side_weights(model)
    if info["fused"] or packed["groups"]:
        tmp = folder / ".fuse-tmp"
        tmp.mkdir(exist_ok=True)
        onnx_graph.save(model, tmp / "model.onnx", external=True, size_threshold=1024)
        for f in ("model.onnx", "model.onnx.data"):
            (tmp / f).replace(folder / f)
        tmp.rmdir()
    return info


def fuse_step(folder: Path, fuse: bool | str, what: str) -> dict[str, Any]:
    """An export's fusion step, one progress line: ``folder`` fused in place (``fuse == "int8"``: its side weights then
    at 8 bits); returns the record's ``fusion`` entry."""
    from ... import console

    with console.step(what + (", 8-bit side weights" if fuse == "int8" else "")):
        return summary(fuse_folder(folder, side_int8=fuse == "int8"))


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """The export record's ``fusion`` entry: counts before/after and, per group, its input and linears (compact)."""
    out = {k: v for k, v in info.items() if k != "groups_detail"}
    out["groups_detail"] = [{"input": g["input"], "z_columns": g["z_columns"], "blocksums": g["blocksums"],
                             "linears": [f"{lin['node']} ({'+'.join(lin['terms'])})" for lin in g["linears"]]}
                            for g in info.get("groups_detail", [])]
    return out


def runtime_nodes(graph) -> int:
    """Nodes that run per call: all but those computable from constants alone (folded by onnxruntime at load)."""
    const = ({i.name for i in graph.initializer} - {i.name for i in graph.input}) | {""}
    n = 0
    for nd in graph.node:
        if all(i in const for i in nd.input):
            const.update(nd.output)
        else:
            n += 1
    return n
