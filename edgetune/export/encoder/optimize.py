"""Graph optimization of exported encoders, with a record of what happened.

* ``transformer_fusions``: onnxruntime's transformer optimizer (attention, skip/embed layer
  norm, GELU, bias fusions) run as Python graph rewrites only (``opt_level=0``), so the
  result is an ordinary ONNX file for the CPU/CUDA EPs with ``com.microsoft`` fused ops.
* ``offline_optimize``: onnxruntime's own graph optimizer at a *portable* level (basic:
  constant folding, redundant node elimination) saved to disk. With static shapes this
  folds away the Shape/ConstantOfShape/Where chains of the attention mask, which an
  accelerator would otherwise have to give back to the CPU.
"""

from __future__ import annotations

from pathlib import Path

from ... import onnx_graph
from ...errors import require

# model_type (HF) -> onnxruntime.transformers optimizer model type
_ORT_MODEL_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "mpnet": "bert",
    "albert": "bert", "electra": "bert", "deberta-v2": "bert",
}


def transformer_fusions(src: Path, dst: Path, *, model_type: str, num_heads: int, hidden_size: int, fp16: bool = False) -> dict[str, int]:
    """Fuse with onnxruntime.transformers.optimizer; returns {fused op: count} (zeros dropped)."""
    require("onnxruntime", purpose="transformer fusions")
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(src),
        model_type=_ORT_MODEL_TYPES.get(model_type, "bert"),
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=0,  # Python fusions only: no EP-specific ORT graph rewrites baked into the file
        use_gpu=fp16,
    )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    if fp16:
        model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    return stats


LEVELS = {"disable": 0, "basic": 1, "extended": 2, "all": 99}


def offline_optimize(src: Path, dst: Path, *, level: str = "basic") -> dict[str, int]:
    """Run onnxruntime's graph optimizer and save the result; returns node counts before/after.

    Levels above ``basic`` produce CPU-EP-specific kernels, so they are capped at basic:
    onnxruntime applies the rest itself when the session starts on the device.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    source = onnx_graph.read(src).graph
    model = onnx_graph.load(dst)
    renamed = _rename_invented_initializers(model.graph, source)
    if renamed:
        onnx_graph.save(model, dst)
    return {"nodes_before": len(source.node), "nodes_after": len(model.graph.node)}


def _rename_invented_initializers(graph, source) -> int:
    """Prefix the initializers onnxruntime invented (names not in ``source``) with ``ort_basic/``.

    Works around an onnxruntime 1.32 bug: MatMulAddFusion names its Reshape shapes
    ``gemm_input_shape`` / ``gemm_output_shape`` (+ ``_token_N``) without checking the graph, so
    when the saved file is loaded again at the ``extended``/``all`` level (the device default),
    the same fusion on the remaining MatMul+Add pairs adds ``gemm_input_shape`` a second time and
    the session fails ("AddInitializedOrtValue Attempt to replace the existing tensor"). Seen
    on the static-shape (1x128) TorchScript export of BERT; optimum's export did not trigger it.
    """
    known = {i.name for i in source.initializer} | {i.name for i in source.input}
    known |= {o for n in source.node for o in n.output}
    names = {i.name: f"ort_basic/{i.name}" for i in graph.initializer if i.name not in known}
    for i in graph.initializer:
        if i.name in names:
            i.name = names[i.name]
    for n in graph.node:
        for k, x in enumerate(n.input):
            if x in names:
                n.input[k] = names[x]
    for v in graph.value_info:
        if v.name in names:
            v.name = names[v.name]
    return len(names)
