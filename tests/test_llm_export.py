"""Decoder export through onnxruntime-genai's builder, on the tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.cli import main
from edgetune.errors import BadInput
from edgetune.export import export
from edgetune.export.decoder.builder import matmulnbits_attributes


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.fixture(scope="module")
def fp32_export(tiny_llama, module_tmp):
    return export(tiny_llama, module_tmp("x") / "fp32", target="cpu-x86", precision="fp32")


def test_fp32_logits_match_pytorch(tiny_llama, fp32_export):
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    ids = [5, 17, 42, 99, 7, 3]
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].numpy()
    model = og.Model(str(fp32_export))
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens(np.array([ids], dtype=np.int32))
    got = np.asarray(gen.get_logits()).reshape(-1, want.shape[-1])[-1]
    assert np.abs(got - want).max() < 1e-3
    rec = json.loads((fp32_export / "edgetune.json").read_text())["results"]
    assert rec["kind"] == "decoder" and rec["precision"] == "fp32" and rec["matmulnbits"] == []
    assert rec["tokenizer_check"]["mismatches"] == 0


def test_genai_config_from_profile(fp32_export):
    cfg = json.loads((fp32_export / "genai_config.json").read_text())
    assert cfg["search"]["max_length"] <= 512 and cfg["search"]["do_sample"] is False
    assert cfg["model"]["context_length"] <= 2048


@pytest.mark.parametrize("block_size,accuracy_level", [(32, 0), (64, 4)])
def test_int4_options_reach_graph(tiny_llama, tmp_path, block_size, accuracy_level):
    import onnxruntime_genai as og

    out = export(tiny_llama, tmp_path / "int4", target="cpu-x86", precision="int4",
                 int4={"block_size": block_size, "accuracy_level": accuracy_level})
    attrs = matmulnbits_attributes(out, skip_prefix="/lm_head/")  # the head follows int4.lm_head (see below)
    assert attrs and all(a["bits"] == 4 and a["block_size"] == block_size and a.get("accuracy_level", 0) == accuracy_level for a in attrs)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[5, 6, 7]], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 12


def test_phi3_int4_exports(tiny_phi3, tmp_path):
    out = export(tiny_phi3, tmp_path / "phi3", target="cpu-x86", precision="int4")
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["matmulnbits"] and rec["int4"]["algorithm"] == "rtn"


def test_sliding_window_without_layer_types_reaches_the_graph(tiny_phi3, tmp_path):
    """Phi-3/Mistral configs have sliding_window but no layer_types; builder 0.18 then drops the window."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    src = tmp_path / "phi3-sw"
    src.mkdir()
    for f in tiny_phi3.iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    cfg = json.loads((tiny_phi3 / "config.json").read_text())
    cfg["sliding_window"] = 8
    (src / "config.json").write_text(json.dumps(cfg))
    out = export(src, tmp_path / "out", target="cpu-x86", precision="fp32")
    window = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["sliding_window"]
    assert window["window_size"] == 8 and window["layers"] == list(range(cfg["num_hidden_layers"]))
    torch.manual_seed(1)
    ids = torch.randint(3, 400, (1, 12))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(src)).eval().generate(
            ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=42, do_sample=False, top_k=1)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    got = []
    while len(got) < 30:
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == ref  # 30 greedy tokens, well past the 8-token window


@pytest.mark.parametrize("algorithm,why", [("inc-awq", "jit trace"), ("inc-autoround", "auto-round package")])
def test_unavailable_algorithm_is_bad_input(tiny_llama, tmp_path, algorithm, why):
    with pytest.raises(BadInput, match=why):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", precision="int4", int4={"algorithm": algorithm})
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ tied embeddings, int4 algorithms

IDS = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def ref_logits(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings  # the fixture exercises the tied-embedding paths
    with torch.no_grad():
        return ref(torch.tensor([IDS])).logits[0, -1].numpy()


@pytest.fixture(scope="module")
def calib_file(module_tmp):
    p = module_tmp("calib") / "calib.jsonl"
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
             "Turn on the kitchen lights.", "def f(x):\n    return x**2"]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


def genai_logits(folder, vocab):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens(np.array([IDS], dtype=np.int32))
    return np.asarray(gen.get_logits()).reshape(-1, vocab)[-1]


