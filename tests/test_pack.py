"""Sibling packing (edgetune/export/decoder/pack.py, `export --pack-siblings`): gate+up (and q+k when v is 8-bit) as one
MatMulNBits + Split, the same logits bit for bit; refused where there is nothing of the builder's to pack."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from edgetune.export import export  # noqa: E402

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 11, 200, 31, 8]


def _record(folder) -> dict:
    return json.loads((folder / "edgetune.json").read_text())["results"]


def _ops(folder) -> dict[str, list[str]]:
    from edgetune import onnx_graph

    out: dict[str, list[str]] = {}
    for n in onnx_graph.read(folder / "model.onnx").graph.node:
        out.setdefault(n.op_type, []).append(n.name)
    return out


def _logits(folder):
    from edgetune.device import llm

    return np.asarray(llm.logits(llm.load(folder), IDS))


def _layers(model_dir) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


@pytest.mark.parametrize("kw, packed_names", [
    ({}, {"gate_up_proj"}),  # the builder packs q/k/v itself (qkv_proj); gate/up are two nodes
    ({"int4": {"algorithm": "k_quant", "lm_head": "int8", "accuracy_level": 4}, "mixed": {"modules": ["v_proj", "down_proj"]}},
     {"gate_up_proj", "qk_proj"}),  # v at 8 bits: q and k (4-bit, one input) packed, v and down left alone
])
def test_packed_export_computes_the_unpacked_graph_bit_for_bit(tiny_llama, tmp_path, kw, packed_names):
    packed = export(tiny_llama, tmp_path / "packed", target="cpu-x86", precision="int4", pack=True, **kw)
    plain = export(tiny_llama, tmp_path / "plain", target="cpu-x86", precision="int4", **kw)
    rec, ops, plain_ops = _record(packed), _ops(packed), _ops(plain)
    layers = _layers(tiny_llama)
    assert rec["packed"]["groups"] == layers * len(packed_names) and "packed" not in _record(plain)
    assert {n.split("/")[-2] for n in rec["packed"]["nodes"]} == packed_names
    assert len(ops["MatMulNBits"]) == len(plain_ops["MatMulNBits"]) - rec["packed"]["groups"]
    assert len(ops["Split"]) == len(plain_ops.get("Split", [])) + rec["packed"]["groups"]
    assert all(p["path"] == "prepacked" for p in rec["kernel_paths"]["nodes"])  # still on the fast kernels
    assert np.array_equal(_logits(packed), _logits(plain))
    if "mixed" in kw:  # the 8-bit rule is still what the graph holds, read through the packed names
        from edgetune.export.decoder.mixed import widths

        w = widths(packed)
        assert w["/model/layers.0/attn/qk_proj/MatMul"] == 4 and w["/model/layers.0/attn/v_proj/MatMul"] == 8
        assert w["/model/layers.0/mlp/gate_up_proj/MatMul"] == 4 and w["/model/layers.0/mlp/down_proj/MatMul"] == 8


@pytest.mark.parametrize("kw, words", [
    ({"precision": "fp32"}, "not fp32"),
    ({"precision": "int4", "float_adapter": "x"}, "with adapters"),
])
def test_packing_is_refused_where_the_builder_wrote_nothing_to_pack(tiny_llama, tmp_path, kw, words):
    """fp32 has no MatMulNBits; the adapter variants find their base's nodes by name (exit 2, nothing written)."""
    from edgetune.errors import BadInput

    with pytest.raises(BadInput, match=words):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", pack=True, **kw)
    assert not (tmp_path / "x").exists()


