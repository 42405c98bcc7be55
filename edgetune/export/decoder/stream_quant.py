"""Quantize the builder's MatMul weights one at a time, so an int4 export never holds the fp32 model.

onnxruntime-genai 0.18's builder keeps every weight as a lazy fp32 view of the PyTorch tensor, then
quantizes in ``Model.to_nbits``: ``ir.to_proto(self.model)`` materializes the *whole* model in fp32
and ``MatMulNBitsQuantizer`` runs over that proto. For a 3.8B model that is 15.7 GB of fp32 on top of
the 7.9 GB bf16 PyTorch model: the int4 export of Phi-3-mini peaked at 23.0 GiB on a 23.6 GiB machine.

:func:`prequantize` runs first (patched in by :func:`edgetune.export.decoder.builder.builder_fixes`): for each
MatMul that the builder's pass would quantize, it materializes that one weight, quantizes a one-node
model with the same ``MatMulNBitsQuantizer`` and the same arguments the builder passes, and puts the
resulting nodes and initializers in place of the MatMul; the fp32 copy is dropped before the next one.
The builder's own pass then finds no MatMul left to quantize (it still quantizes anything else it
is asked to, e.g. a Gather) and goes on as before. The quantizer is the same code on the same weight
with the same settings, so the tensors are the same: a test compares both exports initializer by
initializer. Used only where the builder's pass is one per-node pass (no mixed-precision passes, no
exact-quantization overrides, no CUDA prepacking); anything else is left to the builder unchanged.

Mixed precision's 8-bit MatMuls (``--mixed-8bit``, the v/down rule of cpu-x86's default recipe) are excluded from
the builder's pass and were quantized after it (:func:`edgetune.export.decoder.mixed.finish_mixed`): the builder
wrote them in fp32 with the whole graph, and that pass loaded the graph again, weights and all, to quantize them
(a Phi-3-mini-shaped 3.9B export: 4.4 GB of fp32 v/down, ~40 s at up to 17.6 GiB resident). Named in
:func:`quantizing_excluded`, they are quantized here, one at a time, with the settings that pass would use (a test
compares both exports tensor by tensor); the pass after the build then finds none left and only checks them.

A weight larger than :data:`CHUNK_BYTES` in fp32 (the tied 152k x 1536 head of Qwen2.5-1.5B is 0.93 GB) is
quantized in slices of output columns: every block of MatMulNBits lies within one column (blocks run
along K), so each slice's packed weights, scales and zero points are rows of the whole weight's, and the
slices, stacked, are the one-shot result byte for byte (a test compares them). Slices hold an even
number of columns, so the flat, pairwise-packed 4-bit zero points of an odd block count never straddle
two slices. The quantizer's own copies (the weight read back from the protobuf, padded, transposed) are
then the size of a slice, not of the head: for Qwen2.5-1.5B that was ~3 GB of transient fp32 at the
export's peak.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

ENABLED = True  # tests turn it off to compare with the builder's own pass
CHUNK_BYTES = 64 << 20  # a weight above this (fp32) is quantized in slices of output columns; tests lower it
# set by `requantizing`: called with (node name, fp32 weight [K, N], the quantizer's one-node ModelProto) to
# replace the RTN values in place (edgetune.export.decoder.imatrix.Requantizer); None: the builder's values as they are
REQUANTIZE: Any = None
# set by `quantizing_excluded`: builder node name -> the quantizer's own settings (bits, block_size, is_symmetric,
# accuracy_level) for MatMuls the builder was told to leave float that are quantized here all the same, as onnxruntime's
# default RTN writes them (mixed precision's 8-bit nodes, which a pass after the build quantized by loading the whole
# graph again)
EXCLUDED: dict[str, dict[str, Any]] = {}
# the builder's own quantization methods (its `quant_config.weights.method`, not edgetune's algorithm names)
# whose `to_nbits` is one pass in which each MatMul is quantized on its own
BUILDER_PER_NODE_METHODS = frozenset({"default", "k_quant", "rtn"})


@contextmanager
def requantizing(fn: Any) -> Iterator[None]:
    """Within this block, every MatMul the streamed pass quantizes is handed to ``fn`` after the quantizer."""
    global REQUANTIZE
    prev, REQUANTIZE = REQUANTIZE, fn
    try:
        yield
    finally:
        REQUANTIZE = prev


@contextmanager
def quantizing_excluded(settings: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Within this block, the excluded MatMuls named in ``settings`` are quantized in the streamed pass with those
    settings (RTN, QOperator, never handed to :data:`REQUANTIZE`)."""
    global EXCLUDED
    prev, EXCLUDED = EXCLUDED, dict(settings)
    try:
        yield
    finally:
        EXCLUDED = prev