def check_close(folder, ref, tol):
    got = genai_logits(folder, ref.shape[-1])
    assert np.abs(got - ref).max() < tol and got.argmax() == ref.argmax()


@pytest.mark.parametrize("precision,int4,tol", [("int8", None, 0.02), ("int4", {"symmetric": False}, 0.3)])
def test_tied_int8_and_asymmetric_int4_load(tiny_llama, ref_logits, tmp_path, precision, int4, tol):
    """Builder 0.15.2 breaks these on tied embeddings unless the embedding is untied (shared_embeddings=false)."""
    out = export(tiny_llama, tmp_path / precision, target="cpu-x86", precision=precision, int4=int4)
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    bits = 8 if precision == "int8" else 4
    body = matmulnbits_attributes(out, skip_prefix="/lm_head/")
    assert body and all(a["bits"] == bits for a in body)
    assert all(a["zero_points"] == (precision == "int4") for a in body)
    # untied: int8 keeps a float table (onnxruntime only makes 4-bit GatherBlockQuantized), int4 quantizes it
    assert rec["embeddings"] == ("float Gather, own table" if precision == "int8" else "int4 GatherBlockQuantized, own table")
    assert rec["tokenizer_check"]["mismatches"] == 0
    check_close(out, ref_logits, tol)


def test_k_quant_symmetric_carries_zero_points(tiny_llama, ref_logits, tmp_path):
    """k_quant always stores zero points; the graph check must not mistake that for an ignored option."""
    out = export(tiny_llama, tmp_path / "kq", target="cpu-x86", precision="int4", int4={"algorithm": "k_quant"})
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["int4"]["symmetric"] and all(a["zero_points"] for a in matmulnbits_attributes(out, skip_prefix="/lm_head/"))
    check_close(out, ref_logits, 0.3)


def test_symmetric_int4_keeps_shared_quantized_embedding(tiny_llama, tmp_path):
    out = export(tiny_llama, tmp_path / "s", target="cpu-x86", precision="int4", int4={"lm_head": "int4"})
    assert json.loads((out / "edgetune.json").read_text())["results"]["embeddings"].startswith("int4 GatherBlockQuantized")


@pytest.mark.parametrize("algorithm", ["hqq", "gptq"])
def test_onnxruntime_quantizer_algorithms(tiny_llama, ref_logits, calib_file, tmp_path, algorithm):
    int4 = {"algorithm": algorithm, "symmetric": algorithm != "hqq"}
    kw = {"calibration": calib_file} if algorithm == "gptq" else {}
    out = export(tiny_llama, tmp_path / algorithm, target="cpu-x86", precision="int4", int4=int4, **kw)
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    q = rec["quantization"]
    assert q["quantizer"] == "onnxruntime MatMulNBitsQuantizer"
    assert q["config"] == {"hqq": "HQQWeightOnlyQuantConfig", "gptq": "GPTQWeightOnlyQuantConfig"}[algorithm]
    assert rec["embeddings"] == "int4 GatherBlockQuantized, own table"
    # 10 MatMuls: 2 layers x (qkv, o, gate, up, down), + lm_head as int4.lm_head says; HQQ's float zero
    # points are folded into the exact block-sum correction, so no node keeps zero points (the slow path)
    body = matmulnbits_attributes(out, skip_prefix="/lm_head/")
    assert sum(a["count"] for a in body) == 10 and rec["lm_head"]["kind"] == rec["int4"]["lm_head"]
    assert all(a["bits"] == 4 and a["block_size"] == 32 and not a["zero_points"] for a in body)
    assert ("float_zero_points" in q) == (algorithm == "hqq")
    if algorithm == "gptq":
        assert q["calibration"]["samples"] == 4 and q["calibration"]["tokens"] > 20
    assert rec["tokenizer_check"]["mismatches"] == 0
    check_close(out, ref_logits, 0.3)


