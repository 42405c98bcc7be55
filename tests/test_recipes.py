"""Kernel paths per MatMulNBits node, layer-wise mixed precision and the automatic recipe, on the tiny Llama."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetune.errors import BadInput, CheckFailed
from edgetune.export import export
from edgetune.export.decoder import kernels
from edgetune.recipes import export_with_recipe
from test_build import run_cli  # the same CLI runner (exit code, stdout, stderr)

FAST_VALIDATE = {"repeats": 1, "warmup": 0, "max_tokens": 8, "prompt_tokens": 16, "eval_tokens": 256}


def results(folder):
    return json.loads((folder / "edgetune.json").read_text())["results"]


@pytest.fixture(scope="module")
def calib_file(module_tmp):
    p = module_tmp("calib") / "calib.jsonl"
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
             "Turn on the kitchen lights.", "def f(x):\n    return x**2", "Once upon a time there was a tiny model."]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


# ------------------------------------------------------------------ kernel paths


@pytest.mark.parametrize("precision,int4,kw", [
    ("int4", {"algorithm": "rtn"}, {}),
    ("int4", {"algorithm": "rtn", "symmetric": False, "accuracy_level": 4}, {}),
    ("int4", {"algorithm": "k_quant", "lm_head": "int8"}, {}),
    ("int4", {"algorithm": "gptq"}, {"calibration": "CALIB"}),
    ("int4", {"algorithm": "inc-rtn"}, {}),
    ("int8", {"algorithm": "rtn"}, {}),
])
def test_every_algorithm_on_prepacked_kernels(tiny_llama, calib_file, tmp_path, precision, int4, kw):
    kw = {k: (calib_file if v == "CALIB" else v) for k, v in kw.items()}
    out = export(tiny_llama, tmp_path / "x", target="cpu-x86", precision=precision, int4=int4, **kw)
    rec = results(out)
    paths = kernels.kernel_paths(out)  # read from the graph again, not trusted from the record
    assert len(paths) == 11 and rec["kernel_paths"]["nodes"] == paths and rec["kernel_paths"]["slow"] == []
    assert all(p["path"] == kernels.PREPACKED and p["zero_points"] in ("none", "uint8") for p in paths)
    # 8-bit MatMulNBits (int8 export, int8 head) run at accuracy_level 4 on the CPU: level 0 dequantizes every call
    assert all(p["accuracy_level"] == 4 for p in paths if p["bits"] == 8)
    assert any(p["bits"] == 8 for p in paths) == (precision == "int8" or int4.get("lm_head") == "int8")


def test_hqq_runs_on_the_prepacked_path(tiny_llama, tmp_path):
    # HQQ's float zero points are folded into the symmetric + block-sum form: no float zero point reaches the graph
    out = export(tiny_llama, tmp_path / "h", target="cpu-x86", precision="int4", int4={"algorithm": "hqq", "symmetric": False})
    paths = kernels.kernel_paths(out)
    assert paths and all(p["zero_points"] in ("none", "uint8") and p["path"] == kernels.PREPACKED for p in paths)
    assert results(out)["kernel_paths"]["slow"] == []


def test_float_zero_points_are_detected_as_slow(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n, block = 32, 8, 32
    inits = [numpy_helper.from_array(np.zeros((n, k // block, block // 2), np.uint8), "B"),
             numpy_helper.from_array(np.ones(n * k // block, np.float32), "S"),
             numpy_helper.from_array(np.full(n * k // block, 7.5, np.float32), "Z")]
    node = helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft", name="mm",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              str(tmp_path / "model.onnx"))
    (p,) = kernels.kernel_paths(tmp_path)
    assert p["zero_points"] == "float32" and p["path"] == kernels.SLOW_FLOAT_ZP
    assert kernels.summary([p])["slow"] == ["mm"]


def test_slow_8bit_level_is_detected(tiny_llama, tmp_path):
    out = export(tiny_llama, tmp_path / "i8", target="cpu-x86", precision="int8")
    dst = tmp_path / "i8-level0"
    shutil.copytree(out, dst)
    assert kernels.set_accuracy_level(dst, 0) == 11
    assert all(p["path"] == kernels.SLOW_8BIT_LEVEL for p in kernels.kernel_paths(dst))


# ------------------------------------------------------------------ mixed precision


def _outlier_llama(src, dst, node_module="model.layers.1.mlp.down_proj"):
    """The tiny Llama with one outlier per int4 block in one MatMul: its int4 error dwarfs the others'."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    w = dict(m.named_modules())[node_module].weight
    with torch.no_grad():
        w[:, ::32] *= 30.0
    m.save_pretrained(str(dst), safe_serialization=True)
    return dst


def test_mixed_precision_measures_and_records(tiny_llama, calib_file, tmp_path):
    src = _outlier_llama(tiny_llama, tmp_path / "outlier")
    # confirm=0: the ranking is the activation-weighted error proxy alone (KL confirmation: below)
    out = export(src, tmp_path / "m", target="cpu-x86", precision="int4", int4={"lm_head": "int8"}, mixed={"count": 2, "confirm": 0},
                 calibration=calib_file)
    m = results(out)["quantization"]["mixed"]
    ranking = m["sensitivity"]["ranking"]
    # 10 body MatMuls (the int8 head is not an int4 candidate); the outlier layer is found
    assert len(ranking) == 10 and all(r["score"] >= 0 for r in ranking) and not any("kl" in r for r in ranking)
    assert ranking[0]["node"] == "/model/layers.1/mlp/down_proj/MatMul"
    assert ranking[0]["score"] > 1.5 * ranking[1]["score"]
    assert m["layers"] == [r["node"] for r in ranking if r["node"] != "/lm_head/MatMul"][:2]
    # the chosen layers (and the int8 head) are 8-bit in the graph, every other MatMul int4
    paths = {p["node"].rsplit("_Q", 1)[0]: p for p in kernels.kernel_paths(out)}
    eight = {n for n, p in paths.items() if p["bits"] == 8}
    assert eight == set(m["layers"]) | {"/lm_head/MatMul"}
    assert all(p["bits"] == 4 and p["accuracy_level"] == 0 for n, p in paths.items() if n not in eight)
    assert all(p["accuracy_level"] == 4 and p["path"] == kernels.PREPACKED for n, p in paths.items() if n in eight)
    why = {w["node"]: w["why"] for w in m["widths"]}
    assert why["/model/layers.1/mlp/down_proj/MatMul"].startswith("8-bit: sensitivity rank 1")
    # keeping the outlier layer at 8 bits brings the logits closer to PyTorch than plain int4
    ref, mixed_logits, plain = _last_logits(src), _genai_logits(out), _genai_logits(
        export(src, tmp_path / "p", target="cpu-x86", precision="int4", int4={"lm_head": "int8"}))
    assert np.abs(mixed_logits - ref).mean() < np.abs(plain - ref).mean()


