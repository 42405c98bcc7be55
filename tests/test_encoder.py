"""Encoder export: torch.onnx + fusions + int8/fp16 on the tiny random BERT (fast)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetune.artifacts import sha256_bytes
from edgetune.export.encoder.pipeline import detect_task, export_encoder
from edgetune.errors import BadInput

from encoder_helpers import TEXTS, onnx_logits, record, torch_logits


@pytest.fixture(scope="module")
def exports(tiny_bert, module_tmp):
    """Each (target, precision) exported once for the module."""
    root = module_tmp("enc")
    cache = {}

    def get(target: str, precision: str | None = None, **kw):
        key = (target, precision, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = export_encoder(tiny_bert, root / f"{target}-{precision}-{len(cache)}", target=target, precision=precision, **kw)
        return cache[key]

    return get


def test_fp32_export_matches_pytorch_and_records_fusions(tiny_bert, exports):
    out = exports("cpu-x86", "fp32")
    got = onnx_logits(out, TEXTS)
    want = torch_logits(tiny_bert, TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    r = record(out)["results"]
    assert r["kind"] == "encoder" and r["task"] == "sequence-classification" and r["precision"] == "fp32"
    assert r["fusions"].get("Attention") == 2  # two layers, both attention blocks fused
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "Attention" in ops
    assert r["labels"] == ["LABEL_0", "LABEL_1"]
    for name in ("tokenizer.json", "config.json", "edgetune.json"):
        assert (out / name).is_file()
    assert r["static_shapes"] is False


def test_dynamic_int8_is_smaller_and_close(exports):
    fp32, q = exports("cpu-x86", "fp32"), exports("cpu-x86", "int8-dynamic")
    r = record(q)["results"]
    assert r["quantization"]["format"] == "qoperator"
    assert r["quantization"]["ops"].get("MatMulInteger", 0) + r["quantization"]["ops"].get("QAttention", 0) > 0
    assert (q / "model.onnx").stat().st_size < 0.45 * (fp32 / "model.onnx").stat().st_size
    a, b = onnx_logits(fp32, TEXTS), onnx_logits(q, TEXTS)
    assert np.abs(a - b).max() < 0.02, np.abs(a - b).max()


def test_static_qdq_int8_records_calibration_and_stays_close(exports):
    fp32, q = exports("cpu-x86", "fp32"), exports("cpu-x86", "int8-static")
    r = record(q)["results"]
    assert r["quantization"]["format"] == "qdq" and r["quantization"]["pre_process"] is True
    assert r["quantization"]["ops"]["QuantizeLinear"] > 0 and r["quantization"]["ops"]["DequantizeLinear"] > 0
    # the recorded hash is the hash of exactly the texts used
    from edgetune.export.encoder.quantize import load_calibration

    calib = load_calibration(r["calibration"]["file"], samples=64)
    assert r["calibration"]["samples"] == calib.count == 64
    assert r["calibration"]["sha256"] == calib.sha256 == sha256_bytes("\n\0".join(calib.texts).encode())
    assert record(q)["inputs"]["calibration"]["sha256"]  # the file is an input of the stage
    assert (q / "model.onnx").stat().st_size < 0.5 * (fp32 / "model.onnx").stat().st_size
    a, b = onnx_logits(fp32, TEXTS), onnx_logits(q, TEXTS)
    assert np.abs(a - b).max() < 0.02, np.abs(a - b).max()


def test_fpga_vitisai_static_shapes_pow2_scales_opset(exports):
    q = exports("fpga-vitisai")
    r = record(q)["results"]
    assert r["precision"] == "int8-static" and r["static_shapes"] and r["sequence_length"] == 128 and r["batch_size"] == 1
    model = onnx.load(str(q / "model.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    for inp in model.graph.input:
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 128], inp.name
        assert not any(d.dim_param for d in inp.type.tensor_type.shape.dim)
    # read every Q/DQ scale from the graph and check it is 2**k exactly
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(scales) > 20
    for s in scales:
        for v in np.asarray(s, dtype=np.float64).ravel():
            m, _ = math.frexp(v)
            assert m == 0.5, v
    # symmetric activations (uint8 zero point 128) and symmetric int8 weights (zero point 0)
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.uint8 and int(z) == 128 for z in zps)
    assert r["pow2"]["check"]["ok"] and r["pow2"]["rounded"]["weight_scales"] > 0
    cov = json.loads((q / "coverage.json").read_text())
    assert cov["unsupported_nodes"] == r["coverage"]["unsupported_nodes"]
    # GELU's Erf and the mask path (transformers 5 builds the padding mask with And + Where)
    assert set(cov["unsupported_by_op"]) <= {"Erf", "Where", "Expand", "Cast", "And"}


def test_fpga_model_still_agrees_with_fp32(exports):
    fp32, q = exports("cpu-x86", "fp32"), exports("fpga-vitisai")
    a, b = onnx_logits(fp32, TEXTS), onnx_logits(q, TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 2)
    assert np.abs(a - b).max() < 0.05, np.abs(a - b).max()


def test_fp16_for_gpu_profile(exports):
    fp32, h = exports("cpu-x86", "fp32"), exports("gpu-cuda")
    model = onnx.load(str(h / "model.onnx"))
    types = {i.data_type for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert onnx.TensorProto.FLOAT16 in types
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept
    a, b = onnx_logits(fp32, TEXTS), onnx_logits(h, TEXTS)
    assert np.abs(a - b).max() < 1e-2


def test_keep_head_float_leaves_classifier_unquantized(exports):
    q = exports("fpga-vitisai", None, keep_head_float=True)
    model = onnx.load(str(q / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    outs = {o.name for o in model.graph.output}
    head = [n for n in model.graph.node if set(n.output) & outs]
    assert head and all(
        producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for n in head for i in n.input
    )
    assert record(q)["results"]["quantization"]["excluded_nodes"] == [n.name for n in head]


def test_feature_extraction_task_detected(tiny_bert, tmp_path):
    src = tmp_path / "fe"
    shutil.copytree(tiny_bert, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert detect_task(cfg) == "feature-extraction"
    out = export_encoder(src, tmp_path / "out", target="cpu-x86", precision="fp32")
    names = [o.name for o in onnx.load(str(out / "model.onnx")).graph.output]
    assert "last_hidden_state" in names
    assert record(out)["results"]["task"] == "feature-extraction"


def test_bad_inputs_raise_badinput_and_leave_nothing(tiny_bert, tmp_path):
    with pytest.raises(BadInput, match="precision"):
        export_encoder(tiny_bert, tmp_path / "a", target="cpu-x86", precision="int3")
    with pytest.raises(BadInput, match="calibration: data file not found"):
        export_encoder(tiny_bert, tmp_path / "b", target="fpga-vitisai", calibration=tmp_path / "nope.jsonl")
    with pytest.raises(BadInput, match="not in the model"):
        export_encoder(tiny_bert, tmp_path / "c", target="cpu-x86", precision="int8-dynamic", exclude_nodes=["no_such_node"])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
