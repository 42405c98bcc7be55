"""`edgetune quantize` and the int8 building blocks: calibration files, pow2 scales (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetune.export.encoder import pow2
from edgetune.export.encoder.pipeline import export_encoder
from edgetune.export.encoder.quantize import load_calibration
from edgetune.errors import BadInput

from encoder_helpers import TEXTS, onnx_logits, record, run_cli


@pytest.fixture(scope="module")
def fp32_static(tiny_bert, module_tmp):
    """A plain (unfused) static-shape fp32 export, as `edgetune export --precision fp32 -t fpga-vitisai` makes."""
    return export_encoder(tiny_bert, module_tmp("q") / "fp32", target="fpga-vitisai", precision="fp32")


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

    from edgetune.export.encoder.quantize import Int8Options, quantize_static_int8

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


# ---------------------------------------------------------------------------- XINT8 recipe (pow2 MinMSE)


def _gemm_model(tmp_path, w: np.ndarray, name="f.onnx"):
    from onnx import TensorProto, helper

    k, n = w.shape
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
        [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(np.zeros(n, np.float32), "B")],
    )
    src = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    return src


def _best_pow2(x: np.ndarray, candidates, zp: int, lo: int, hi: int) -> float:
    errs = [float(np.sum((np.clip(np.rint(x / s), lo - zp, hi - zp) * s - x) ** 2)) for s in candidates]
    return float(candidates[int(np.argmin(errs))])


def test_minmse_activation_scale_clips_rare_outliers(tmp_path):
    """MinMSE picks, among powers of two, the scale with the lowest quantization error over all
    calibration values: one outlier of 40 among N(0,1) values is clipped, not covered."""
    from edgetune.export.encoder.quantize import Int8Options, quantize_static_int8

    rng = np.random.default_rng(1)
    src = _gemm_model(tmp_path, rng.normal(size=(16, 8)) * 0.3)
    batches = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(8)]
    batches[3]["x"][1, 5] = 40.0
    qdq = tmp_path / "qdq.onnx"
    quantize_static_int8(src, qdq, Int8Options(per_channel=False, activation_symmetric=True, calibration_method="minmax"),
                         batches=batches, work=tmp_path)
    out, details = tmp_path / "mse.onnx", {}
    rep = pow2.minmse_activation_scales(qdq, tmp_path / "preprocessed.onnx", batches, out, objective="tensor", details=details)
    assert rep["activation_scales"] == len(details) >= 1 and rep["clipping"] >= 1
    x_scale = next(d for d in details.values() if d["tensors"] == ["x"])
    values = np.concatenate([b["x"].ravel() for b in batches])
    assert x_scale["zero_point"] == 128 and pow2.is_pow2(x_scale["chosen"])
    assert x_scale["chosen"] == _best_pow2(values, x_scale["candidates"], 128, 0, 255)
    assert x_scale["chosen"] * 127 < 40.0  # the outlier is clipped: covering it would cost more everywhere else
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert any(float(v) == x_scale["chosen"] for k, v in inits.items() if k.endswith("scale") and v.size == 1)


def test_round_scales_requantizes_weights_from_the_float_graph(tmp_path):
    """One outlier weight sets onnxruntime's per-tensor scale; MinMSE from the float weights
    clips it and reconstructs the rest far better than rounding the already-quantized values."""
    from edgetune.export.encoder.quantize import Int8Options, quantize_static_int8

    rng = np.random.default_rng(2)
    w = rng.normal(size=(512, 256)) * 0.05
    w[7, 3] = 3.0
    src = _gemm_model(tmp_path, w)
    batches = [{"x": rng.normal(size=(4, 512)).astype(np.float32)} for _ in range(4)]
    qdq = tmp_path / "qdq.onnx"
    quantize_static_int8(src, qdq, Int8Options(per_channel=False, activation_symmetric=True), batches=batches, work=tmp_path)

    def weight_error(path):
        m = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                  and inits[n.input[0]].dtype == np.int8)
        s = float(inits[dq.input[1]])
        return float(np.mean((inits[dq.input[0]].astype(np.float32) * s - w) ** 2)), s

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    counts = pow2.round_scales(qdq, a, float_model=src)
    pow2.round_scales(qdq, b)
    assert counts["weights_from_float"] == 1 and pow2.check(a)["ok"]
    (err_float, s_float), (err_dq, _) = weight_error(a), weight_error(b)
    assert s_float * 127 < 3.0  # the outlier is clipped: 2 halvings below onnxruntime's scale (3/127)
    assert err_float < 0.5 * err_dq  # re-quantizing 8-bit values at a finer scale cannot recover them
    c = tmp_path / "c.onnx"  # a second pass over a rounded model changes nothing
    pow2.round_scales(a, c)
    assert weight_error(c) == (err_float, s_float)


def _ln_model(tmp_path):
    """LayerNorm (one outlier channel) -> Reshape -> Gemm -> Reshape -> Add(residual): the BERT FFN pattern."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    h, f = 16, 32
    gamma = np.ones(h, np.float32)
    gamma[5] = 30.0
    w1 = rng.normal(size=(h, f)).astype(np.float32) * 0.2
    w2 = rng.normal(size=(f, h)).astype(np.float32) * 0.2
    w2[:, 9] *= 40  # outlier output channel
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (gamma, "gamma"), (np.zeros(h, np.float32), "beta"), (w1, "W1"), (np.zeros(f, np.float32), "B1"),
        (w2, "W2"), (np.zeros(h, np.float32), "B2"), (np.array([8, h], np.int64), "s2d"), (np.array([1, 8, h], np.int64), "s3d"),
        (np.array([8, f], np.int64), "s2f"))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("Reshape", ["ln", "s2d"], ["ln2d"], name="r1"),
        helper.make_node("Gemm", ["ln2d", "W1", "B1"], ["h1"], name="ffn_in"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act"),
        helper.make_node("Gemm", ["a1", "W2", "B2"], ["h2"], name="ffn_out"),
        helper.make_node("Reshape", ["h2", "s3d"], ["h3"], name="r2"),
        helper.make_node("Add", ["h3", "ln"], ["y"], name="residual"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, h])], inits)
    src = tmp_path / "ln.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    batches = [{"x": rng.normal(size=(1, 8, h)).astype(np.float32)} for _ in range(6)]
    return src, batches


