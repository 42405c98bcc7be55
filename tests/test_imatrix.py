"""int4 algorithm 'imatrix': the builder's RTN nodes, their values from an importance-weighted scale and
zero-point search per block (edgetune/export/decoder/imatrix.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.export import export
from edgetune.export.decoder import imatrix
from edgetune.export.decoder.builder import matmulnbits_attributes

TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
         "Turn on the kitchen lights.", "def f(x):\n    return x**2", "Set the thermostat to 21 degrees.",
         "A list: apples, pears, plums and three kinds of cherries.", "Rain is expected over the hills by noon.",
         "She read the letter twice and then burned it.", "Close the garage door at ten tonight, please."]


def _ort_rtn(w: np.ndarray, block: int, symmetric: bool):
    """onnxruntime's own RTN (the function the builder's quantizer calls) of w [N, K]: (q, scales, zero points)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

    n, k = w.shape
    kb = k // block
    packed = np.zeros((n, kb, block // 2), np.uint8)
    scales = np.zeros((n * kb,), np.float32)
    zp = np.zeros((n * ((kb + 1) // 2),), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, zp, block, n, k, symmetric)
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, k)
    z = None if symmetric else np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :kb]
    return q, scales.reshape(n, kb), z


def _weighted_error(w, imp, q, s, z, block):
    n, k = w.shape
    zz = 8.0 if z is None else z.astype(np.float32)[..., None]
    deq = (q.reshape(n, k // block, block).astype(np.float32) - zz) * s[..., None]
    return (imp.reshape(1, k // block, block) * (deq - w.reshape(n, k // block, block)) ** 2).sum(-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_search_never_loses_to_rtn_on_its_measure_and_stays_on_the_grid(symmetric):
    rng = np.random.default_rng(0)
    n, k, block = 64, 256, 32
    w = (rng.standard_t(4, size=(n, k)) * 0.05).astype(np.float32)
    imp = np.exp(rng.normal(0, 2, size=k)).astype(np.float32)  # a few channels carry most of the activation
    rtn = _ort_rtn(w, block, symmetric)
    q, s, z, info = imatrix.search(w, imp, block=block, symmetric=symmetric, rtn=rtn)
    assert q.dtype == np.uint8 and q.shape == (n, k) and int(q.max()) <= 15 and s.shape == (n, k // block)
    assert (z is None) == symmetric and (symmetric or (z.dtype == np.uint8 and int(z.max()) <= 15))
    ours, theirs = _weighted_error(w, imp, q, s, z, block), _weighted_error(w, imp, *rtn, block)
    assert np.all(ours <= theirs * (1 + 1e-5) + 1e-12)  # block by block: RTN is one of the candidates
    assert ours.sum() < 0.7 * theirs.sum(), (ours.sum(), theirs.sum())
    # the record's figures: the same measure (with the search's small importance floor for channels never active)
    assert info["err"] / info["err_rtn"] == pytest.approx(float(ours.sum() / theirs.sum()), rel=0.02)
    # rows are searched in chunks: the result does not depend on the chunking
    saved = imatrix.ROWS
    try:
        imatrix.ROWS = 7
        q2, s2, z2, _ = imatrix.search(w, imp, block=block, symmetric=symmetric, rtn=rtn)
    finally:
        imatrix.ROWS = saved
    assert np.array_equal(q, q2) and np.array_equal(s, s2) and (z is None or np.array_equal(z, z2))


@pytest.fixture(scope="module")
def calib(module_tmp):
    p = module_tmp("calib") / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    return p


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, module_tmp):
    """The tiny Llama with a few input channels of every RMSNorm 30x larger: activations of uneven importance."""
    import torch
    from transformers import AutoModelForCausalLM

    out = module_tmp("outlier-im") / "model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:4]] *= 30.0
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tiny_llama.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _held_out_error(model_dir, exports: dict) -> dict[str, float]:
    """Per export, the mean |dlogit| over every position of texts no calibration used, vs the float model."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    err = dict.fromkeys(exports, 0.0)
    for text in TEXTS[4:]:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for name, folder in exports.items():
            m = og.Model(str(folder))
            gen = og.Generator(m, og.GeneratorParams(m))
            for i, t in enumerate(ids):  # one token at a time: the logits of every position
                gen.append_tokens(np.array([[t]], dtype=np.int32))
                err[name] += float(np.abs(np.asarray(gen.get_logits()).reshape(-1) - ref[i]).mean())
    return err


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_imatrix_export_is_rtns_graph_with_better_values(outlier_llama, calib, tmp_path, symmetric):
    int4 = {"symmetric": symmetric, "lm_head": "int8", "accuracy_level": 4}
    im = export(outlier_llama, tmp_path / "im", target="cpu-x86", precision="int4", calibration=calib,
                int4={**int4, "algorithm": "imatrix"})
    rtn = export(outlier_llama, tmp_path / "rtn", target="cpu-x86", precision="int4", int4={**int4, "algorithm": "rtn"})
    rec = json.loads((im / "edgetune.json").read_text())["results"]
    info = rec["quantization"]["imatrix"]
    # every body MatMul of 2 layers (q/k/v, o, gate, up, down) searched, none worse than RTN on the weighted measure
    assert info["nodes"] == 10 and info["skipped"] == [] and info["weighted_error_vs_rtn"] < 0.9, info
    assert rec["quantization"]["calibration"]["samples"] == 4
    # the tied embedding reads the int8 head's table (one matrix, not an int8 head + an int4 copy)
    assert rec["embeddings"] == "int8 GatherBlockQuantized, shared with lm_head"
    # the same nodes, attributes and kernels as the builder's RTN: only the values differ
    assert matmulnbits_attributes(im) == matmulnbits_attributes(rtn)
    assert rec["kernel_paths"]["slow"] == [] and rec["kernel_paths"]["prepacked"] == 11
    assert all(a["zero_points"] != symmetric for a in matmulnbits_attributes(im, skip_prefix="/lm_head/"))
    err = _held_out_error(outlier_llama, {"imatrix": im, "rtn": rtn})
    assert err["imatrix"] < 0.9 * err["rtn"], err


def test_imatrix_without_calibration_texts_reads_the_projects_set(tiny_llama, tmp_path):
    # as awq/gptq: the project's generic LLM set, with a warning, and the record names it
    out = export(tiny_llama, tmp_path / "im", target="cpu-x86", precision="int4", int4={"algorithm": "imatrix"})
    q = json.loads((out / "edgetune.json").read_text())["results"]["quantization"]
    assert q["calibration"]["file"].endswith("llm-general.jsonl") and q["calibration"]["samples"] > 0
    # the profile's int4 head is a MatMul of the same pass: searched too (10 body MatMuls + lm_head)
    assert q["imatrix"]["nodes"] == 11 and q["imatrix"]["weighted_error_vs_rtn"] < 1.0


def test_gptq_feedback_lowers_the_output_error_a_weight_search_cannot():
    """On correlated inputs, moving each column's rounding error onto the later columns (GPTQ) beats rounding every
    weight on its own, measured as the output error tr(dW H dW^T); same layout as the search's integers."""
    rng = np.random.default_rng(3)
    n, k, block = 48, 128, 32
    mix = rng.normal(size=(k, k)).astype(np.float32) / np.sqrt(k)
    x = rng.normal(size=(2048, k)).astype(np.float32) @ (np.eye(k, dtype=np.float32) + 2 * mix)  # correlated channels
    h = x.T @ x / len(x)
    w = rng.normal(size=(n, k)).astype(np.float32)
    imp = np.diag(h).astype(np.float32)
    for symmetric in (False, True):
        q, s, z, _ = imatrix.search(w, imp, block=block, symmetric=symmetric)
        qg, sg, zg = imatrix.gptq(w, h, imp, block=block, symmetric=symmetric)
        assert qg.shape == q.shape and qg.dtype == np.uint8 and sg.shape == s.shape and (zg is None) == symmetric
        assert qg.max() <= 15

        def deq(q_, s_, z_):
            zz = 8.0 if z_ is None else z_.astype(np.float32)[..., None]
            return ((q_.reshape(n, k // block, block).astype(np.float32) - zz) * s_[..., None]).reshape(n, k)

        e_search, e_gptq = imatrix.output_error(w, deq(q, s, z), h), imatrix.output_error(w, deq(qg, sg, zg), h)
        assert e_gptq < 0.8 * e_search, (symmetric, e_gptq, e_search)


def test_gptq_reads_the_upper_cholesky_factor_of_h_inverse_without_inverting_h():
    """GPTQ's column loop reads U with H^-1 = U^T U; :func:`imatrix._inverse_cholesky` gets it from one Cholesky of the
    reversed H and a triangular solve. Against the definition (invert, then factor) on correlated inputs with
    outlier channels, dampened as gptq() does."""
    rng = np.random.default_rng(5)
    k = 96
    x = rng.normal(size=(400, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))
    x[:, [3, 50]] *= 40.0
    h = x.T @ x / len(x)
    h[np.diag_indices(k)] += imatrix.DAMP * np.mean(np.diag(h))
    u = imatrix._inverse_cholesky(h)
    assert u.shape == (k, k) and np.array_equal(u, np.triu(u)) and np.all(np.diag(u) > 0)
    ref = np.linalg.cholesky(np.linalg.inv(h)).T
    np.testing.assert_allclose(u, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    np.testing.assert_allclose(u.T @ u @ h, np.eye(k), atol=1e-9)


def test_imatrix_gptq_export_is_rtns_graph_closer_to_the_model(outlier_llama, calib, tmp_path):
    int4 = {"symmetric": False, "lm_head": "int8", "accuracy_level": 4}
    g = export(outlier_llama, tmp_path / "g", target="cpu-x86", precision="int4", calibration=calib,
               int4={**int4, "algorithm": "imatrix-gptq"})
    rtn = export(outlier_llama, tmp_path / "rtn", target="cpu-x86", precision="int4", int4={**int4, "algorithm": "rtn"})
    q = json.loads((g / "edgetune.json").read_text())["results"]["quantization"]
    # every body MatMul rounded with feedback; the calibration inputs' output error well under RTN's
    assert q["imatrix"]["method"] == "gptq" and q["imatrix"]["nodes"] == 10 and q["imatrix"]["output_error_vs_rtn"] < 0.8, q["imatrix"]
    assert matmulnbits_attributes(g) == matmulnbits_attributes(rtn)  # the same nodes and kernels: only values differ
    # on texts no calibration used: closer to the float model than RTN (4 short calibration texts: GPTQ's correlations
    # are fitted on few tokens, so the held-out gain is smaller than on the calibration inputs)
    err = _held_out_error(outlier_llama, {"gptq": g, "rtn": rtn})
    assert err["gptq"] < 0.95 * err["rtn"], err


def test_gptq_correlations_too_large_for_memory_go_to_disk_or_are_refused_before_the_calibration_pass(tiny_llama, tmp_path,
                                                                                                    monkeypatch):
    from edgetune.errors import BadInput

    texts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    hess, imp = imatrix.collect_hessians(tiny_llama, texts)
    q, k = hess["model.layers.0.self_attn.q_proj"], hess["model.layers.0.self_attn.k_proj"]
    assert q is k and q.shape == (64, 64) and np.allclose(q, q.T)  # q/k/v read one tensor: one H
    assert hess["model.layers.0.self_attn.o_proj"] is not q and hess["model.layers.0.mlp.up_proj"] is hess["model.layers.0.mlp.gate_proj"]
    assert np.allclose(imp["model.layers.0.mlp.down_proj"], np.diag(hess["model.layers.0.mlp.down_proj"]))
    assert not hasattr(hess, "record")
    # 64x64 float64 is 32 KB per distinct input: not in 10 KB of memory; without a folder to spill to, refused
    with pytest.raises(BadInput, match="GPTQ's input correlations need more than"):
        imatrix.collect_hessians(tiny_llama, texts, max_bytes=10_000)
    # with one: every distinct input's X on disk (11 tokens x K float32), each H computed from it when asked for, the
    # same H and importance as in memory
    spilled, imp2 = imatrix.collect_hessians(tiny_llama, texts, max_bytes=10_000, spill_dir=tmp_path / "x")
    assert spilled.record["kept"] == "disk" and spilled.record["memory_needed_bytes"] > 10_000
    files = sorted((tmp_path / "x").iterdir())
    assert len(files) == 4 * 2 + 1 and all(f.stat().st_size in (11 * 64 * 4, 11 * 128 * 4) for f in files), files  # 4 per layer + the head
    assert sorted(spilled) == sorted(hess)
    for name in hess:
        assert np.allclose(spilled[name], hess[name], rtol=1e-5, atol=1e-7), name
        assert np.allclose(imp2[name], imp[name], rtol=1e-5, atol=1e-7), name
    assert spilled["model.layers.1.self_attn.q_proj"] is spilled["model.layers.1.self_attn.v_proj"]  # computed once
    # and without the disk for the inputs: refused before the calibration pass, naming both sizes and the folder
    import shutil as _shutil

    monkeypatch.setattr(_shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(BadInput, match=r"or 0\.0 GiB of disk in .* \(0\.0 GiB free\)"):
        imatrix.collect_hessians(tiny_llama, texts, max_bytes=10_000, spill_dir=tmp_path / "y")


def test_an_imatrix_gptq_export_whose_correlations_outgrow_memory_spills_them_and_matches_the_in_memory_one(
        outlier_llama, calib, tmp_path, monkeypatch):
    # what a 1.5B+ model meets on a 24 GiB machine (Qwen2.5-1.5B's shapes: 18.3 GiB of float64 sums), made with a tiny model and a tiny limit
    int4 = {"symmetric": False, "lm_head": "int8", "accuracy_level": 4, "algorithm": "imatrix-gptq"}
    mem = export(outlier_llama, tmp_path / "mem", target="cpu-x86", precision="int4", calibration=calib, int4=int4)
    monkeypatch.setenv("EDGETUNE_MEMORY_LIMIT", "64K")
    disk = export(outlier_llama, tmp_path / "disk", target="cpu-x86", precision="int4", calibration=calib, int4=int4)
    qm, qd = (json.loads((d / "edgetune.json").read_text())["results"]["quantization"]["imatrix"] for d in (mem, disk))
    assert qm["correlations"] == {"kept": "memory"} and qd["correlations"]["kept"] == "disk", qd
    assert qd["nodes"] == qm["nodes"] == 10 and abs(qd["output_error_vs_rtn"] - qm["output_error_vs_rtn"]) < 1e-3 * qm["output_error_vs_rtn"]
    assert matmulnbits_attributes(disk) == matmulnbits_attributes(mem)
    import onnx
    from onnx import numpy_helper

    def weights(d):  # every MatMulNBits node's packed integers
        m = onnx.load(str(d / "model.onnx"))
        inits = {i.name: i for i in m.graph.initializer}
        return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in m.graph.node if n.op_type == "MatMulNBits"}

    wm, wd = weights(mem), weights(disk)
    assert wm.keys() == wd.keys() and len(wm) >= 8
    same = sum(int((wm[n] == wd[n]).sum()) for n in wm) / sum(wm[n].size for n in wm)
    assert same > 0.999, same  # H from one product instead of a sum of per-text ones: float64 rounding, a rare tie flips
    assert not any(p.name == "correlations" for p in disk.rglob("*"))  # the spilled inputs do not ship


@pytest.mark.parametrize("algorithm", ["imatrix", "imatrix-gptq"])
def test_a_block_wider_than_a_linears_input_is_searched_over_its_padding(outlier_llama, calib, tmp_path, algorithm):
    # block 128 on a 64-wide hidden size (SmolLM2's 576 in blocks of 128 alike): MatMulNBits pads the last block, and
    # the search pads the same way (zero weights of no importance), so no node falls back to RTN's values
    int4 = {"symmetric": False, "lm_head": "int8", "accuracy_level": 4, "block_size": 128}
    im = export(outlier_llama, tmp_path / "im", target="cpu-x86", precision="int4", calibration=calib,
                int4={**int4, "algorithm": algorithm})
    rtn = export(outlier_llama, tmp_path / "rtn", target="cpu-x86", precision="int4", int4={**int4, "algorithm": "rtn"})
    info = json.loads((im / "edgetune.json").read_text())["results"]["quantization"]["imatrix"]
    assert info["nodes"] == 10 and info["skipped"] == [], info
    assert (info.get("output_error_vs_rtn") or info.get("weighted_error_vs_rtn")) < 0.9, info
    assert matmulnbits_attributes(im) == matmulnbits_attributes(rtn)  # RTN's graph: only values differ
    from edgetune import onnx_graph

    ks = [onnx_graph.attributes(n)["K"] for n in onnx_graph.read(im / "model.onnx").graph.node if n.op_type == "MatMulNBits"]
    assert sum(k % 128 != 0 for k in ks) >= 8, ks  # q/k/v/o/gate/up of both layers read 64 inputs: a padded block each
    err = _held_out_error(outlier_llama, {"im": im, "rtn": rtn})
    assert err["im"] < 0.95 * err["rtn"], err
