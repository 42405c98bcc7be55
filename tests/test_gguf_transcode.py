"""GGUF -> MatMulNBits transcode: every supported GGML type round-trips exactly; others are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")

from edgetune.export.decoder.blockform import BlockForm, float_zero_point_graph, matmul_graph  # noqa: E402
from edgetune.export.decoder.gguf_blocks import QUANT_TYPES, to_blockform  # noqa: E402


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("type_name", QUANT_TYPES)
def test_each_type_round_trips_exactly(type_name):
    from tiny_gguf import tensor_data

    rng = np.random.default_rng(1)
    n, k = 48, 512
    raw, qtype = tensor_data(rng, type_name, rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    ref = gguf.quants.dequantize(raw, qtype).reshape(n, k)
    form = to_blockform(raw, type_name, n, k)
    w = form.dequantize()
    assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max(), type_name  # gguf's own dequantize
    model, info = matmul_graph(form, accuracy_level=0)
    mnb = [nd for nd in model.graph.node if nd.op_type == "MatMulNBits"]
    assert len(mnb) == 1 and len(mnb[0].input) == 3  # symmetric: no zero_points input (prepacked path)
    assert info["correction"] == (type_name in ("Q4_1", "Q4_K", "Q5_1", "Q5_K"))
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    y = _session(model).run(None, {"X": x})[0]
    want = x[0].astype(np.float64) @ ref.T.astype(np.float64)
    assert np.abs(y[0] - want).max() <= 1e-5 * np.abs(want).max(), type_name


def test_block_sum_form_equals_float_zero_point_node():
    """w = s*(q - z) with float z (HQQ's form): the symmetric node + correction == MatMulNBits with float zero points."""
    rng = np.random.default_rng(2)
    n, k, block = 64, 256, 32
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    s = rng.uniform(0.01, 0.05, (n, k // block)).astype(np.float32)
    z = rng.uniform(0, 15, (n, k // block)).astype(np.float32)
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    fast, info = matmul_graph(BlockForm.from_float_zero_points(q, s, z, 4, block))
    slow = float_zero_point_graph(q, s, z, 4, block)
    assert info["correction"] and len(next(nd for nd in fast.graph.node if nd.op_type == "MatMulNBits").input) == 3
    a, b = _session(fast).run(None, {"X": x})[0], _session(slow).run(None, {"X": x})[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_hqq_float_zero_points_converted_exactly():
    """onnxruntime's HQQ writes float zero points (slow path); convert_float_zero_points gives the same output fast."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    mnq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    pytest.importorskip("torch")
    from edgetune.export.decoder.blockform import convert_float_zero_points

    rng = np.random.default_rng(3)
    k, n = 256, 96
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="/m/MatMul")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "S", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "S", n])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    quant = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False, accuracy_level=0,
                                     algo_config=mnq.HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    quant.process()
    slow = quant.model.model
    assert next(i for i in slow.graph.initializer if "zero_points" in i.name).data_type == TensorProto.FLOAT
    fast = copy.deepcopy(slow)
    done = convert_float_zero_points(fast)
    assert len(done) == 1 and done[0]["correction"]
    assert all(len(nd.input) == 3 for nd in fast.graph.node if nd.op_type == "MatMulNBits")
    x = rng.standard_normal((1, 4, k)).astype(np.float32)
    a, b = _session(fast).run(None, {"X": x})[0], _session(slow).run(None, {"X": x})[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.fixture(scope="module")
def tiny_gguf(module_tmp):
    pytest.importorskip("torch")
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    d = module_tmp("tiny-gguf")
    build_bpe_tokenizer(d)
    return write_tiny_llama_gguf(d / "tiny.gguf", d)


def test_tiny_llama_gguf_end_to_end(tiny_gguf, tmp_path):
    """export (default precision = gguf) -> every tensor exact, loads in onnxruntime-genai, logits == PyTorch's."""
    import torch

    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.export.decoder.gguf_export import transcode
    from edgetune.model_input import load_causal_lm, materialize

    out = export(tiny_gguf, tmp_path / "gguf", target="cpu-x86")
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["precision"] == "gguf" and "default" in rec["precision_note"]
    g = rec["gguf"]
    assert {t["type"] for t in g["tensors"]} >= set(QUANT_TYPES) | {"F16", "F32"}
    assert g["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and g["max_rel_diff_vs_builder_fp32"] <= 1e-6
    assert all(t["permuted_rows"] for t in g["tensors"] if ".attn_q." in t["gguf"] or ".attn_k." in t["gguf"])
    assert g["all_prepacked"] and g["embedding"]["shared_with_lm_head"] and rec["tokenizer_check"]["mismatches"] == 0
    # zero points only on the low-bits node of a 6-/8-bit type split into planes (uint 0), never float
    assert all(not a["zero_points"] or a["bits"] in (2, 4) for a in rec["matmulnbits"])
    assert {n["type"] for n in g["nodes"] if n.get("planes")} >= {"Q5_0", "Q6_K"}
    kinds = {n["node"]: n for n in g["nodes"]}
    assert kinds["/model/layers.1/mlp/gate_proj/MatMul"]["form"] == "float MatMul"
    # accuracy_level 0 for every node (8-bit too): the graph computes the dequantized model in fp32
    folder = materialize(tiny_gguf).path
    exact = tmp_path / "exact"
    exact.mkdir()
    import shutil

    from edgetune.export.decoder.builder import build

    build(folder, exact / "fp32", "fp32", "cpu", exact, {})
    (exact / "q").mkdir()
    transcode(exact / "fp32", exact / "q", tiny_gguf, json.loads((folder / "config.json").read_text()),
              accuracy_level=0, eight_bit_level=None)
    shutil.rmtree(exact / "fp32")
    ids = np.array([5, 17, 42, 99, 3, 250, 7, 64], dtype=np.int64)
    got = dev.logits(dev.load(exact / "q"), ids)
    with torch.no_grad():
        want = load_causal_lm(folder)(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_unsupported_type_exits_2_naming_it(tiny_gguf, tmp_path):
    from edgetune.errors import BadInput
    from edgetune.export import export
    from tiny_gguf import write_tiny_llama_gguf

    bad = write_tiny_llama_gguf(tmp_path / "q2k.gguf", tiny_gguf.parent, override={"ffn_down": "Q2_K"})
    with pytest.raises(BadInput) as err:
        export(bad, tmp_path / "out", target="cpu-x86", precision="gguf")
    assert err.value.exit_code == 2 and "Q2_K" in err.value.one_line(), err.value.one_line()
    assert not (tmp_path / "out").exists()


def test_gguf_precision_needs_a_gguf_source(tiny_llama, tmp_path):
    from edgetune.errors import BadInput
    from edgetune.export import export

    with pytest.raises(BadInput, match="no GGUF source") as err:
        export(tiny_llama, tmp_path / "o", target="cpu-x86", precision="gguf")
    assert err.value.exit_code == 2


FOUR_BIT = {"attn_q": "Q4_K", "attn_k": "Q4_1", "attn_v": "Q4_0", "attn_output": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_K",
            "ffn_down": "Q4_1"}


def test_runtime_adapter_over_gguf_base(tiny_gguf, tmp_path):
    """--adapter over the transcoded base: LoRA MatMuls stay float graph inputs, base + adapter == PyTorch base + PEFT."""
    import onnx

    from edgetune.export import export
    from edgetune.model_input import materialize
    from test_adapters import make_lora
    from tiny_gguf import write_tiny_llama_gguf

    src = write_tiny_llama_gguf(tmp_path / "q4.gguf", tiny_gguf.parent, override=FOUR_BIT)  # all 4-bit: accuracy_level 0 throughout
    lora = make_lora(materialize(src).path, tmp_path / "chat", targets=["q_proj", "v_proj", "down_proj"], seed=1)
    out = export(src, tmp_path / "x", target="cpu-x86", adapters=[lora])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert {n.op_type for n in graph.node if "/lora_" in n.name} == {"MatMul"}
    # 7 linears per layer and the head, less the siblings packed after the corrections' fusion: q+k (v, Q4_0, has no
    # correction to share) and gate+up, one node each per layer
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 7 + 1 - 2 * 2
    res = json.loads((out / "edgetune.json").read_text())["results"]
    assert res["precision"] == "gguf" and res["gguf"]["max_rel_diff_vs_gguf_dequantize"] <= 1e-6
    fig = res["adapter_check"]["adapters"]
    assert fig["(base)"]["max_abs_diff"] < 1e-3 and fig["chat"]["max_abs_diff"] < 1e-3, fig


def test_float_adapter_over_gguf_base_is_what_was_trained(tiny_gguf, tmp_path):
    """--float-adapter over the exact GGUF base: one graph, LoRA branches float, == PyTorch dequantized base + PEFT."""
    from edgetune.export import export
    from edgetune.export.decoder.float_adapter import lora_graph
    from edgetune.model_input import materialize
    from test_adapters import make_lora
    from tiny_gguf import write_tiny_llama_gguf

    src = write_tiny_llama_gguf(tmp_path / "q4.gguf", tiny_gguf.parent, override=FOUR_BIT)
    base = materialize(src).path
    lora = make_lora(base, tmp_path / "chat", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     seed=2)
    out = export(base, tmp_path / "x", target="cpu-x86", precision="gguf", float_adapter=lora)
    res = json.loads((out / "edgetune.json").read_text())["results"]
    assert res["precision"] == "gguf" and res["gguf"]["max_rel_diff_vs_gguf_dequantize"] <= 1e-6
    graph = lora_graph(out)
    assert res["float_adapter"]["branch_ops"]["MatMul"] == 2 * 7 * 2  # 7 modules x 2 layers, A and B each (before fusion)
    assert not graph["not_float"] and res["fusion"]["fused"]  # then fused with the corrections (tests/test_fuse.py)
    vs = res["float_adapter_check"]["vs"]
    assert vs["peft_unmerged"]["max_abs_diff"] < 1e-3, vs
    assert res["float_adapter_check"]["adapter_effect_max_abs"] > 100 * vs["peft_unmerged"]["max_abs_diff"]


def test_phi3_gguf_with_fused_qkv_and_gate_up_takes_the_exact_path(tmp_path):
    """llama.cpp writes Phi-3's q/k/v as one attn_qkv and gate/up as one ffn_up; the transcode once looked them
    up as separate q/k/v tensors and exited 2. Each fused tensor (or the row half the builder's node takes)
    is now transcoded exactly, and the graph computes the dequantized model. (The tiny GGUF's vocabulary is a
    ByteLevel BPE that transformers' SentencePiece-style Phi-3 converter garbles, so `export`'s tokenizer
    probe is not part of this test: the transcode is called directly.)"""
    import torch

    from edgetune.device import llm as dev
    from edgetune.export.decoder.builder import build, builder_input
    from edgetune.export.decoder.gguf_export import transcode
    from edgetune.model_input import load_causal_lm, materialize
    from tiny_gguf import write_tiny_phi3_gguf
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path)
    src = write_tiny_phi3_gguf(tmp_path / "phi3.gguf", tmp_path)
    folder = materialize(src).path
    work = tmp_path / "work"
    work.mkdir()
    build(builder_input(folder, work), work / "fp32", "fp32", "cpu", work, {})
    (work / "q").mkdir()
    g = transcode(work / "fp32", work / "q", src, json.loads((folder / "config.json").read_text()),
                  accuracy_level=0, eight_bit_level=None)
    assert g["architecture"] == "phi3"
    by_node = {n["node"]: n for n in g["nodes"]}
    assert by_node["/model/layers.0/attn/qkv_proj/MatMul"]["gguf"] == ["blk.0.attn_qkv.weight"]
    # the builder splits gate_up_proj into gate_proj and up_proj: each takes its half of ffn_up's rows
    assert by_node["/model/layers.1/mlp/gate_proj/MatMul"]["gguf"] == by_node["/model/layers.1/mlp/up_proj/MatMul"]["gguf"] \
        == ["blk.1.ffn_up.weight"]
    assert [t["rows"] for t in g["tensors"] if t["gguf"] == "blk.1.ffn_up.weight"] == [[0, 512], [512, 1024]]
    assert g["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and g["max_rel_diff_vs_builder_fp32"] <= 1e-6
    assert g["all_prepacked"] and g["tensors_not_in_graph"] == []
    ids = np.array([5, 17, 42, 99, 3, 250, 7, 64], dtype=np.int64)
    got = dev.logits(dev.load(work / "q"), ids)
    with torch.no_grad():
        want = load_causal_lm(folder)(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()


@pytest.mark.parametrize("family", ["phi3", "phi4_mini"])
def test_phi3_gguf_with_a_float_lora_on_its_fused_qkv_and_gate_up(family, tmp_path):
    """A LoRA on Phi-3's fused qkv_proj makes the builder split the base's q/k/v MatMuls too; with grouped-query
    attention (these tiny GGUFs: 4 heads, 2 kv heads; Phi-4-mini's partial rotary too) q/k/v are unequal row blocks
    of llama.cpp's attn_qkv, which the transcode cut in three equal parts (CheckFailed: "GGUF rows 170 != graph N
    256"). The blocks are q, k, v sized from the config now; the graph is the GGUF's blocks plus the float LoRA, and
    equals PyTorch's dequantized base + PEFT up to noise far below the adapter's effect."""
    import tiny_gguf
    from edgetune.export import export
    from edgetune.model_input import materialize
    from test_adapters import make_lora
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path)
    src = getattr(tiny_gguf, f"write_tiny_{family}_gguf")(tmp_path / "m.gguf", tmp_path)
    base = materialize(src).path
    cfg = json.loads((base / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    assert q != kv  # grouped-query attention: equal thirds would be wrong
    lora = make_lora(base, tmp_path / "lora", targets=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"], seed=2)
    out = export(base, tmp_path / "x", target="cpu-x86", precision="gguf", float_adapter=lora)
    res = json.loads((out / "edgetune.json").read_text())["results"]
    rows = {tuple(t["rows"]) for t in res["gguf"]["tensors"] if t["gguf"] == "blk.0.attn_qkv.weight"}
    assert rows == {(0, q), (q, q + kv), (q + kv, q + 2 * kv)}, rows
    assert res["gguf"]["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and res["fusion"]["fused"]
    assert res["float_adapter"]["branch_ops"]["MatMul"] == 2 * 7 * 2  # 2 layers x (q, k, v, o, gate, up, down) x (A, B)
    check = res["float_adapter_check"]
    assert check["adapter_effect_max_abs"] > 100 * check["vs"]["peft_unmerged"]["max_abs_diff"], check


def test_qwen3_gguf_whose_head_dim_is_not_hidden_over_heads(tmp_path):
    """Qwen3's head_dim comes from the GGUF's attention.key_length (128 here, hidden 256 / 4 heads = 64): the
    import keeps it and the export is the exact transcode (issue 27 saw exit 4 when a loader dropped it)."""
    from edgetune.export import export
    from edgetune.model_input import materialize
    from tiny_gguf import write_tiny_qwen3_gguf
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path)
    src = write_tiny_qwen3_gguf(tmp_path / "qwen3.gguf", tmp_path, head_dim=128)
    cfg = json.loads((materialize(src).path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == 128 and cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    rec = json.loads((export(src, tmp_path / "gguf", target="cpu-x86") / "edgetune.json").read_text())["results"]
    g = rec["gguf"]
    assert rec["precision"] == "gguf" and g["architecture"] == "qwen3"
    assert g["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and g["max_rel_diff_vs_builder_fp32"] <= 1e-6
    assert rec["tokenizer_check"]["mismatches"] == 0


def _export_gguf(src, tmp_path) -> tuple[dict, dict]:
    """`export` of a GGUF at its default precision (gguf): the record's results and the imported config. Every
    tensor the graph takes is the GGUF's, exactly, and the fp32 graph is exact against the imported PyTorch model
    (the export's own graph proof, or exit 1). Then the transcode again with every node at accuracy_level 0 (the
    export runs 8-bit nodes at level 4, int8 activations): its logits are PyTorch's on the dequantized model."""
    import shutil

    import torch

    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.export.decoder.builder import build, builder_input
    from edgetune.export.decoder.gguf_export import transcode
    from edgetune.model_input import load_causal_lm, materialize

    folder = materialize(src).path
    cfg = json.loads((folder / "config.json").read_text())
    rec = json.loads((export(src, tmp_path / "gguf", target="cpu-x86") / "edgetune.json").read_text())["results"]
    g = rec["gguf"]
    assert rec["precision"] == "gguf" and g["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and g["max_rel_diff_vs_builder_fp32"] <= 1e-6
    assert g["tensors_not_in_graph"] == [] and rec["tokenizer_check"]["mismatches"] == 0
    proof = rec["graph_proof"]
    assert proof["top1_agreement"] == 1.0 and proof["max_abs_logit_diff"] <= 1e-3 * max(1.0, proof["logit_scale"]), proof
    work = tmp_path / "exact"
    work.mkdir()
    build(builder_input(folder, work), work / "fp32", "fp32", "cpu", work, {})
    (work / "q").mkdir()
    transcode(work / "fp32", work / "q", src, cfg, accuracy_level=0, eight_bit_level=None)
    shutil.rmtree(work / "fp32")
    ids = np.array([5, 17, 42, 99, 3, 250, 7, 64], dtype=np.int64)
    got = dev.logits(dev.load(work / "q"), ids)
    with torch.no_grad():
        want = load_causal_lm(folder)(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    return rec, cfg


def test_mistral_gguf_is_llama_cpps_llama_layout_with_an_untied_head_and_head_dim_128(tmp_path):
    """llama.cpp writes MistralForCausalLM as architecture ``llama`` (q/k rows permuted); Mistral's own traits
    here: an untied ``output`` head and Mistral-Nemo's head_dim 128 != hidden / heads (from rope.dimension_count).
    The head takes ``output.weight`` (not the embedding), every q/k row permutation is undone exactly."""
    from tiny_gguf import HEADS, HIDDEN, write_tiny_mistral_gguf
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path)
    src = write_tiny_mistral_gguf(tmp_path / "mistral.gguf", tmp_path, head_dim=128)
    rec, cfg = _export_gguf(src, tmp_path)
    assert cfg["model_type"] == "llama" and cfg["head_dim"] == 128 != HIDDEN // HEADS and cfg["tie_word_embeddings"] is False
    g = rec["gguf"]
    assert g["architecture"] == "llama" and not g["embedding"]["shared_with_lm_head"]
    by_node = {n["node"]: n for n in g["nodes"]}
    assert by_node["/lm_head/MatMul"]["gguf"] == ["output.weight"] and by_node["/lm_head/MatMul"]["type"] == "Q6_K"
    qkv = [n for n in g["nodes"] if n["node"] == "/model/layers.1/attn/qkv_proj/MatMul"]  # Q4_K q/k, Q6_K v: two parts
    assert [(n["gguf"], n["type"]) for n in qkv] == [(["blk.1.attn_q.weight", "blk.1.attn_k.weight"], "Q4_K"),
                                                      (["blk.1.attn_v.weight"], "Q6_K")]
    permuted = {t["gguf"] for t in g["tensors"] if t["permuted_rows"]}
    assert permuted == {f"blk.{i}.attn_{p}.weight" for i in range(2) for p in "qk"}


def test_qwen2_gguf_with_q_k_v_biases(tmp_path):
    """Qwen2 as llama.cpp writes it: q/k/v biases as F32 ``attn_{q,k,v}.bias`` tensors, no q/k permutation, a tied
    head. The biases reach the imported model as they are in the GGUF, and the graph computes them (its logits
    are exact against PyTorch, whose q/k/v biases are large here)."""
    import torch

    from edgetune.model_input import load_causal_lm, materialize
    from tiny_gguf import write_tiny_qwen2_gguf
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path)
    src = write_tiny_qwen2_gguf(tmp_path / "qwen2.gguf", tmp_path)
    rec, cfg = _export_gguf(src, tmp_path)
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    g = rec["gguf"]
    assert g["architecture"] == "qwen2" and g["embedding"]["shared_with_lm_head"]
    assert not any(t["permuted_rows"] for t in g["tensors"])
    reader = gguf.GGUFReader(str(src))
    biases = {t.name: np.asarray(t.data) for t in reader.tensors if t.name.endswith(".bias")}
    assert len(biases) == 2 * 3
    model = load_causal_lm(materialize(src).path)
    with torch.no_grad():
        for i in range(2):
            for p in "qkv":
                got = getattr(model.model.layers[i].self_attn, f"{p}_proj").bias.numpy()
                assert np.array_equal(got, biases[f"blk.{i}.attn_{p}.bias"]), (i, p)


def test_phi4_mini_gguf_keeps_partial_rotary_and_longrope(tmp_path):
    """llama.cpp writes Phi-4-mini as ``phi3``: partial rotary as ``rope.dimension_count`` (48 of head_dim 64) and
    LongRoPE as ``rope_factors_long`` / ``rope_factors_short`` tensors. transformers 5.25's GGUF loader drops
    both (it imported a full-rotary, unscaled model, and every check after it, the graph proof included, then
    compared against that other model); the import puts them back from the GGUF (models.gguf_rope_fixes)."""
    from edgetune import artifacts
    from edgetune.model_input import materialize
    from tiny_gguf import write_tiny_phi4_mini_gguf
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path)
    src = write_tiny_phi4_mini_gguf(tmp_path / "phi4-mini.gguf", tmp_path)
    rec, cfg = _export_gguf(src, tmp_path)
    factors = {t.name: np.asarray(t.data, np.float64).tolist() for t in gguf.GGUFReader(str(src)).tensors
               if t.name.startswith("rope_factors_")}
    rope = cfg["rope_parameters"]
    assert cfg["partial_rotary_factor"] == rope["partial_rotary_factor"] == 0.75 and cfg["tie_word_embeddings"] is True
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 256
    assert rope["long_factor"] == factors["rope_factors_long.weight"] and rope["short_factor"] == factors["rope_factors_short.weight"]
    assert len(rope["long_factor"]) == 48 // 2
    fixes = artifacts.read_record(materialize(src).path)["results"]["config_fixes"]
    assert len(fixes) == 2 and fixes[0].startswith("partial_rotary_factor -> 0.75"), fixes
    g = rec["gguf"]
    assert g["architecture"] == "phi3" and g["embedding"]["shared_with_lm_head"]
    by_node = {n["node"]: n for n in g["nodes"]}
    assert by_node["/model/layers.0/attn/qkv_proj/MatMul"]["gguf"] == ["blk.0.attn_qkv.weight"]


@pytest.mark.parametrize("rope", ["llama3", "none"])
def test_llama3_gguf_keeps_its_rope_scaling(rope, tmp_path):
    """Llama 3.1 / 3.2 / 3.3 scale their rotary frequencies (``rope_type: llama3``); llama.cpp's converter writes that
    only as the ``rope_freqs`` tensor (per-frequency divisors), which transformers 5.25's GGUF loader drops: the
    import rotated the low frequencies unscaled (this tiny model: max |dlogit| 2.9 from the first tokens, 6.5 past
    the original context), and every check after it compared against that other model. The import recovers the
    llama3 parameters from the tensor (models.recover_llama3_rope): the imported model is the source model, over
    a context 4x its original one, and so is the exact transcode's graph. ``none``: a llama GGUF without rope
    scaling (SmolLM2) imports unchanged."""
    import torch

    from edgetune import artifacts
    from edgetune.device import llm as dev
    from edgetune.model_input import llama3_rope_freqs, load_causal_lm, materialize
    from tiny_gguf import LLAMA3_ROPE, llama_cpp_rope_freqs, write_tiny_llama3_gguf

    src = write_tiny_llama3_gguf(tmp_path / "llama3.gguf", tmp_path / "source", rope=LLAMA3_ROPE if rope == "llama3" else None)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(src)).tensors}
    assert ("rope_freqs.weight" in tensors) == (rope == "llama3")
    rec, cfg = _export_gguf(src, tmp_path)
    assert rec["gguf"]["architecture"] == "llama" and rec["gguf"]["tensors_not_in_graph"] == []
    n = 4 * LLAMA3_ROPE["original_max_position_embeddings"]
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], n)
    with torch.no_grad():
        want = load_causal_lm(tmp_path / "source")(torch.tensor(ids)[None]).logits[0].numpy()
        imported = load_causal_lm(materialize(src).path)(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(imported - want).max() <= 1e-4, np.abs(imported - want).max()
    # the transcoded graph (every node at accuracy_level 0, as _export_gguf built it) computes the source model too
    got = dev.logits(dev.load(tmp_path / "exact" / "q"), ids)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    fixes = artifacts.read_record(materialize(src).path)["results"]["config_fixes"]
    params = cfg["rope_parameters"]
    if rope == "llama3":
        assert {k: params[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE and params["rope_theta"] == 10000.0
        assert len(fixes) == 1 and fixes[0].startswith("rope_parameters -> llama3 (factor 32,") and "exactly" in fixes[0], fixes
        # the recovered parameters give back the GGUF's tensor, element for element (llama.cpp's formula, twice)
        assert np.array_equal(llama3_rope_freqs(params, 10000.0, 64), tensors["rope_freqs.weight"])
        assert np.array_equal(llama_cpp_rope_freqs(params, 10000.0, 64), tensors["rope_freqs.weight"])
    else:
        assert params["rope_type"] == "default" and fixes == []


def test_llama3_rope_recovered_for_the_real_llama_shapes():
    """Llama 3.2 1B (head_dim 64) / 3B, 3.1 8B (head_dim 128), rope_theta 500000, factor 32 / 8: the rope_freqs
    llama.cpp writes give back parameters that regenerate it element for element. Parameters that differ but
    compute the same divisors (low/high_freq_factor and the original context scaled together) come back as
    Meta's; a scaling with too few smoothed frequencies to tell is refused with the reason."""
    from edgetune.model_input import recover_llama3_rope
    from tiny_gguf import llama_cpp_rope_freqs

    meta = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for factor, dim in ((32.0, 64), (32.0, 128), (8.0, 128)):
        r = llama_cpp_rope_freqs({"factor": factor, **meta}, 500000.0, dim)
        params, how = recover_llama3_rope(r, 500000.0, dim)
        assert params == {"factor": factor, **meta} and "Meta" in how, (params, how)
    scaled = {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 16384}
    assert recover_llama3_rope(llama_cpp_rope_freqs(scaled, 500000.0, 128), 500000.0, 128)[0] == {"factor": 16.0, **meta}
    other = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.5, "original_max_position_embeddings": 4096}
    r = llama_cpp_rope_freqs(other, 100000.0, 128)
    params, how = recover_llama3_rope(r, 100000.0, 128)
    assert params == other and how == "fitted to its 6 smoothed frequencies", (params, how)
    few = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.2, "original_max_position_embeddings": 64}
    params, how = recover_llama3_rope(llama_cpp_rope_freqs(few, 10000.0, 64), 10000.0, 64)
    assert params is None and "1 smoothed frequency" in how, how


def test_llama_gguf_whose_rope_freqs_cannot_be_recovered_exits_2(tmp_path):
    from edgetune.errors import BadInput
    from edgetune.model_input import materialize
    from tiny_gguf import write_tiny_llama3_gguf

    few = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.2, "original_max_position_embeddings": 64}
    src = write_tiny_llama3_gguf(tmp_path / "few.gguf", tmp_path / "source", rope=few)
    with pytest.raises(BadInput, match=r"cannot recover the rope scaling from its rope_freqs tensor \(rope_freqs has 1 smoothed frequency") as err:
        materialize(src, cache_dir=tmp_path / "cache")
    assert err.value.exit_code == 2
    assert not [p for p in (tmp_path / "cache" / "gguf").glob("*") if (p / "config.json").exists()]