def test_sensitivity_kl_confirms_top(tiny_llama, calib_file, tmp_path):
    from edgetune.export.decoder.mixed import sensitivity
    from edgetune.export.decoder.quantize import encode_calibration, load_calibration

    int4 = export(tiny_llama, tmp_path / "q", target="cpu-x86", precision="int4")
    ids = encode_calibration(tiny_llama, load_calibration(calib_file).texts)
    s = sensitivity(tiny_llama, int4, ids, confirm=3, confirm_samples=2)
    r = s["ranking"]
    assert len(r) == 11 and [x["rank"] for x in r] == list(range(1, 12)) and s["confirm_samples"] == 2
    assert all(x["kl"] > 0 for x in r[:3]) and not any("kl" in x for x in r[3:])
    assert r[0]["kl"] >= r[1]["kl"] >= r[2]["kl"]
    proxy_top3 = sorted(r, key=lambda x: -x["score"])[:3]
    assert {x["node"] for x in proxy_top3} == {x["node"] for x in r[:3]}  # KL reorders the proxy's top few only


def test_mixed_given_layers(tiny_llama, tmp_path):
    layers = ["/model/layers.0/attn/o_proj/MatMul", "/model/layers.1/mlp/up_proj/MatMul"]
    out = export(tiny_llama, tmp_path / "g", target="cpu-x86", precision="int4", int4={"algorithm": "k_quant"}, mixed={"layers": layers})
    assert {p["node"].rsplit("_Q", 1)[0] for p in kernels.kernel_paths(out) if p["bits"] == 8} == set(layers)
    assert results(out)["quantization"]["mixed"]["how"] == "given"


def test_mixed_given_v_proj_layers_unpack_qkv(tiny_llama, tmp_path):
    """v_proj of one layer given by name (llama.cpp's Q4_K_M widens v/down in some layers only): the builder writes q, k
    and v as their own MatMuls in every layer (it unpacked the named layer alone, and the next layer's graph did not load)."""
    layers = ["/model/layers.0/attn/v_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul"]
    out = export(tiny_llama, tmp_path / "v", target="cpu-x86", precision="int4", int4={"lm_head": "int8"}, mixed={"layers": layers})
    paths = {p["node"].rsplit("_Q", 1)[0]: p["bits"] for p in kernels.kernel_paths(out)}
    assert {n for n, b in paths.items() if b == 8} == set(layers) | {"/lm_head/MatMul"}
    assert paths["/model/layers.1/attn/v_proj/MatMul"] == 4 and not any("qkv_proj" in n for n in paths)
    ref, got = _last_logits(tiny_llama), _genai_logits(out)
    assert np.abs(got - ref).mean() < np.abs(ref).mean() * 0.2  # it loads and computes the model


def test_mixed_modules_rule_unpacks_qkv(tiny_llama, tmp_path):
    """v_proj and down_proj at 8 bits in every layer: q/k stay int4 as their own MatMuls, and the graph still computes the model."""
    out = export(tiny_llama, tmp_path / "r", target="cpu-x86", precision="int4", int4={"lm_head": "int8"},
                 mixed={"modules": ["v_proj", "down_proj"]})
    paths = {p["node"].rsplit("_Q", 1)[0]: p for p in kernels.kernel_paths(out)}
    eight = {n for n, p in paths.items() if p["bits"] == 8}
    assert eight == {f"/model/layers.{i}/{m}/MatMul" for i in (0, 1) for m in ("attn/v_proj", "mlp/down_proj")} | {"/lm_head/MatMul"}
    assert not any("qkv_proj" in n for n in paths)  # unpacked: q, k and v are separate nodes
    assert {p["bits"] for n, p in paths.items() if "/q_proj/" in n or "/k_proj/" in n} == {4}
    m = results(out)["quantization"]["mixed"]
    assert m["how"] == "rule: v_proj, down_proj in every layer" and len(m["layers"]) == 4
    ref, got = _last_logits(tiny_llama), _genai_logits(out)
    plain = _genai_logits(export(tiny_llama, tmp_path / "p", target="cpu-x86", precision="int4", int4={"lm_head": "int8"}))
    assert np.abs(got - ref).mean() < np.abs(plain - ref).mean()  # wider v/down: closer to PyTorch than int4 everywhere