def applies(model: Any) -> bool:
    """Whether the builder's ``to_nbits`` is one pass that quantizes each MatMul on its own."""
    attrs = getattr(model, "quant_attrs", None) or {}
    method = getattr(model, "quantization_algo", "default")
    return (method in BUILDER_PER_NODE_METHODS and not getattr(model, "int4_customized_weight_config", None)
            and not getattr(model, "exact_quant_override_names", None) and "MatMul" in attrs.get("op_types_to_quantize", ())
            and not (getattr(model, "ep", "cpu") == "cuda" and (getattr(model, "matmul_attrs", {}) or {}).get("weights_prepacked", 0) > 0))


def prequantize(model: Any, quantizer_cls: Any, quant_format: Any) -> int:
    """Quantize the builder model's eligible MatMuls one by one, in place; the number done."""
    import numpy as np
    import onnx_ir as ir

    attrs = model.quant_attrs
    exclude = set(attrs["nodes_to_exclude"])
    graph = model.model.graph
    done = 0
    for node in list(graph):
        own = EXCLUDED.get(node.name)
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if node.name in exclude and own is None:
            continue
        act, weight = node.inputs
        if weight is None or weight.const_value is None or not weight.is_initializer() or len(weight.uses()) != 1:
            continue
        if weight.shape is None or len(weight.shape) != 2 or weight.dtype != ir.DataType.FLOAT:
            continue
        array = weight.const_value.numpy()  # the one fp32 weight that exists at a time
        algo = None
        if model.quantization_algo != "default":  # as to_nbits: per-node bits for RTN / k_quant
            algo = model.make_algo_config(model.quantization_algo, {node.name: {"bits": attrs["bits"]}})
        # a one-node model: the same node name, input names and weight as in the builder's graph
        names = (node.name, act.name, weight.name, node.outputs[0].name)
        settings = dict(quantizer_cls=quantizer_cls, quant_format=quant_format, algo=algo, bits=attrs["bits"],
                        block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
                        accuracy_level=attrs["accuracy_level"])
        if own is not None:  # as quantize.quantize_matmuls_in would after the build: the quantizer's defaults
            settings = dict(settings, quant_format=type(quant_format).QOperator, algo=None, **own)
        requantize = REQUANTIZE if own is None else None
        step = 0 if requantize is not None else slice_columns(array.shape, settings["quant_format"])
        quantized = quantize_weight(array, names, step=step, **settings)
        if requantize is not None:
            requantize(node.name, array, quantized)
        del array
        one = ir.from_proto(quantized)
        del quantized
        if [n.op_type for n in one.graph] == ["MatMul"]:  # the quantizer declined this weight: leave it to the builder
            continue
        new_nodes = list(one.graph)
        # fresh arrays: a tensor read from a protobuf keeps the whole message alive (the fp32 weight too)
        fresh = {name: ir.Value(name=name, shape=v.shape, type=v.type,
                                const_value=ir.tensor(np.array(v.const_value.numpy()), name=name))
                 for name, v in one.graph.initializers.items()}
        old_inits = dict(one.graph.initializers)
        for n in new_nodes:
            one.graph.remove(n)
        one.graph.initializers.clear()
        one.graph.outputs.clear()
        one_in = one.graph.inputs[0]
        for n in new_nodes:  # the builder graph's activation and fresh weights in place of the one-node model's
            for i, v in enumerate(n.inputs):
                if v is one_in:
                    n.replace_input_with(i, act)
                elif v is not None and v.name in fresh and v is old_inits.get(v.name):
                    n.replace_input_with(i, fresh[v.name])
        del one, old_inits
        for v in fresh.values():
            graph.register_initializer(v)
        new_out = next(o for n in new_nodes for o in n.outputs if o.name == names[3])
        new_out.name = None
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [new_out])
        del graph.initializers[weight.name]
        weight.const_value = None  # the builder keeps its values by name: drop the (cached) fp32 tensor itself
        done += 1
    return done


