"""How many bytes of weights one decode step reads, per row of the llama.cpp comparison (issue 33: where the time goes).

A one-token decode step of a small model multiplies its activation by every linear's weight once: what it reads
from memory is the weights of the MatMuls and the output head, not the embedding table (one row per token). So
``MB read / token`` x ``tok/s`` is the memory bandwidth a row reaches; rows that reach the same GB/s are limited by
their bytes, and only fewer bytes (or a faster path to memory) make them faster.

* onnxruntime graph (a folder with ``model.onnx``): the constant inputs of MatMulNBits / MatMul / Gemm nodes, be
  they initializers or computed from initializers only (a Cast, Concat or Reshape of them: onnxruntime folds those
  at load, so the folded tensor's size counts: an fp16 offset widened to fp32 reads 4 bytes per value). Each once
  (a tied table read by the head and the embedding's Gather is the head's). From the graph's shapes (onnx shape
  inference for folded tensors), not its data.
* GGUF file: every tensor but ``token_embd.weight`` when the file has an ``output.weight`` (untied); a tied model's
  table is its head. Sizes from the file's tensor info (``gguf.GGUFReader``, the project venv's gguf package).

Attention's KV cache (grows with the context: ~9 KB per past token for SmolLM2-135M in fp32) and activations are
not counted: at the bench's 128-192 positions they are under 2 MB per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MATMULS = {"MatMulNBits", "MatMul", "Gemm", "FusedMatMul"}


def _tensor_bytes(dims, data_type: int) -> int:
    from onnx import helper

    return int(np.prod(dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def onnx_read_bytes(model_path: Path) -> int:
    """Bytes of weights a one-token step of this graph reads (see the module docstring)."""
    import onnx

    from edgetune import onnx_graph

    m = onnx_graph.read(model_path)
    inits = {i.name: i for i in m.graph.initializer}
    # constants: initializers and every output of a node whose inputs are all constants (folded at load)
    const = set(inits)
    for nd in m.graph.node:  # topological order
        if all(not x or x in const for x in nd.input):
            const.update(nd.output)
    shapes = {}
    if const - set(inits):  # folded tensors: their shape and type from onnx's shape inference
        del m.graph.value_info[:]  # the builder's own annotations can disagree with inference (its cos/sin caches)
        typed = onnx.shape_inference.infer_shapes(m)
        for vi in typed.graph.value_info:
            t = vi.type.tensor_type
            if t.shape.dim and all(d.HasField("dim_value") for d in t.shape.dim):
                shapes[vi.name] = ([d.dim_value for d in t.shape.dim], t.elem_type)
    seen: set[str] = set()
    total = 0
    for nd in m.graph.node:
        if nd.op_type not in MATMULS:
            continue
        for name in list(nd.input)[1:]:  # input 0 is the activation
            if not name or name in seen or name not in const:
                continue
            seen.add(name)
            if name in inits:
                total += _tensor_bytes(inits[name].dims, inits[name].data_type)
            elif name in shapes:
                total += _tensor_bytes(*shapes[name])
    return total


def gguf_read_bytes(path: Path) -> int:
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def read_mb(artifact: str | Path | None) -> float | None:
    """MB (2**20 bytes) of weights one decode step reads, for an export folder or a .gguf file; None when unknown."""
    if not artifact:
        return None
    p = Path(artifact)
    try:
        if p.is_file() and p.suffix == ".gguf":
            return round(gguf_read_bytes(p) / 2**20, 2)
        if (p / "model.onnx").is_file():
            return round(onnx_read_bytes(p / "model.onnx") / 2**20, 2)
    except Exception:  # noqa: BLE001 - a diagnostic column: an unreadable artifact leaves it empty
        return None
    return None
