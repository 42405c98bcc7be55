"""Side-branch fusion (edgetune/export/decoder/fuse.py): block-sum corrections and float LoRA branches, one MatMul per input group."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")

from test_gguf_transcode import FOUR_BIT  # noqa: E402

IDS = np.array([5, 17, 42, 99, 3, 250, 7, 64, 11, 200], dtype=np.int64)


@pytest.fixture(scope="module")
def q4_gguf(module_tmp):
    """A tiny Llama GGUF whose every tensor is 4-bit (accuracy_level 0 throughout: the graph is exact fp32)."""
    pytest.importorskip("torch")
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    d = module_tmp("fuse-gguf")
    build_bpe_tokenizer(d)
    return write_tiny_llama_gguf(d / "q4.gguf", d, override=FOUR_BIT)


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def _runtime_ops(folder):
    """Op counts of the graph onnxruntime runs (after its constant folding at load)."""
    import collections

    import onnx

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(folder / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    g = onnx.load(str(folder / "opt.onnx"), load_external_data=False).graph
    (folder / "opt.onnx").unlink()
    return collections.Counter(n.op_type for n in g.node)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_fused_gguf_base_equals_unfused(q4_gguf, tmp_path):
    from edgetune.device import llm as dev
    from edgetune.export import export

    plain = export(q4_gguf, tmp_path / "plain", target="cpu-x86", precision="gguf", fuse=False)
    fused = export(q4_gguf, tmp_path / "fused", target="cpu-x86", precision="gguf")
    rec = json.loads((fused / "edgetune.json").read_text())["results"]["gguf"]
    fz = rec["fusion"]
    assert fz["fused"] and fz["runtime_nodes_after"] < fz["runtime_nodes_before"]
    assert not json.loads((plain / "edgetune.json").read_text())["results"]["gguf"]["fusion"]["fused"]
    # the block sums are one MatMul per input now, not Reshape -> ReduceSum; the MatMulNBits are the same nodes but
    # gate and up (Q4_1 beside Q4_K: fp16 scales beside fp32 ones), packed into one per layer (qkv is one already)
    gp, gf = _graph(plain), _graph(fused)
    assert sum(n.op_type == "ReduceSum" for n in gf.node) < sum(n.op_type == "ReduceSum" for n in gp.node)
    assert fz["packed"] == {"groups": 2, "nodes": [f"/model/layers.{i}/mlp/gate_up_proj/MatMulNBits" for i in (0, 1)]}
    unpacked = {n.name for n in gp.node if n.op_type == "MatMulNBits"} - {f"/model/layers.{i}/mlp/{p}_proj/MatMulNBits" for i in (0, 1)
                                                                           for p in ("gate", "up")}
    assert {n.name for n in gf.node if n.op_type == "MatMulNBits"} == unpacked | set(fz["packed"]["nodes"])
    assert {o.name for o in gf.output} == {o.name for o in gp.output}
    got, want = dev.logits(dev.load(fused), IDS), dev.logits(dev.load(plain), IDS)
    assert _rel(got, want) <= 1e-5, _rel(got, want)
    assert rec["logit_check"]["top1_agreement"] == 1.0


def test_fused_float_adapter_over_gguf_equals_unfused(q4_gguf, tmp_path):
    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.model_input import materialize
    from test_adapters import make_lora

    base = materialize(q4_gguf).path
    lora = make_lora(base, tmp_path / "chat", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     seed=4)
    plain = export(base, tmp_path / "plain", target="cpu-x86", precision="gguf", float_adapter=lora, fuse=False)
    fused = export(base, tmp_path / "fused", target="cpu-x86", precision="gguf", float_adapter=lora)
    res = json.loads((fused / "edgetune.json").read_text())["results"]
    fz = res["fusion"]
    # 2 layers: 4 input groups each (qkv, o, gate/up, down), 7 linears each with a correction and a LoRA term
    # per layer: q/k (Q4_K/Q4_1: correction + LoRA) and v (Q4_0: LoRA only) share one input; o (Q4_0, LoRA only:
    # nothing to gain alone) is left as it is; gate/up and down: correction + LoRA; + the Q4_1 head's correction
    groups = {g["input"]: [lin.split(" ")[0].split("/")[-2] for lin in g["linears"]] for g in fz["groups_detail"]}
    assert fz["fused"] and fz["groups"] == 7 and fz["linears"] == 13, groups
    assert groups["/model/layers.1/input_layernorm/output_0"] == ["q_proj", "k_proj", "v_proj"]
    assert groups["/model/layers.1/post_attention_layernorm/output_0"] == ["gate_proj", "up_proj"]
    assert not any("o_proj" in lin for g in fz["groups_detail"] for lin in g["linears"])
    assert res["float_adapter"]["branch_ops"]["MatMul"] == 28  # the 2 float MatMuls per module, checked before fusion
    assert res["float_adapter_check"]["vs"]["peft_unmerged"]["max_abs_diff"] < 1e-3  # checked after fusion
    ops_p, ops_f = _runtime_ops(plain), _runtime_ops(fused)
    # removed: 11 corrections (MatMul + Add) and 12 LoRA branches (2 MatMul + Add); added: per LoRA group (6) one
    # MatMul(x, A_cat) and one Concat(x @ A_cat, block sums), for the head's correction-only group one MatMul(x, S)
    # instead of Reshape -> ReduceSum, and per linear (13) one MatMul + Add; then per layer q/k/v and gate/up packed
    # (pack.pack_siblings): one MatMulNBits, side MatMul and Add per group instead of one per linear, and a Split
    packed = fz["packed"]
    assert packed["nodes"] == [f"/model/layers.{i}/{p}/MatMulNBits" for i in (0, 1) for p in ("attn/qkv_proj", "mlp/gate_up_proj")]
    fewer = 2 * ((3 - 1) + (2 - 1))  # per layer: qkv 3 -> 1, gate/up 2 -> 1
    assert ops_p["MatMul"] - ops_f["MatMul"] == (11 + 2 * 12) - (6 + 1 + 13) + fewer and ops_p["Add"] - ops_f["Add"] == (11 + 12) - 13 + fewer
    assert ops_p["ReduceSum"] - ops_f["ReduceSum"] == 1 and ops_f["Concat"] == 6  # constant W1/W2 Concats folded at load
    assert ops_p["MatMulNBits"] - ops_f["MatMulNBits"] == fewer and ops_f["Split"] - ops_p.get("Split", 0) == 4
    got, want = dev.logits(dev.load(fused), IDS), dev.logits(dev.load(plain), IDS)
    assert _rel(got, want) <= 1e-5, _rel(got, want)
    assert dev.generate_ids(dev.load(fused), IDS, 6, ignore_eos=True) == dev.generate_ids(dev.load(plain), IDS, 6, ignore_eos=True)


def test_a_branch_read_elsewhere_is_left_alone():
    """A side term whose tensor has another consumer (here: a graph output) is not fused."""
    from onnx import TensorProto, helper

    from edgetune.export.decoder.blockform import BlockForm, matmul_graph
    from edgetune.export.decoder.fuse import fuse_side_branches

    rng = np.random.default_rng(0)
    n, k = 16, 64
    form = BlockForm(rng.integers(0, 16, (n, k), dtype=np.uint8), rng.uniform(0.01, 0.1, (n, 2)).astype(np.float32),
                     rng.standard_normal((n, 2)).astype(np.float32), 4, 32)
    model, _ = matmul_graph(form)
    fused = model.__class__()
    fused.CopyFrom(model)
    info = fuse_side_branches(fused)
    assert info["fused"] and info["runtime_nodes_after"] == info["runtime_nodes_before"] - 1
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["Y"], {"X": x})[0]  # noqa: E731
    assert _rel(run(fused), run(model)) <= 1e-6
    corr = next(nd for nd in model.graph.node if nd.name.endswith("BlockSumCorrection/MatMul"))
    model.graph.output.append(helper.make_tensor_value_info(corr.output[0], TensorProto.FLOAT, None))
    before = [nd.name for nd in model.graph.node]
    assert not fuse_side_branches(model)["fused"] and [nd.name for nd in model.graph.node] == before


def test_side_int8_stores_the_fused_side_weights_at_8_bits_close_to_the_float_ones(q4_gguf, tmp_path, capsys):
    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.model_input import materialize
    from test_adapters import make_lora, run_cli

    base = materialize(q4_gguf).path
    lora = make_lora(base, tmp_path / "chat", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     seed=4)
    fp = export(base, tmp_path / "fp", target="cpu-x86", precision="gguf", float_adapter=lora)
    q8 = export(base, tmp_path / "q8", target="cpu-x86", precision="gguf", float_adapter=lora, fuse="int8")
    side = json.loads((q8 / "edgetune.json").read_text())["results"]["fusion"]["side_int8"]
    ops_fp, ops_q8 = _runtime_ops(fp), _runtime_ops(q8)
    # every float side MatMul (6 x @ A_cat, the head's x @ S, 13 z @ W2 less the 6 that packing made one with its
    # siblings (q/k/v and gate/up of both layers), and o_proj's unfused LoRA A and B in both layers) is an 8-bit
    # MatMulNBits now: none is left
    assert side["matmuls"] == 18 and ops_fp["MatMul"] == 18 and ops_q8["MatMul"] == 0, (side, ops_fp, ops_q8)
    assert ops_q8["MatMulNBits"] == ops_fp["MatMulNBits"] + 18 and ops_q8["Add"] == ops_fp["Add"]
    assert side["int8_mb"] < 0.5 * side["fp32_mb"] and side["max_weight_error_rel"] < 1 / 127
    nodes = [n for n in _graph(q8).node if n.name.endswith("/Q8")]
    assert len(nodes) == 18 and all({a.name: a.i for a in n.attribute if a.name in ("bits", "accuracy_level")} == {"bits": 8, "accuracy_level": 4}
                                    for n in nodes)
    # close to the float side branches, not equal (8-bit weights, int8 activations in those nodes): 0.023 here; 0.11
    # before each rank-4 LoRA's columns of z were padded to a block of their own (the block sums set the int8 step)
    got, want = dev.logits(dev.load(q8), IDS), dev.logits(dev.load(fp), IDS)
    assert 0 < _rel(got, want) <= 5e-2, _rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # what it needs is checked before any work: the fusion, and a GGUF transcode to fuse
    code, _, err = run_cli(["export", str(base), "-t", "cpu-x86", "-o", str(tmp_path / "x"), "--precision", "gguf", "--side-int8",
                            "--no-fuse"], capsys)
    assert code == 2 and "--side-int8 stores the fused side weights: it needs the fusion --no-fuse turns off" in err
    code, _, err = run_cli(["export", str(base), "-t", "cpu-x86", "-o", str(tmp_path / "y"), "--precision", "int4", "--side-int8"], capsys)
    assert code == 2 and "precision int4 has none" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_packing_the_fused_siblings_changes_no_output(q4_gguf, tmp_path):
    """q/k/v and gate/up packed after the fusion (one MatMulNBits, side MatMul and Add per group, then a Split) compute
    what the fused siblings computed: each column from its own rows and scales, the side terms the same dot products."""
    import shutil

    from edgetune import onnx_graph
    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.export.decoder.fuse import fuse_side_branches
    from edgetune.model_input import materialize
    from test_adapters import make_lora

    base = materialize(q4_gguf).path
    lora = make_lora(base, tmp_path / "chat", targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], seed=5)
    plain = export(base, tmp_path / "plain", target="cpu-x86", precision="gguf", float_adapter=lora, fuse=False)
    packed = export(base, tmp_path / "packed", target="cpu-x86", precision="gguf", float_adapter=lora)
    assert json.loads((packed / "edgetune.json").read_text())["results"]["fusion"]["packed"]["groups"] == 4
    fused = tmp_path / "fused"  # the same fusion, nothing packed
    shutil.copytree(plain, fused)
    model = onnx_graph.load(fused / "model.onnx")
    assert fuse_side_branches(model)["fused"]
    (fused / "new").mkdir()
    onnx_graph.save(model, fused / "new" / "model.onnx", external=True, size_threshold=1024)
    for f in ("model.onnx", "model.onnx.data"):
        (fused / "new" / f).replace(fused / f)
    assert sum(n.op_type == "MatMulNBits" for n in _graph(fused).node) - sum(n.op_type == "MatMulNBits" for n in _graph(packed).node) == 6
    got, want = dev.logits(dev.load(packed), IDS), dev.logits(dev.load(fused), IDS)
    assert _rel(got, want) <= 1e-6, _rel(got, want)
    assert dev.generate_ids(dev.load(packed), IDS, 6, ignore_eos=True) == dev.generate_ids(dev.load(fused), IDS, 6, ignore_eos=True)


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q8_0"])
def test_siblings_without_a_side_term_are_packed_too(tmp_path, gguf_type):
    """A GGUF type without a min (Q4_0, Q8_0) has no correction and the graph no fusion; its gate and up (q/k/v is the
    builder's one node already) are still packed into one MatMulNBits + Split, computing the same logits. Q8_0's
    default form is two planes per linear (a 4-bit ``_hi`` and a low-bits ``_lo`` node): the ``_lo`` planes pack, under
    names of their own; the ``_hi`` ones keep their nodes (their scales are the GGUF's times 16, a Mul computed at
    load, which the packing does not restack)."""
    from edgetune.device import llm as dev
    from edgetune.export import export
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    build_bpe_tokenizer(tmp_path / "src")
    types = dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"), gguf_type)
    src = write_tiny_llama_gguf(tmp_path / "src" / "m.gguf", tmp_path / "src", embedding_type=gguf_type, override=types)
    out = export(src, tmp_path / "packed", target="cpu-x86", precision="gguf")
    fz = json.loads((out / "edgetune.json").read_text())["results"]["gguf"]["fusion"]
    planes = ("MatMulNBits",) if gguf_type == "Q4_0" else ("MatMulNBits_lo",)
    assert not fz["fused"] and sorted(fz["packed"]["nodes"]) == sorted(f"/model/layers.{i}/mlp/gate_up_proj/{p}" for i in (0, 1)
                                                                      for p in planes)
    plain = export(src, tmp_path / "plain", target="cpu-x86", precision="gguf", fuse=False)  # --no-fuse: nothing packed
    names = lambda d: sorted(n.name for n in _graph(d).node if n.op_type == "MatMulNBits")  # noqa: E731
    assert len(names(plain)) - len(names(out)) == 2 * len(planes) and f"/model/layers.0/mlp/gate_proj/{planes[0]}" in names(plain)
    assert len(set(names(out))) == len(names(out))
    got, want = dev.logits(dev.load(out), IDS), dev.logits(dev.load(plain), IDS)
    assert _rel(got, want) <= 1e-6, _rel(got, want)