def test_int8_block_size_widens_the_8bit_nodes(tiny_llama, tmp_path, capsys):
    """--int8-block-size: the 8-bit head and --mixed-8bit layers in wider blocks (the CPU's 8-bit kernel runs them faster),
    the int4 body untouched; a tied head takes the widest block that divides the hidden size (64 here), so the embedding
    still reads its table. Bad sizes are refused before any work."""
    args = ["export", str(tiny_llama), "-t", "cpu-x86", "--precision", "int4", "--int4-lm-head", "int8", "--int4-accuracy-level", "4",
            "--mixed-8bit", "v_proj,down_proj", "--json"]
    code, out, _ = run_cli(args + ["-o", str(tmp_path / "w"), "--int8-block-size", "128"], capsys)
    assert code == 0, out
    folder = tmp_path / "w"
    blocks = {(p["bits"], p["block_size"]) for p in kernels.kernel_paths(folder)}
    by_node = {p["node"].rsplit("_Q", 1)[0]: p for p in kernels.kernel_paths(folder)}
    assert by_node["/lm_head/MatMul"]["block_size"] == 64  # tied, hidden 64
    assert {p["block_size"] for n, p in by_node.items() if p["bits"] == 8 and n != "/lm_head/MatMul"} == {128}
    assert {p["block_size"] for p in by_node.values() if p["bits"] == 4} == {32}
    assert blocks == {(4, 32), (8, 64), (8, 128)}
    rec = results(folder)
    assert rec["quantization"]["lm_head_block_size"] == 64 and rec["quantization"]["mixed"]["block_size_8bit"] == 128
    assert rec["embeddings"] == "int8 GatherBlockQuantized, shared with lm_head" and rec["int4"]["int8_block_size"] == 128
    # the default keeps the int4 block (Q8_0's 32), and the wider blocks cost no accuracy here
    narrow = export(tiny_llama, tmp_path / "n", target="cpu-x86", precision="int4",
                    int4={"lm_head": "int8", "accuracy_level": 4}, mixed={"modules": ["v_proj", "down_proj"]})
    assert {p["block_size"] for p in kernels.kernel_paths(narrow)} == {32}
    ref = _last_logits(tiny_llama)
    wide_err, narrow_err = np.abs(_genai_logits(folder) - ref).mean(), np.abs(_genai_logits(narrow) - ref).mean()
    assert wide_err < 1.2 * narrow_err + 1e-3, (wide_err, narrow_err)
    code, out, _ = run_cli(args + ["-o", str(tmp_path / "bad"), "--int8-block-size", "48"], capsys)
    assert code == 2 and not (tmp_path / "bad").exists()
    with pytest.raises(BadInput, match="8-bit block size 48"):
        export(tiny_llama, tmp_path / "bad2", target="cpu-x86", precision="int4", int4={"lm_head": "int8", "int8_block_size": 48})


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, module_tmp):
    """The tiny Llama with its MLPs 10x louder (so their rounding shows in the logits), as is (``clean``) and with two of
    down_proj's input channels 300x larger in every layer (``outliers``: the same function, up_proj's rows times 300
    and down_proj's columns over 300; the outliers real models carry in act(gate) * up)."""
    import torch
    from transformers import AutoModelForCausalLM

    made = {}
    for name, factor in (("clean", 1.0), ("outliers", 300.0)):
        out = made[name] = module_tmp(f"mlp-llama-{name}")
        m = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.down_proj.weight *= 10
                for j in (3, 77):
                    layer.mlp.up_proj.weight[j] *= factor
                    layer.mlp.down_proj.weight[:, j] /= factor
        m.save_pretrained(str(out))
        for f in tiny_llama.iterdir():
            if f.is_file() and not (out / f.name).exists() and f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
    return made


def test_smooth_8bit_folds_down_proj_outliers_into_up_proj(outlier_llama, calib_file, tmp_path, capsys):
    """--smooth-8bit: at accuracy_level 4 the kernel rounds down_proj's input to int8 per block, and an outlier channel sets
    the step for the whole block. The fold moves it into the 8-bit weights (exact in float): the export computes the
    model about as well as the same export of the model without outliers, where without the fold it is far off."""
    model, clean = outlier_llama["outliers"], outlier_llama["clean"]
    ref = _last_logits(model)
    assert np.abs(ref - _last_logits(clean)).max() < 1e-3  # the same function
    args = ["export", str(model), "-t", "cpu-x86", "--precision", "int4", "--int4-lm-head", "int8", "--int4-accuracy-level", "4",
            "--mixed-8bit", "down_proj", "--int8-block-size", "128", "--json"]
    code, out, _ = run_cli(args + ["-o", str(tmp_path / "plain")], capsys)
    assert code == 0, out
    code, out, _ = run_cli(args + ["-o", str(tmp_path / "smooth"), "--smooth-8bit", "--calibration", str(calib_file)], capsys)
    assert code == 0, out
    rec = results(tmp_path / "smooth")
    sm = rec["quantization"]["smooth"]
    assert rec["int4"]["smooth_8bit"] is True and results(tmp_path / "plain")["int4"]["smooth_8bit"] is False
    assert sm["layers"] == 2 and sm["smoothed_layers"] == 2 and sm["output_error_vs_unsmoothed"] < 0.5
    assert sm["float_logit_check"]["max_abs_diff"] < 1e-4 * max(1.0, sm["float_logit_check"]["max_abs_logit"])
    assert all(r["err_after"] < r["err_before"] for r in sm["table"])
    # the same graph: the 8-bit nodes are down_proj's and the head, in the blocks asked for
    paths = {p["node"].rsplit("_Q", 1)[0]: p for p in kernels.kernel_paths(tmp_path / "smooth")}
    assert {n for n, p in paths.items() if p["bits"] == 8} == {f"/model/layers.{i}/mlp/down_proj/MatMul" for i in (0, 1)} | {"/lm_head/MatMul"}
    smooth_err = np.abs(_genai_logits(tmp_path / "smooth") - ref).mean()
    plain_err = np.abs(_genai_logits(tmp_path / "plain") - ref).mean()
    clean_out = export(clean, tmp_path / "clean", target="cpu-x86", precision="int4",
                       int4={"lm_head": "int8", "accuracy_level": 4, "int8_block_size": 128}, mixed={"modules": ["down_proj"]})
    clean_err = np.abs(_genai_logits(clean_out) - ref).mean()
    assert smooth_err < 0.6 * plain_err and smooth_err < 1.2 * clean_err, (smooth_err, plain_err, clean_err)