@pytest.mark.parametrize("algorithm", ["inc-rtn", "inc-gptq"])
def test_neural_compressor_algorithms(tiny_llama, ref_logits, calib_file, tmp_path, algorithm):
    kw = {"calibration": calib_file} if algorithm == "inc-gptq" else {}
    out = export(tiny_llama, tmp_path / algorithm, target="cpu-x86", precision="int4", int4={"algorithm": algorithm}, **kw)
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    q = rec["quantization"]
    assert q["quantizer"] == "neural-compressor" and q["layers"] == 14
    # every graph weight outside lm_head dequantizes to exactly neural-compressor's weight
    assert q["weight_parity"]["compared"] == 10 and q["weight_parity"]["max_abs_diff"] < 1e-6 and not q["weight_parity"]["unmatched"]
    assert all(a["bits"] == 4 and a["block_size"] == 32 for a in matmulnbits_attributes(out, skip_prefix="/lm_head/"))
    assert rec["lm_head"]["kind"] == rec["int4"]["lm_head"]
    assert rec["tokenizer_check"]["mismatches"] == 0
    check_close(out, ref_logits, 0.3)


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "int4", "calibration": "CALIB"}, "only used by the int4 algorithms awq"),
    ({"precision": "int4", "int4": {"algorithm": "hqq", "symmetric": True}}, "asymmetric by construction"),
    ({"precision": "int8", "int4": {"algorithm": "gptq"}}, "int8 is made by the builder"),
    ({"precision": "int4", "int4": {"algorithm": "gptq"}, "calibration": "MISSING"}, "not found"),
])
def test_bad_quantization_options_are_bad_input(tiny_llama, calib_file, tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    if kwargs.get("calibration") == "CALIB":
        kwargs["calibration"] = calib_file
    elif kwargs.get("calibration") == "MISSING":
        kwargs["calibration"] = tmp_path / "nope.jsonl"
    with pytest.raises(BadInput, match=match):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_gptq_with_calibration(tiny_llama, calib_file, tmp_path, capsys):
    code, out, _ = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "g"), "--precision", "int4",
                            "--int4-algorithm", "gptq", "--calibration", str(calib_file), "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["quantization"]["calibration"]["samples"] == 4 and res["int4"]["algorithm"] == "gptq"


def test_cli_refused_algorithm_one_line(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "a"),
                            "--precision", "int4", "--int4-algorithm", "inc-awq"], capsys)
    assert code == 2 and "inc-awq" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_cli_export_json(tiny_llama, tmp_path, capsys):
    code, out, _ = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "e"),
                            "--precision", "int4", "--int4-block-size", "128", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["matmulnbits"][0]["block_size"] == 128


def test_cli_adapter_path_refused(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "e"),
                            "--adapter", str(tmp_path)], capsys)
    assert code == 2 and "merge" in err


# ------------------------------------------------------------------ lm_head precision, embedding block


def generates(folder, n=12):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[5, 6, 7]], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return len(gen.get_sequence(0)) == n


@pytest.mark.parametrize("lm_head,op,bits", [("int4", "MatMulNBits", 4), ("int8", "MatMulNBits", 8), ("fp32", "MatMul", 32)])
def test_int4_lm_head_reaches_graph(tiny_llama, ref_logits, tmp_path, lm_head, op, bits):
    from edgetune.export.decoder.builder import lm_head_attributes

    out = export(tiny_llama, tmp_path / lm_head, target="cpu-x86", precision="int4", int4={"lm_head": lm_head})
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    head = lm_head_attributes(out)  # read back from the graph
    assert head["op"] == op and head["bits"] == bits and rec["lm_head"] == head and rec["int4"]["lm_head"] == lm_head
    # the blocks stay int4; the tied embedding reads the head's table (int4 or int8); an fp32 head unties it (int4)
    assert all(a["bits"] == 4 for a in matmulnbits_attributes(out, skip_prefix="/lm_head/"))
    assert rec["embeddings"] == {"int4": "int4 GatherBlockQuantized, shared with lm_head",
                                 "int8": "int8 GatherBlockQuantized, shared with lm_head",
                                 "fp32": "int4 GatherBlockQuantized, own table"}[lm_head]
    assert rec["tokenizer_check"]["mismatches"] == 0
    check_close(out, ref_logits, 0.3)
    assert generates(out)


