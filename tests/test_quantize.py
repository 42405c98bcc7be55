"""`edgetune quantize` and the int8 building blocks: calibration files, pow2 scales (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetune.encoder import pow2
from edgetune.encoder.export import export_encoder
from edgetune.encoder.quantize import load_calibration
from edgetune.errors import BadInput

from encoder_helpers import TEXTS, onnx_logits, record, run_cli


@pytest.fixture(scope="module")
def fp32_static(tiny_bert, tmp_path_factory):
    """A plain (unfused) static-shape fp32 export, as `edgetune export --precision fp32 -t fpga-vitisai` makes."""
    return export_encoder(tiny_bert, tmp_path_factory.mktemp("q") / "fp32", target="fpga-vitisai", precision="fp32")


def test_missing_calibration_file_exits_2_with_clear_message(fp32_static, tmp_path):
    r = run_cli("quantize", str(fp32_static), "-t", "fpga-vitisai", "-o", str(tmp_path / "o"), "--calibration", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: calibration: data file not found") and "missing.jsonl" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_empty_calibration_file_exits_2(fp32_static, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("quantize", str(fp32_static), "-t", "fpga-vitisai", "-o", str(tmp_path / "o"), "--calibration", str(empty))
    assert r.returncode == 2
    assert "calibration: data file is empty" in r.stderr and "empty.jsonl" in r.stderr
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    r = run_cli("quantize", str(fp32_static), "-t", "fpga-vitisai", "-o", str(tmp_path / "o"), "--calibration", str(blank))
    assert r.returncode == 2 and "has no records" in r.stderr


def test_calibration_reads_any_data_file(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("label\ttext\nham\thello there\nspam\tWIN a prize now\n")
    c = load_calibration(tsv, samples=10)
    assert c.texts == ["hello there", "WIN a prize now"] and c.count == 2
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\nsecond line\nthird\n")
    assert load_calibration(txt, samples=2).texts == ["first line", "second line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(BadInput, match=r"bad.jsonl:2"):
        load_calibration(bad, samples=10)
    assert load_calibration("sms-like.jsonl", samples=5).count == 5  # name in the project's calibration/


def test_cli_static_quantize_with_entropy_and_json(fp32_static, tiny_bert, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    out = tmp_path / "q"
    r = run_cli("quantize", str(fp32_static), "-t", "fpga-vitisai", "-o", str(out), "--calibration", str(calib),
                "--calibration-method", "entropy", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["precision"] == "int8-static" and res["quantization"]["calibration_method"] == "entropy"
    assert res["calibration"]["samples"] == 18
    assert res["pow2"]["check"]["ok"] is True
    assert res["size_mb"] < 0.6 * res["source_size_mb"]  # tiny model: biases/norms weigh a lot; ~4x on MiniLM (slow test)
    assert record(out)["stage"] == "quantize"
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    a, b = onnx_logits(fp32_static, TEXTS), onnx_logits(out, TEXTS)
    assert np.abs(a - b).max() < 0.05


def test_cli_dynamic_per_tensor_and_exclusions(fp32_static, tmp_path):
    out = tmp_path / "d"
    r = run_cli("quantize", str(fp32_static / "model.onnx"), "-t", "cpu-x86", "-o", str(out), "--method", "dynamic",
                "--per-tensor", "--exclude-op-type", "Gather", "--json", "-q")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["quantization"]["per_channel"] is False and "Gather" not in res["quantization"]["op_types"]
    model = onnx.load(str(out / "model.onnx"))
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    inits = {i.name: i for i in model.graph.initializer}
    # embeddings stay float: the Gather tables are float initializers, not dequantized int8
    assert any(inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT for n in gathers)


def test_cli_refuses_quantized_input(fp32_static, tmp_path):
    first = tmp_path / "q1"
    assert run_cli("quantize", str(fp32_static), "-t", "cpu-x86", "-o", str(first), "--method", "dynamic", "-q").returncode == 0
    r = run_cli("quantize", str(first), "-t", "cpu-x86", "-o", str(tmp_path / "q2"), "--method", "dynamic")
    assert r.returncode == 2 and "already quantized" in r.stderr
    r = run_cli("quantize", str(tmp_path / "nothing"), "-t", "cpu-x86", "-o", str(tmp_path / "q3"))
    assert r.returncode == 2 and "not an ONNX model" in r.stderr


def _tiny_qdq(tmp_path):
    """A 1-layer MatMul+bias Gemm QDQ model quantized by onnxruntime with ordinary (non-pow2) scales."""
    from onnx import TensorProto, helper

    from edgetune.encoder.quantize import Int8Options, quantize_static_int8

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32) * 0.3, "W")
    b = numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 8])], [w, b],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "f.onnx"
    onnx.save(m, src)
    batches = [{"x": rng.normal(size=(4, 16)).astype(np.float32) * 1.7} for _ in range(8)]
    qdq = tmp_path / "qdq.onnx"
    opts = Int8Options(per_channel=True, activation_symmetric=True)
    quantize_static_int8(src, qdq, opts, batches=batches, work=tmp_path)
    return src, qdq, batches


def test_pow2_rounding_makes_every_scale_a_power_of_two(tmp_path):
    import onnxruntime as ort

    src, qdq, batches = _tiny_qdq(tmp_path)
    before = pow2.check(qdq)
    assert before["ok"] is False and before["not_pow2"]  # onnxruntime's own scales are arbitrary
    out = tmp_path / "p2.onnx"
    counts = pow2.round_scales(qdq, out)
    assert counts["weight_scales"] == 1 and counts["bias_scales"] == 1 and counts["activation_scales"] >= 2
    after = pow2.check(out)
    assert after["ok"] is True and after["scale_values"] >= 8 + 1  # per-channel weight scales counted one by one
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    for name, arr in inits.items():
        if name.endswith("scale"):
            assert all(math.frexp(float(v))[0] == 0.5 for v in np.ravel(arr)), name
    # bias scale = input scale * weight scale (what the int32 accumulator needs)
    m = onnx.load(str(out))
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    sa, sw, sb = (inits[dq[i].input[1]] for i in gemm.input)
    np.testing.assert_array_equal(sb, (sa * sw).astype(np.float32))
    # and the rounded model still computes nearly the same thing
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feeds in batches[:3]:
        a, b = ref.run(None, feeds)[0], got.run(None, feeds)[0]
        assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_is_pow2():
    assert pow2.is_pow2(1.0) and pow2.is_pow2(2.0**-13) and pow2.is_pow2(4096.0)
    assert not pow2.is_pow2(0.0) and not pow2.is_pow2(-0.5) and not pow2.is_pow2(0.3) and not pow2.is_pow2(float("inf"))
    assert not pow2.is_pow2(np.float32(2.0**-7) * np.float32(1.0000001))