def test_equalize_is_exact_with_power_of_two_factors(tmp_path):
    import onnxruntime as ort

    src, batches = _ln_model(tmp_path)
    out = tmp_path / "eq.onnx"
    rep = pow2.equalize(src, out, batches, migrations=(0.5,))
    assert rep["smoothquant"] == 1 and rep["output_equalized"] == 1
    m = onnx.load(str(out))
    muls = [n for n in m.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in muls:
        assert all(pow2.is_pow2(float(v)) for v in inits[n.input[1]].ravel())
    smooth = next(n for n in muls if n.input[0] == "ln")
    assert float(inits[smooth.input[1]][5]) < 1  # the outlier LayerNorm channel is divided down before the int8 MatMul
    residual = next(n for n in m.graph.node if n.op_type == "Add")
    assert "ln" in residual.input  # the residual still reads the LayerNorm output itself
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feeds in batches:
        np.testing.assert_allclose(a.run(None, feeds)[0], b.run(None, feeds)[0], rtol=1e-5, atol=1e-4)


def test_xint8_recipe_end_to_end_beats_ceil_rounding(tmp_path):
    """quantize_static_int8 with power_of_two: equalization + MinMSE; every scale pow2, the output
    closer to float than onnxruntime's MinMax scales rounded up to powers of two."""
    import onnxruntime as ort

    from edgetune.export.encoder import coverage
    from edgetune.export.encoder.quantize import Int8Options, quantize_static_int8

    src, batches = _ln_model(tmp_path)
    base = dict(per_channel=False, activation_symmetric=True, exclude_op_types=["LayerNormalization"])
    xint8, plain = tmp_path / "x.onnx", tmp_path / "p.onnx"
    (tmp_path / "w1").mkdir(), (tmp_path / "w2").mkdir()
    rec = quantize_static_int8(src, xint8, Int8Options(power_of_two=True, **base), batches=batches, work=tmp_path / "w1")
    quantize_static_int8(src, tmp_path / "raw.onnx", Int8Options(**base), batches=batches, work=tmp_path / "w2")
    pow2.round_scales(tmp_path / "raw.onnx", plain)  # the old way: scales rounded up
    assert pow2.check(xint8)["ok"] and pow2.check(plain)["ok"]
    assert rec["xint8"]["activations"]["method"] == "minmse" and rec["xint8"]["weights"]["weights_from_float"] >= 2
    assert rec["xint8"]["equalize"]["output_equalized"] == 1
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    err = {}
    for name, path in (("xint8", xint8), ("plain", plain)):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        err[name] = np.mean([np.mean((s.run(None, f)[0] - ref.run(None, f)[0]) ** 2) for f in batches])
    assert err["xint8"] < 0.5 * err["plain"], err
    cov = coverage.coverage(xint8, [], batch=1, sequence_length=8)
    assert 50 < cov["int8_pct_flops"] < 100 and "LayerNormalization" in cov["float_compute_by_op"]


def test_real_tokens_drops_padding_rows():
    mask = np.array([[1, 1, 0, 0]])
    x3 = np.arange(4 * 3, dtype=np.float32).reshape(1, 4, 3)
    assert pow2.real_tokens(x3, mask).shape == (2, 3)
    assert pow2.real_tokens(x3.reshape(4, 3), mask).shape == (2, 3)  # [B*S, H] (reshaped for Gemm)
    att = np.zeros((1, 2, 4, 4), np.float32)  # [B, heads, S, S]: query rows kept
    assert pow2.real_tokens(att, mask).shape == (2, 2, 4)
    assert pow2.real_tokens(x3, None) is x3 and pow2.real_tokens(x3, np.ones((1, 4))) is x3