def test_smooth_8bit_folds_the_heads_outliers_into_the_final_norm(tiny_llama, calib_file, module_tmp, tmp_path, capsys):
    """--smooth-8bit with an int8 head: the final norm's output (the head's input) with two channels 40x louder; the fold
    puts the scales into the float head's rows and the norm's gamma before the head is quantized, and the tied embedding,
    which reads the head's int8 table, gets one Mul by 1 / s after its gather: the int8 head adds less than a quarter
    of the error it adds without the fold (measured: 0.0026 vs 0.0107 of mean |logit| error over the int4 body's)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = module_tmp("loud-norm-llama")
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        m.model.norm.weight[[5, 40]] *= 40
    m.save_pretrained(str(model))
    for f in tiny_llama.iterdir():
        if f.is_file() and not (model / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy2(f, model / f.name)
    ref = _last_logits(model)
    args = ["export", str(model), "-t", "cpu-x86", "--precision", "int4", "--int4-lm-head", "int8", "--int4-accuracy-level", "4", "--json"]
    code, out, _ = run_cli(args + ["-o", str(tmp_path / "plain")], capsys)
    assert code == 0, out
    code, out, _ = run_cli(args + ["-o", str(tmp_path / "smooth"), "--smooth-8bit", "--calibration", str(calib_file)], capsys)
    assert code == 0, out
    rec = results(tmp_path / "smooth")
    head = rec["quantization"]["smooth"]["head"]
    assert head["form"] != "identity" and head["err_after"] < 0.5 * head["err_before"] and head["folded"]["gamma"]
    assert rec["quantization"]["smooth"]["layers"] == 0 and not rec["quantization"]["smooth"]["checkpoint_changed"]
    # one int8 table for the head and the embedding, as without the fold: the same size
    assert rec["embeddings"] == results(tmp_path / "plain")["embeddings"] == "int8 GatherBlockQuantized, shared with lm_head"
    assert "times 1 / the head's smoothing scales" in rec["quantization"]["embedding"]
    assert abs(rec["size_mb"] - results(tmp_path / "plain")["size_mb"]) < 0.01
    # what the int8 head adds to the int4 body's error (the same export with a float head), with the fold and without
    floor = np.abs(_genai_logits(export(model, tmp_path / "fp32-head", target="cpu-x86", precision="int4",
                                        int4={"lm_head": "fp32", "accuracy_level": 4})) - ref).mean()
    smooth_err = np.abs(_genai_logits(tmp_path / "smooth") - ref).mean()
    plain_err = np.abs(_genai_logits(tmp_path / "plain") - ref).mean()
    assert smooth_err - floor < 0.4 * (plain_err - floor), (smooth_err, plain_err, floor)


@pytest.mark.parametrize("extra,match", [
    ([], "inputs of the 8-bit nodes"),  # nothing at 8 bits
    (["--mixed-8bit", "v_proj"], "inputs of the 8-bit nodes"),
    (["--mixed-8bit", "0.5"], "inputs of the 8-bit nodes"),  # measured: not known before the export
    (["--mixed-8bit", "down_proj", "--int4-accuracy-level", "0"], "accuracy_level 4"),
    (["--mixed-8bit", "down_proj", "--int4-algorithm", "awq"], "not 'awq'"),  # awq folds scales of its own
    (["--int4-lm-head", "int8", "--int4-algorithm", "inc-rtn"], "not the 'inc' quantizer's"),
])
def test_smooth_8bit_refused_before_any_work(tiny_llama, calib_file, tmp_path, capsys, extra, match):
    args = ["export", str(tiny_llama), "-t", "cpu-x86", "--precision", "int4", "--int4-accuracy-level", "4", "--smooth-8bit",
            "--calibration", str(calib_file), "-o", str(tmp_path / "x"), *extra]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and match in out + err and not (tmp_path / "x").exists(), out + err


FAST_TARGET = """[[targets]]
name = "cpu-x86"
precision = "int4"
int4 = { algorithm = "imatrix-gptq", symmetric = false, lm_head = "int8", accuracy_level = 4, int8_block_size = 128, smooth_8bit = true }
mixed_8bit = ["v_proj", "down_proj"]
pack = true
calibration = "calib.jsonl"
archive = false
"""


def test_build_target_takes_mixed_8bit_pack_and_smoothing(tiny_llama, calib_file, tmp_path, capsys):
    """A build's [[targets]] entry says what `edgetune export` says with --mixed-8bit, --pack-siblings and --smooth-8bit
    (the fast recipe of issue 33), and they reach its export; the same keys where they cannot apply are refused before
    any work, naming the entry."""
    from test_build import write_config

    cfg = write_config(tmp_path / "b", tiny_llama, targets=FAST_TARGET)
    shutil.copy(calib_file, tmp_path / "b" / "calib.jsonl")
    code, _, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code in (0, 1), err  # 1: a missed budget still writes the bundle (rejected/)
    rec = json.loads((tmp_path / "b" / "out" / ".work" / "export-cpu-x86" / "edgetune.json").read_text())
    res = rec["results"]
    assert rec["options"]["mixed"] == {"modules": ["v_proj", "down_proj"]} and rec["options"]["pack"] is True
    assert rec["options"]["int4"]["smooth_8bit"] is True and res["quantization"]["smooth"]["layers"] == 2
    assert res["quantization"]["mixed"]["how"] == "rule: v_proj, down_proj in every layer" and res["packed"]["groups"]
    paths = {p["node"].rsplit("_Q", 1)[0]: p for p in kernels.kernel_paths(tmp_path / "b" / "out" / ".work" / "export-cpu-x86")}
    assert {p["block_size"] for p in paths.values() if p["bits"] == 8} == {64, 128}  # the tied head: 64
    for targets, match in (
            (FAST_TARGET.replace('precision = "int4"', 'precision = "fp32"').replace("int4 = {", "# int4 = {"),
             "targets[0].pack packs sibling MatMulNBits"),
            (FAST_TARGET.replace("pack = true", "").replace('precision = "int4"', 'precision = "fp32"').replace("int4 = {", "# int4 = {"),
             "targets[0].mixed_8bit keeps layers of an int4 export at 8 bits"),
            (FAST_TARGET.replace('mixed_8bit = ["v_proj", "down_proj"]', 'mixed_8bit = ["w_proj"]'), "targets[0]: mixed precision: modules"),
            (FAST_TARGET.replace('mixed_8bit = ["v_proj", "down_proj"]', "").replace('lm_head = "int8"', 'lm_head = "int4"'),
             "targets[0]: --smooth-8bit smooths the inputs of the 8-bit nodes")):
        root = tmp_path / f"bad{len(match)}"
        cfg = write_config(root, tiny_llama, targets=targets)
        shutil.copy(calib_file, root / "calib.jsonl")
        code, _, err = run_cli(["build", str(cfg), "--quiet"], capsys)
        assert code == 2 and match in err, err
        assert not (root / "out").exists()


SMOOTH = "imatrix-gptq-head8-vdown8-smooth"


def test_a_named_recipe_exports_what_its_options_export(tiny_llama, calib_file, tmp_path, capsys):
    """`--recipe NAME` is the candidate's options in one word (issue 33's fast recipe: seven flags), not a search: the same
    graph, bit for bit, as the flags it stands for, and the record names it."""
    from edgetune.recipes import graph_difference

    code, out, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--recipe", SMOOTH, "--calibration", str(calib_file),
                              "-o", str(tmp_path / "named"), "--json"], capsys)
    assert code == 0, out + err
    rec = results(tmp_path / "named")
    assert rec["recipe_name"] == SMOOTH and "recipe" not in rec  # no search table: nothing was searched
    assert rec["int4"]["algorithm"] == "imatrix-gptq" and rec["int4"]["smooth_8bit"] and rec["int4"]["accuracy_level"] == 4
    assert rec["packed"]["groups"] and rec["quantization"]["smooth"]["layers"] == 2
    code, out, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--precision", "int4", "--int4-algorithm", "imatrix-gptq",
                              "--int4-asymmetric", "--int4-lm-head", "int8", "--int4-accuracy-level", "4", "--int8-block-size", "128",
                              "--smooth-8bit", "--mixed-8bit", "v_proj,down_proj", "--pack-siblings", "--calibration", str(calib_file),
                              "-o", str(tmp_path / "flags")], capsys)
    assert code == 0, out + err
    assert graph_difference(tmp_path / "named", tmp_path / "flags") is None


@pytest.mark.parametrize("extra,match", [
    (["--int4-lm-head", "int4"], "--recipe imatrix-gptq-head8-vdown8-smooth sets the precision and quantization options itself; --int4-* given"),
    (["--precision", "int4"], "--precision given too"),
    (["--pack-siblings"], "--pack-siblings given too"),
])
def test_a_named_recipe_refuses_other_quantization_options(tiny_llama, calib_file, tmp_path, capsys, extra, match):
    code, out, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--recipe", SMOOTH, "--calibration", str(calib_file),
                              "-o", str(tmp_path / "x"), *extra], capsys)
    assert code == 2 and match in out + err and not (tmp_path / "x").exists(), out + err


def test_a_profile_names_its_default_recipe(tiny_llama, tmp_path, capsys):
    """A profile's [quantization] recipe = NAME is what an export with no quantization options gets; any option given
    is the caller's own recipe instead; a GGUF not fine-tuned keeps its own weights (the exact transcode); an unknown
    name is refused when the profile is read."""
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    prof = tmp_path / "fast.toml"
    prof.write_text('extends = "cpu-x86"\nname = "fast"\n[quantization]\nrecipe = "rtn-head8"\n')
    out = export_with_recipe(tiny_llama, tmp_path / "default", target=str(prof))
    assert results(out)["recipe_name"] == "rtn-head8" and results(out)["int4"]["lm_head"] == "int8"
    out = export_with_recipe(tiny_llama, tmp_path / "own", target=str(prof), int4={"lm_head": "int4"})
    assert "recipe_name" not in results(out) and results(out)["int4"]["lm_head"] == "int4"
    src = tmp_path / "gguf"
    build_bpe_tokenizer(src)
    out = export_with_recipe(write_tiny_llama_gguf(src / "tiny.gguf", src), tmp_path / "from-gguf", target=str(prof))
    assert results(out)["precision"] == "gguf" and "recipe_name" not in results(out)
    prof.write_text('extends = "cpu-x86"\nname = "bad"\n[quantization]\nrecipe = "fastest-please"\n')
    code, out_, err = run_cli(["export", str(tiny_llama), "-t", str(prof), "-o", str(tmp_path / "bad")], capsys)
    assert code == 2 and "unknown recipe 'fastest-please'" in out_ + err, out_ + err


def test_a_build_target_names_a_recipe(tiny_llama, calib_file, tmp_path, capsys):
    """A build's [[targets]] entry takes recipe = NAME (the export's --recipe); with quantization keys of its own beside it
    the entry is refused before any work, named."""
    from test_build import write_config

    target = '[[targets]]\nname = "cpu-x86"\nrecipe = "rtn-head8"\narchive = false\n'
    cfg = write_config(tmp_path / "b", tiny_llama, targets=target)
    code, out, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code in (0, 1), err
    rec = json.loads((tmp_path / "b" / "out" / ".work" / "export-cpu-x86" / "edgetune.json").read_text())
    assert rec["results"]["recipe_name"] == "rtn-head8" and rec["results"]["int4"]["lm_head"] == "int8"
    assert json.loads(out)["targets"][0]["recipe"] == "rtn-head8"
    root = tmp_path / "bad"
    cfg = write_config(root, tiny_llama, targets=target + "pack = true\n")
    code, _, err = run_cli(["build", str(cfg), "--quiet"], capsys)
    assert code == 2 and 'targets[0].recipe = "rtn-head8" sets the precision and quantization itself; pack given too' in err, err
    assert not (root / "out").exists()


def test_mixed_keeps_an_fp32_head_float(tiny_llama, tmp_path):
    """The 8-bit step quantizes the planned layers only: onnxruntime's quantizer took every float MatMul, the fp32 head
    included (the export then failed its own head check)."""
    out = export(tiny_llama, tmp_path / "f", target="cpu-x86", precision="int4", int4={"lm_head": "fp32"},
                 mixed={"modules": ["down_proj"]})
    eight = {p["node"].rsplit("_Q", 1)[0] for p in kernels.kernel_paths(out) if p["bits"] == 8}
    assert eight == {f"/model/layers.{i}/mlp/down_proj/MatMul" for i in (0, 1)}
    assert results(out)["lm_head"]["kind"] == "fp32"


def test_mixed_8bit_cli_takes_a_fraction_or_modules():
    from click.testing import CliRunner

    from edgetune.commands.export import MixedSpec

    spec = MixedSpec()
    assert spec.convert("0.25", None, None) == {"fraction": 0.25}
    assert spec.convert("v_proj, down_proj", None, None) == {"modules": ["v_proj", "down_proj"]}
    import click

    with pytest.raises(click.BadParameter, match="not in"):
        spec.convert("1.5", None, None)
    from edgetune.cli import cli

    r = CliRunner().invoke(cli, ["export", "x", "-t", "cpu-x86", "-o", "y", "--mixed-8bit", "v/proj"])
    assert r.exit_code == 2 and "neither a fraction" in r.output


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "int4", "mixed": {"modules": ["x_proj"]}}, "'x_proj' is not one"),
    ({"precision": "int4", "mixed": {"modules": ["v_proj"], "fraction": 0.1}}, "modules must be"),
    ({"precision": "int8", "mixed": {"fraction": 0.2}}, "applies to int4"),
    ({"precision": "int4", "int4": {"algorithm": "gptq"}, "mixed": {"fraction": 0.2}}, "rtn, k_quant"),
    ({"precision": "int4", "mixed": {"fraction": 0.2, "count": 2}}, "one of fraction"),
    ({"precision": "int4", "mixed": {"layers": ["/lm_head/MatMul"]}}, "not a decoder-layer MatMul"),
    ({"recipe": "auto", "precision": "int4"}, "chooses precision"),
    ({"data": "x.txt"}, "--eval-data only apply to --recipe auto"),
    ({"time_budget_s": 60}, "--recipe-time-budget only apply to --recipe auto"),
])
def test_bad_mixed_and_recipe_options(tiny_llama, tmp_path, kwargs, match):
    with pytest.raises(BadInput, match=match):
        export_with_recipe(tiny_llama, tmp_path / "x", target="cpu-x86", **kwargs)
    assert not (tmp_path / "x").exists()


def _last_logits(model_dir, ids=(5, 17, 42, 99, 7, 3)):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([list(ids)])).logits[0, -1].numpy()


def _genai_logits(folder, ids=(5, 17, 42, 99, 7, 3)):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens(np.array([list(ids)], dtype=np.int32))
    logits = np.asarray(gen.get_logits())
    return logits.reshape(-1, logits.shape[-1])[-1]


# ------------------------------------------------------------------ automatic recipe


def test_auto_recipe_picks_fastest_passing(tiny_llama, calib_file, tmp_path):
    out = export_with_recipe(tiny_llama, tmp_path / "auto", target="cpu-x86", recipe="auto", calibration=calib_file, data=calib_file,
                 candidates=["rtn-head4", "rtn-head8-mixed25"], validate_options=FAST_VALIDATE)
    rec = results(out)
    search = rec["recipe"]
    names = [r["recipe"] for r in search["table"]]
    # the level-4 twins are tried too (cpu-x86 says accuracy_level 0; symmetric rtn has no zero points)
    assert names == ["rtn-head4", "rtn-head4@level4", "rtn-head8-mixed25", "rtn-head8-mixed25@level4"]
    passing = [r for r in search["table"] if r["passed"]]
    assert passing and all(r["decode_tokens_per_s"] > 0 and r["size_mb"] > 0 and r["kl_divergence"] is not None for r in search["table"])
    best = max(passing, key=lambda r: r["decode_tokens_per_s"])
    assert search["chosen"] == best["recipe"]
    # the folder is the winner's export, and its graph is what the winner's name says
    level = 4 if best["recipe"].endswith("@level4") else 0
    assert all(p["accuracy_level"] == level for p in kernels.kernel_paths(out) if p["bits"] == 4)
    assert any(p["bits"] == 8 for p in kernels.kernel_paths(out)) == ("mixed" in best["recipe"])
    assert search["sensitivity"]["rtn"]["top"]
    # only the winner is kept: no candidate work folder left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto"]


def test_auto_recipe_smooth_candidate_runs_on_avx2_and_asymmetric_twins_are_made(tiny_llama, calib_file, tmp_path):
    """The smoothed candidate is made at accuracy_level 4 (--smooth-8bit shapes its int8 activations), and candidates with
    zero points get level-4 twins: on plain AVX2 (cpu-x86) too, since onnxruntime #29853 does not show through
    MatMulNBits there (tests/test_avx2_emulation.py). Level 4 stays a CPU matter: a GPU target skips it."""
    from edgetune.recipes import _level4_runs
    from edgetune.targets import resolve

    smooth = "imatrix-gptq-head8-vdown8-smooth"
    out = export_with_recipe(tiny_llama, tmp_path / "smooth", target="cpu-x86", recipe="auto", calibration=calib_file,
                             data=calib_file, candidates=[smooth], validate_options=FAST_VALIDATE)
    rec = results(out)
    assert rec["recipe"]["chosen"] == smooth and rec["int4"]["smooth_8bit"] and rec["int4"]["accuracy_level"] == 4
    sm = rec["quantization"]["smooth"]
    assert sm["layers"] == 2 and sm["head"]["err_after"] <= sm["head"]["err_before"]
    out = export_with_recipe(tiny_llama, tmp_path / "twin", target="cpu-x86", recipe="auto", calibration=calib_file,
                             data=calib_file, candidates=["imatrix-head8"], validate_options=FAST_VALIDATE)
    rows = results(out)["recipe"]["table"]  # imatrix-head8 has uint4 zero points: its level-4 twin is made and validated
    assert [r["recipe"] for r in rows] == ["imatrix-head8", "imatrix-head8@level4"] and all("error" not in r for r in rows)
    assert _level4_runs(resolve("cpu-x86")) and _level4_runs(resolve("cpu-arm64")) and not _level4_runs(resolve("gpu-cuda"))


def test_auto_recipe_gptq_rule_candidate_ships_packed(tiny_llama, calib_file, tmp_path):
    """The v/down 8-bit GPTQ candidate is exported with its siblings packed (gate+up, q+k); a packed graph is never
    where the search measures layer sensitivity (its node names are not the builder's): rtn's is measured instead."""
    out = export_with_recipe(tiny_llama, tmp_path / "auto", target="cpu-x86", recipe="auto", calibration=calib_file, data=calib_file,
                             candidates=["imatrix-gptq-head8-vdown8"], validate_options=FAST_VALIDATE)
    rec = results(out)
    # its level-4 twin too (uint4 zero points run at level 4 on AVX2 as well): either ships packed
    assert rec["recipe"]["chosen"] in ("imatrix-gptq-head8-vdown8", "imatrix-gptq-head8-vdown8@level4")
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert rec["packed"]["groups"] == 2 * layers
    assert {n.split("/")[-2] for n in rec["packed"]["nodes"]} == {"qk_proj", "gate_up_proj"}
    out2 = export_with_recipe(tiny_llama, tmp_path / "auto2", target="cpu-x86", recipe="auto", calibration=calib_file, data=calib_file,
                              candidates=["imatrix-gptq-head8-vdown8", "imatrix-head8-mixed10"], validate_options=FAST_VALIDATE)
    sens = results(out2)["recipe"]["sensitivity"]
    assert "imatrix-gptq" not in sens and sens["imatrix"]["top"]
    assert all("qk_proj" not in n and "gate_up_proj" not in n for n in sens["imatrix"]["top"])


def test_auto_recipe_tries_the_fine_tune_kept_exactly_when_given_base_and_adapter(calib_file, tmp_path):
    """Over a GGUF base's LoRA merge the search also exports the base's own blocks + the LoRA in float (and at 8-bit
    side weights), validated against the merge like the rest: the exact one is the closest to it."""
    pytest.importorskip("gguf")
    from edgetune.merge import merge
    from edgetune.model_input import materialize
    from test_adapters import make_lora
    from test_gguf_transcode import FOUR_BIT
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    src = tmp_path / "gguf"
    build_bpe_tokenizer(src)
    base = materialize(write_tiny_llama_gguf(src / "q4.gguf", src, override=FOUR_BIT)).path
    lora = make_lora(base, tmp_path / "lora", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], seed=4)
    merged = merge(base, lora, tmp_path / "merged")
    cands = ["rtn-head8", "gguf-float-lora", "gguf-float-lora-side8"]
    out = export_with_recipe(merged, tmp_path / "auto", target="cpu-x86", recipe="auto", calibration=calib_file, data=calib_file,
                             candidates=cands, validate_options=FAST_VALIDATE, lora_search=(base, lora))
    search = results(out)["recipe"]
    rows = {r["recipe"]: r for r in search["table"]}
    # the level-4 twin of the exact graph too (symmetric 4-bit nodes); the side8 candidate is at level 4 already
    assert list(rows) == ["rtn-head8", "rtn-head8@level4", "gguf-float-lora", "gguf-float-lora@level4", "gguf-float-lora-side8"]
    assert all(r["kl_divergence"] is not None and "error" not in r for r in rows.values()), rows
    assert rows["gguf-float-lora"]["kl_divergence"] < 1e-4 < rows["rtn-head8"]["kl_divergence"]
    assert rows["gguf-float-lora"]["kl_divergence"] < rows["gguf-float-lora-side8"]["kl_divergence"] < rows["rtn-head8"]["kl_divergence"]
    assert search["lora"] == [str(base), str(lora)] and search["reference"] == str(merged)
    chosen = results(out)
    if search["chosen"].startswith("gguf-float-lora"):  # the shipped folder is that export, its inputs recorded
        assert chosen["float_adapter"]["name"] and json.loads((out / "edgetune.json").read_text())["inputs"]["float_adapter"]
    # without base and adapter the default list leaves them out; asked for by name, the row says why
    with pytest.raises(CheckFailed) as exc:
        export_with_recipe(merged, tmp_path / "none", target="cpu-x86", recipe="auto", calibration=calib_file, data=calib_file,
                           candidates=["gguf-float-lora"], validate_options=FAST_VALIDATE)
    assert "needs the base model and its LoRA adapter" in exc.value.result["table"][0]["error"]


def test_auto_recipe_nothing_passes_exits_1_with_table(tiny_llama, calib_file, tmp_path):
    prof = tmp_path / "tiny-budget.toml"
    prof.write_text('name = "tiny-budget"\nextends = "cpu-x86"\n[budgets]\nmax_size_mb = 0.001\n')
    with pytest.raises(CheckFailed, match=r"no recipe meets the budgets(.|\n)*rtn-head4 \|") as exc:
        export_with_recipe(tiny_llama, tmp_path / "auto", target=str(prof), recipe="auto", calibration=calib_file, data=calib_file,
               candidates=["rtn-head4"], validate_options=FAST_VALIDATE)
    assert exc.value.exit_code == 1
    table = exc.value.result["table"]
    assert [r["recipe"] for r in table] == ["rtn-head4", "rtn-head4@level4"]
    assert all(not r["passed"] and "size_mb" in r["failed"] for r in table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-budget.toml"]


def test_recipe_profile_field(tmp_path):
    from edgetune.targets import load_target

    prof = tmp_path / "a.toml"
    prof.write_text('name = "a"\nextends = "cpu-x86"\n[quantization]\nrecipe = "auto"\n')
    assert load_target(str(prof)).quantization.recipe == "auto"
    assert load_target("cpu-x86").quantization.recipe == "imatrix-gptq-head8-vdown8-smooth"  # issue 33's recipe, by name
    assert load_target("cpu-arm64").quantization.recipe == "profile"  # not measured on Arm
    prof.write_text('name = "a"\nextends = "cpu-x86"\n[quantization]\nrecipe = "best"\n')
    with pytest.raises(BadInput, match="recipe"):
        load_target(str(prof))


def test_auto_recipe_ships_the_level4_twin_it_validated(tiny_llama, calib_file, tmp_path, monkeypatch):
    """A twin that wins is exported again with accuracy_level 4 by the same call as its candidate: packed, 8-bit blocks,
    mixed layers and the user's calibration kept (before, the re-export dropped --pack and the calibration), and the
    shipped graph is checked against the validated one. Here only the twin may pass (the plain candidate is failed after
    its real validation), so the twin's path is the one taken."""
    import edgetune.validate as validate_mod

    real = validate_mod.validate

    def only_twins_pass(folder, **kw):
        report = real(folder, **kw)
        if not str(folder).endswith("@level4"):
            report = {**report, "passed": False, "failed": ["(test: only the twin may win)"]}
        return report

    monkeypatch.setattr(validate_mod, "validate", only_twins_pass)
    cand = {"name": "gptq-sym-vd8-pack", "precision": "int4",
            "int4": {"algorithm": "imatrix-gptq", "symmetric": True, "lm_head": "int8", "int8_block_size": 64},
            "mixed": {"modules": ["v_proj", "down_proj"]}, "pack": True}
    out = export_with_recipe(tiny_llama, tmp_path / "auto", target="cpu-x86", recipe="auto", calibration=calib_file, data=calib_file,
                             candidates=[cand], validate_options=FAST_VALIDATE)
    rec = results(out)
    assert [r["recipe"] for r in rec["recipe"]["table"]] == ["gptq-sym-vd8-pack", "gptq-sym-vd8-pack@level4"]
    assert rec["recipe"]["chosen"] == "gptq-sym-vd8-pack@level4"
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert rec["packed"]["groups"] == 2 * layers
    assert rec["quantization"]["calibration"]["file"] == str(calib_file)  # the user's texts, not the project's generic set
    paths = kernels.kernel_paths(out)
    assert all(p["accuracy_level"] == 4 for p in paths)
    assert {p["block_size"] for p in paths if p["bits"] == 8} == {64}
    assert json.loads((out / "edgetune.json").read_text())["chosen_export"]["options"]["int4"]["accuracy_level"] == 4


def test_graph_difference_ignores_only_the_accuracy_level(tiny_llama, tmp_path):
    from edgetune.recipes import graph_difference

    a = export(tiny_llama, tmp_path / "a", target="cpu-x86", precision="int4")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert kernels.set_accuracy_level(b, 4) > 0
    assert graph_difference(a, b) is None
    data = next(p for p in b.iterdir() if p.name.endswith(".data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert graph_difference(a, b) == f"{data.name}'s bytes"


def test_auto_recipe_time_budget_leaves_the_rest_untried(tiny_llama, calib_file, tmp_path):
    """A candidate starts only while the search has run for less than the budget: the first one starts at once, the
    others are rows 'not tried' (the profile's recipe_candidates / recipe_time_budget_s, as the build reads them)."""
    prof = tmp_path / "budgeted.toml"
    prof.write_text('name = "budgeted"\nextends = "cpu-x86"\n[quantization]\nrecipe = "auto"\n'
                    'recipe_candidates = ["rtn-head8", "imatrix-head8-vdown8", "int8"]\nrecipe_time_budget_s = 0.001\n')
    out = export_with_recipe(tiny_llama, tmp_path / "auto", target=str(prof), calibration=calib_file, data=calib_file,
                             validate_options=FAST_VALIDATE)
    search = results(out)["recipe"]
    assert [r["recipe"] for r in search["table"]] == ["rtn-head8", "rtn-head8@level4", "imatrix-head8-vdown8", "int8"]
    untried = search["table"][2:]
    assert all(r["failed"] == ["time budget"] and "not tried" in r["error"] and "seconds" not in r for r in untried)
    tried = search["table"][:2]  # (each figure rounded to 0.1 s)
    assert all(r["seconds"] > 0 for r in tried) and sum(r["seconds"] for r in tried) <= search["seconds"] + 0.05 * (len(tried) + 1)
    assert search["chosen"].startswith("rtn-head8") and "2 not tried within the time budget" in search["why"]
    assert search["time_budget_s"] == 0.001
    # no layer sensitivity is measured where no candidate reads one (v/down is a rule, not a ranking)
    assert search["sensitivity"] == {}
    # nothing passes and candidates were left: the message says the budget is why they were not tried
    prof.write_text(prof.read_text() + "[budgets]\nmax_size_mb = 0.001\n")
    with pytest.raises(CheckFailed, match="not tried within the time budget") as exc:
        export_with_recipe(tiny_llama, tmp_path / "none", target=str(prof), calibration=calib_file, data=calib_file,
                           validate_options=FAST_VALIDATE)
    assert exc.value.exit_code == 1


def test_recipe_time_budget_flag(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_llama), "--target", "cpu-x86", "-o", str(tmp_path / "x"), "--recipe-time-budget", "60"], capsys)
    assert code == 2 and "--recipe-time-budget only apply to --recipe auto" in err
    code, _, err = run_cli(["export", str(tiny_llama), "--target", "cpu-x86", "-o", str(tmp_path / "x"), "--recipe", "auto",
                            "--recipe-time-budget", "0"], capsys)
    assert code == 2 and "--recipe-time-budget" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option", [{"time_budget_s": 60}, {"candidates": ["rtn-head8"]}, {"recipe": "auto"}])
def test_recipe_search_options_are_refused_for_an_encoder(tiny_bert, tmp_path, option):
    with pytest.raises(BadInput, match="apply to decoder LLMs"):
        export_with_recipe(tiny_bert, tmp_path / "x", target="cpu-x86", **option)
    assert not (tmp_path / "x").exists()


def test_recipe_profile_candidates_are_checked_when_the_profile_loads(tmp_path):
    from edgetune.targets import load_target

    prof = tmp_path / "a.toml"
    prof.write_text('name = "a"\nextends = "cpu-x86"\n[quantization]\nrecipe = "auto"\nrecipe_candidates = ["rtn-head8", "fastest"]\n')
    with pytest.raises(BadInput, match="recipe_candidates.*unknown fastest"):
        load_target(str(prof))
    prof.write_text('name = "a"\nextends = "cpu-x86"\n[quantization]\nrecipe_time_budget_s = -5\n')
    with pytest.raises(BadInput, match="recipe_time_budget_s"):
        load_target(str(prof))


def test_a_float_adapter_twin_exports_again_to_the_graph_it_validated(calib_file, tmp_path):
    """The level-4 re-export of the float-adapter candidates (the exact GGUF base + float LoRA, and its 8-bit side
    weights) is the patched twin's graph: the search's check would otherwise refuse to ship the winner."""
    pytest.importorskip("gguf")
    from edgetune.export.decoder.dispatch import export_llm
    from edgetune.model_input import materialize
    from edgetune.quant import RECIPE_CANDIDATES
    from edgetune.recipes import _float_adapter_source, graph_difference
    from test_adapters import make_lora
    from test_gguf_transcode import FOUR_BIT
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    src = tmp_path / "gguf"
    build_bpe_tokenizer(src)
    base = materialize(write_tiny_llama_gguf(src / "q4.gguf", src, override=FOUR_BIT)).path
    lora = make_lora(base, tmp_path / "lora", targets=["q_proj", "v_proj", "down_proj"], seed=4)
    cands = [c for c in RECIPE_CANDIDATES if c.get("float_adapter")]
    assert len(cands) == 2
    for cand in cands:
        source, kw = _float_adapter_source(cand, (base, lora))
        int4 = dict(cand.get("int4") or {})
        twin, level4 = tmp_path / f"{cand['name']}-twin", tmp_path / f"{cand['name']}-level4"
        export_llm(source, twin, target="cpu-x86", precision=cand["precision"], int4=int4, **kw)
        assert kernels.set_accuracy_level(twin, 4) > 0
        export_llm(source, level4, target="cpu-x86", precision=cand["precision"], int4={**int4, "accuracy_level": 4}, **kw)
        assert graph_difference(twin, level4) is None, cand["name"]