def test_siblings_of_different_widths_or_inputs_stay_apart():
    """Only exact siblings: same input, K, bits, block, level; the packed rows follow the packed name's order."""
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.export.decoder.pack import pack_siblings

    rng = np.random.default_rng(0)

    def node(proj, block, bits, x="x", n=8):
        w = rng.integers(0, 255, size=(n, 1, 16), dtype=np.uint8)
        s = rng.random(n).astype(np.float32)
        name = f"/model/layers.0/{block}/{proj}/MatMul_Q{bits}"
        inits = [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(s, f"{name}.s")]
        return helper.make_node("MatMulNBits", [x, f"{name}.w", f"{name}.s"], [f"{name}/out"], name=name, domain="com.microsoft",
                                K=32, N=n, bits=bits, block_size=32), inits

    parts = [node("up_proj", "mlp", 4), node("gate_proj", "mlp", 4, n=4), node("q_proj", "attn", 4, x="y"), node("k_proj", "attn", 8, x="y")]
    nodes = [p[0] for p in parts]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
                              initializer=[i for p in parts for i in p[1]])
    model = helper.make_model(graph)
    info = pack_siblings(model)
    assert info["groups"] == 1 and info["nodes"][0]["node"] == "/model/layers.0/mlp/gate_up_proj/MatMul_Q4"
    assert info["nodes"][0]["from"] == ["/model/layers.0/mlp/gate_proj/MatMul_Q4", "/model/layers.0/mlp/up_proj/MatMul_Q4"]
    assert info["nodes"][0]["N"] == [4, 8]  # gate's rows first, whatever the graph's order
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert list(split.output) == ["/model/layers.0/mlp/gate_proj/MatMul_Q4/out", "/model/layers.0/mlp/up_proj/MatMul_Q4/out"]
    assert {n.name for n in model.graph.node if n.op_type == "MatMulNBits"} >= {"/model/layers.0/attn/q_proj/MatMul_Q4",
                                                                                   "/model/layers.0/attn/k_proj/MatMul_Q8"}


def test_siblings_with_side_terms_of_their_own_pack_their_quantized_nodes():
    """q/k/v each with a LoRA branch of its own (``x @ A_i @ B_i`` added to the node's output): no one side MatMul
    serves them, so the three MatMulNBits become one + Split and each Add reads its Split output; the outputs are
    the same as before, and a group whose side terms share one input (the GGUF fusion's) takes them along."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.export.decoder.pack import pack_siblings

    rng = np.random.default_rng(1)
    k, r = 32, 4
    nodes, inits, outs = [], [], []
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"/model/layers.0/attn/{proj}/MatMul_Q4"
        w = rng.integers(0, 255, size=(16, 1, 16), dtype=np.uint8)
        s = (rng.random(16) * 0.1).astype(np.float32)
        a, b = rng.normal(size=(k, r)).astype(np.float32), rng.normal(size=(r, 16)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(s, f"{name}.s"),
                  numpy_helper.from_array(a, f"{name}.A"), numpy_helper.from_array(b, f"{name}.B")]
        nodes += [helper.make_node("MatMulNBits", ["x", f"{name}.w", f"{name}.s"], [f"{name}/out"], name=name, domain="com.microsoft",
                                   K=k, N=16, bits=4, block_size=32),
                  helper.make_node("MatMul", ["x", f"{name}.A"], [f"{name}/xa"], name=f"{name}/lora_A"),
                  helper.make_node("MatMul", [f"{name}/xa", f"{name}.B"], [f"{name}/xab"], name=f"{name}/lora_B"),
                  helper.make_node("Add", [f"{name}/out", f"{name}/xab"], [f"{proj}_y"], name=f"{name}/lora_Add")]
        outs.append(f"{proj}_y")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.normal(size=(2, k)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, {"x": x})

    before = run(model)
    info = pack_siblings(model)
    assert info["groups"] == 1 and info["nodes"][0]["node"] == "/model/layers.0/attn/qkv_proj/MatMul_Q4"
    assert info["nodes"][0]["side"] is False
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("Add") == 3 and ops.count("MatMul") == 6 and ops.count("Split") == 1
    for got, want in zip(run(model), before):
        np.testing.assert_array_equal(got, want)