def test_lm_head_bad_value(tiny_llama, tmp_path):
    with pytest.raises(BadInput, match="int4, int8, fp32"):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", precision="int4", int4={"lm_head": "int2"})
    prof = tmp_path / "p.toml"
    prof.write_text('name = "p"\nextends = "cpu-x86"\n[quantization.int4]\nlm_head = "int2"\n')
    from edgetune.targets import load_target
    with pytest.raises(BadInput, match="int4.*int8.*fp32"):
        load_target(str(prof))


def test_cli_int4_lm_head(tiny_llama, tmp_path, capsys):
    code, out, _ = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "h"), "--precision", "int4",
                            "--int4-lm-head", "int8", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["lm_head"]["bits"] == 8


def test_block_not_dividing_hidden_unties_embedding(tmp_path):
    """Tied int4 GatherBlockQuantized needs block | hidden (SmolLM2: 576 % 128 failed in /model/embed_tokens/Reshape)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tiny_models import _decoder_common, build_bpe_tokenizer

    src = tmp_path / "h96"
    src.mkdir()
    tok = build_bpe_tokenizer(src)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**_decoder_common(tok), "hidden_size": 96, "intermediate_size": 192,
                                      "num_attention_heads": 3, "num_key_value_heads": 1},
                                   tie_word_embeddings=True, rope_theta=10000.0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(src, safe_serialization=True)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0, -1].numpy()
    out = export(src, tmp_path / "int4", target="cpu-x86", precision="int4", int4={"block_size": 64, "lm_head": "int4"})
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["embeddings"] == "int4 GatherBlockQuantized, own table"  # untied: 96 % 64 != 0
    assert rec["quantization"]["embedding"].endswith("block 32")  # largest block dividing 96
    assert all(a["block_size"] == 64 for a in rec["matmulnbits"]) and rec["lm_head"]["bits"] == 4
    check_close(out, ref, 0.3)
    assert generates(out)
    # an int8 head keeps the tie: its table in the widest block dividing 96 (32) is also the embedding's
    out = export(src, tmp_path / "int8-head", target="cpu-x86", precision="int4", int4={"block_size": 64, "lm_head": "int8"})
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["embeddings"] == "int8 GatherBlockQuantized, shared with lm_head"
    assert rec["lm_head"]["block_size"] == 32 and {a["block_size"] for a in rec["matmulnbits"] if a["bits"] == 4} == {64}
    check_close(out, ref, 0.3)


@pytest.mark.parametrize("method, symmetric, bits", [("default", True, 4), ("default", False, 4), ("rtn", True, 4),
                                                     ("rtn", False, 4), ("k_quant", True, 4), ("default", True, 8),
                                                     ("rtn", False, 8)])
def test_sliced_quantization_is_the_one_shot(method, symmetric, bits):
    """A weight above stream_quant.CHUNK_BYTES (Qwen2.5-1.5B's tied head: 0.93 GB in fp32) is quantized in column
    slices; stacked, they must be the one-shot result byte for byte. K = 96 has an odd block count (flat 4-bit zero
    points pack pairs across columns) and N = 50 is no multiple of the slice."""
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mq
    from onnxruntime.quantization.quant_utils import QuantFormat

    from edgetune.export.decoder.stream_quant import quantize_weight

    names = ("/lm_head/MatMul", "hidden", "lm_head.weight", "logits")
    per_node = {names[0]: {"bits": bits}}
    algo = {"default": None, "rtn": mq.RTNWeightOnlyQuantConfig(customized_weight_config=per_node),
            "k_quant": mq.KQuantWeightOnlyQuantConfig(customized_weight_config=per_node)}[method]
    settings = dict(quantizer_cls=mq.MatMulNBitsQuantizer, quant_format=QuantFormat.QOperator, algo=algo, bits=bits,
                    block_size=32, is_symmetric=symmetric, accuracy_level=4)
    # onnxruntime's RTN and k_quant (zero points always) cannot pack an odd block count themselves
    k = 128 if method == "k_quant" or (method == "rtn" and not symmetric) else 96
    w = np.random.default_rng(0).standard_normal((k, 50)).astype(np.float32) * np.linspace(0.1, 3, 50, dtype=np.float32)
    one = quantize_weight(w, names, **settings)
    sliced = quantize_weight(w, names, step=8, **settings)
    assert [n.op_type for n in one.graph.node] == ["MatMulNBits"]
    assert one.graph.node == sliced.graph.node  # inputs, outputs and attributes (N = 50, K, bits, block_size)
    a = {t.name: numpy_helper.to_array(t) for t in one.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in sliced.graph.initializer}
    assert a.keys() == b.keys() and len(a) >= 2
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("family, precision, int4, mixed", [
    ("phi3", "int4", {"algorithm": "rtn", "lm_head": "int8"}, None), ("qwen2", "int4", {"algorithm": "k_quant"}, None),
    ("gemma2", "int8", None, None),
    # mixed precision's 8-bit nodes: streamed too (quantized after the build, the graph was loaded whole in fp32)
    ("llama", "int4", {"algorithm": "rtn", "lm_head": "int8", "symmetric": False, "accuracy_level": 4, "int8_block_size": 64},
     {"modules": ["v_proj", "down_proj"]})])
def test_streamed_quantization_is_the_builders_own(family, precision, int4, mixed, tmp_path, monkeypatch):
    """int4/int8 exports quantize the MatMuls one weight at a time (llm.stream_quant: the builder's own pass holds the
    whole model in fp32, 23 GiB for a 3.8B model), the largest in column slices: the graph and every tensor must be
    the builder pass's (and the 8-bit pass's after it), byte for byte."""
    import onnx

    from edgetune.export.decoder import stream_quant
    from test_families import build_family

    src = build_family(family, tmp_path / "src")
    done = []
    real = stream_quant.prequantize
    monkeypatch.setattr(stream_quant, "prequantize", lambda *a: done.append(real(*a)) or done[-1])
    # the MLP weights (128 KB in fp32) and the head are quantized in column slices, q/k/v/o (64 KB) in one piece
    monkeypatch.setattr(stream_quant, "CHUNK_BYTES", 100 << 10)
    sliced = []
    real_slices = stream_quant.slice_columns
    monkeypatch.setattr(stream_quant, "slice_columns", lambda *a: sliced.append(real_slices(*a)) or sliced[-1])
    excluded = []
    real_quantize = stream_quant.quantize_weight
    monkeypatch.setattr(stream_quant, "quantize_weight",
                        lambda w, names, **kw: (excluded.append(names[0]) if names[0] in stream_quant.EXCLUDED else None)
                        or real_quantize(w, names, **kw))
    streamed = export(src, tmp_path / "streamed", target="cpu-x86", precision=precision, int4=int4, mixed=mixed)
    monkeypatch.setattr(stream_quant, "ENABLED", False)
    builders = export(src, tmp_path / "builder", target="cpu-x86", precision=precision, int4=int4, mixed=mixed)
    eight = json.loads((streamed / "edgetune.json").read_text())["results"]["quantization"].get("mixed") or {}
    assert sorted(excluded) == sorted(eight.get("layers", [])) and len(excluded) == (8 if mixed else 0), excluded
    if mixed:  # none left for the pass after the build when streamed; all of them when not
        after = json.loads((builders / "edgetune.json").read_text())["results"]["quantization"]["mixed"]
        assert eight["quantized_after_build"] == 0 and after["quantized_after_build"] == 8, (eight, after)
    assert done and done[0] >= 4 * 4, done  # every layer's projections at least
    assert 0 in sliced and any(sliced), sliced  # some weights sliced, some not
    if not mixed:
        a, b = (onnx.load(str(d / "model.onnx"), load_external_data=False) for d in (streamed, builders))
        assert a.graph == b.graph  # nodes, attributes, initializer names and external-data offsets
        assert (streamed / "model.onnx.data").read_bytes() == (builders / "model.onnx.data").read_bytes()
        return
    # the 8-bit pass after the build wrote its nodes' tensors elsewhere in the file and shape annotations the
    # builder does not: the same nodes in the same order, and every tensor the same bytes under the same name
    from onnx import numpy_helper

    a, b = (onnx.load(str(d / "model.onnx")) for d in (streamed, builders))
    assert list(a.graph.node) == list(b.graph.node)
    ta, tb = ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (a, b))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].tobytes() == tb[name].tobytes(), name