def quantize_weight(w: Any, names: tuple[str, str, str, str], *, step: int = 0, **settings: Any) -> Any:
    """The quantizer's one-node model for the fp32 weight ``w`` [K, N] (in slices of ``step`` columns if ``step``).

    ``names``: (node, activation, weight, output) as in the builder's graph; ``settings``: ``quantizer_cls``,
    ``quant_format``, ``algo`` and the quantizer's ``bits``, ``block_size``, ``is_symmetric``, ``accuracy_level``."""
    import numpy as np

    if step:
        return _stacked([_quantize_one(np.ascontiguousarray(w[:, i:i + step]), names, **settings)
                         for i in range(0, w.shape[1], step)], w.shape[1])
    return _quantize_one(w, names, **settings)


def _quantize_one(w: Any, names: tuple[str, str, str, str], *, quantizer_cls: Any, quant_format: Any, algo: Any,
                  **attrs: Any) -> Any:
    import onnx
    from onnx import helper

    node, act, weight, out = names
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", [act, weight], [out], name=node)], "one",
        [helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, weight)]), opset_imports=[helper.make_opsetid("", 21)])
    q = quantizer_cls(model=proto, nodes_to_exclude=[], quant_format=quant_format, op_types_to_quantize=("MatMul",),
                      algo_config=algo, **attrs)
    q.process()
    return q.model.model


def slice_columns(shape: tuple, quant_format: Any) -> int:
    """Columns per slice for a [K, N] fp32 weight above :data:`CHUNK_BYTES` (an even count), or 0: in one piece."""
    k, n = shape
    if k * n * 4 <= CHUNK_BYTES or getattr(quant_format, "name", "QOperator") != "QOperator":
        return 0  # QDQ packs the whole [K, N] matrix as one int4 array: not column-separable
    step = max(2, CHUNK_BYTES // (4 * k) // 2 * 2)
    return step if step < n else 0


def _stacked(parts: list, n: int) -> Any:
    """One quantized one-node model from its column slices: each initializer's rows stacked, the node's N set to n.

    Raises ``AssertionError`` unless the slices are the same node over initializers whose rows add up (a quantizer
    whose output is not per-column would fail here rather than export something else)."""
    import numpy as np
    from onnx import helper, numpy_helper

    first = parts[0]
    nodes = [list(p.graph.node) for p in parts]
    if all([n.op_type for n in ns] == ["MatMul"] for ns in nodes):
        return first  # the quantizer declined the weight (the caller leaves it to the builder)
    assert all(len(ns) == 1 and ns[0].op_type == "MatMulNBits" for ns in nodes), [n.op_type for ns in nodes for n in ns]
    node = first.graph.node[0]
    names = [t.name for t in first.graph.initializer]
    assert all([t.name for t in p.graph.initializer] == names for p in parts)
    stacked = []
    for i, name in enumerate(names):
        arrays = [numpy_helper.to_array(p.graph.initializer[i]) for p in parts]
        stacked.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), name))
    del first.graph.initializer[:]
    first.graph.initializer.extend(stacked)
    for a in node.attribute:
        if a.name == "N":
            a.CopyFrom(helper.make_attribute("N", n))
    return first
