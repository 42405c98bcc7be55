"""int4 algorithm 'awq': activation-aware scales folded exactly into the checkpoint, then the builder's RTN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.errors import BadInput
from edgetune.export import export
from edgetune.export.decoder.builder import matmulnbits_attributes

TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
         "Turn on the kitchen lights.", "def f(x):\n    return x**2", "Set the thermostat to 21 degrees.",
         "A list: apples, pears, plums and three kinds of cherries."]


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, module_tmp):
    """The tiny Llama with a few input channels of every RMSNorm 30x larger: the activation outliers AWQ is for."""
    import torch
    from transformers import AutoModelForCausalLM

    out = module_tmp("outlier") / "model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:4]] *= 30.0
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tiny_llama.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def calib(module_tmp):
    p = module_tmp("calib") / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    return p


def _logits(folder, ids):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens(np.array([ids], dtype=np.int32))
    return np.asarray(gen.get_logits()).reshape(-1)


def _held_out_error(model_dir, exports: dict) -> dict[str, float]:
    """Per export, the summed mean |dlogit| of its last-token logits vs the float model on texts no calibration used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    err = dict.fromkeys(exports, 0.0)
    for text in TEXTS[4:]:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        for name, folder in exports.items():
            err[name] += float(np.abs(_logits(folder, ids) - ref).mean())
    return err


def test_ort_dequant_is_the_qat_grid():
    """The search rounds on onnxruntime's own RTN; for symmetric int4 that is the grid QAT trains on too."""
    import torch

    from edgetune.finetune.qat import fake_quant
    from edgetune.export.decoder.awq import ort_dequant

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ort_dequant(w, block_size=32, symmetric=True), fake_quant(w, 4, 32))
    asym = ort_dequant(w, block_size=32, symmetric=False)
    assert float((asym - w).abs().max()) < float(w.abs().max()) / 15 and not torch.equal(asym, fake_quant(w, 4, 32))


def test_awq_export_is_exact_in_float_plain_on_the_kernel_and_beats_rtn(outlier_llama, calib, tmp_path):
    awq = export(outlier_llama, tmp_path / "awq", target="cpu-x86", precision="int4", int4={"algorithm": "awq"}, calibration=calib)
    rtn = export(outlier_llama, tmp_path / "rtn", target="cpu-x86", precision="int4")
    rec = json.loads((awq / "edgetune.json").read_text())["results"]
    info = rec["quantization"]["awq"]
    # 2 layers x 4 groups, every one searched; the folds leave the float model's logits where they were
    assert info["groups"] == 8 and len(info["table"]) == 8 and {r["group"] for r in info["table"]} == {"attn-in", "mlp-in", "down", "o"}
    assert info["float_logit_check"]["max_abs_diff"] <= 1e-4 * max(1.0, info["float_logit_check"]["max_abs_logit"])
    assert all(r["err_awq"] <= r["err_rtn"] for r in info["table"]) and info["output_error_vs_rtn"] < 0.9
    assert rec["quantization"]["calibration"]["samples"] == 4
    # the builder's plain symmetric int4 on the prepacked kernel: AWQ adds no node and no zero point
    body = matmulnbits_attributes(awq, skip_prefix="/lm_head/")
    assert sum(a["count"] for a in body) == 10 and all(a["bits"] == 4 and a["block_size"] == 32 and not a["zero_points"] for a in body)
    assert rec["kernel_paths"]["slow"] == [] and rec["kernel_paths"]["prepacked"] == 11 and rec["tokenizer_check"]["mismatches"] == 0
    # end to end on texts it was not calibrated on: closer to the float model than RTN of the same weights
    err = _held_out_error(outlier_llama, {"awq": awq, "rtn": rtn})
    assert err["awq"] < 0.8 * err["rtn"], err


def test_awq_is_refused_where_it_cannot_be_exact(tiny_llama, calib, tmp_path):
    import shutil

    olmo = tmp_path / "olmo"  # a LayerNorm without weights: nothing to fold x / s into
    shutil.copytree(tiny_llama, olmo)
    cfg = json.loads((olmo / "config.json").read_text())
    (olmo / "config.json").write_text(json.dumps({**cfg, "model_type": "olmo", "architectures": ["OlmoForCausalLM"]}))
    with pytest.raises(BadInput, match="layer layout of model type 'olmo'"):
        export(olmo, tmp_path / "p", target="cpu-x86", precision="int4", int4={"algorithm": "awq"}, calibration=calib)
    with pytest.raises(BadInput, match="mixed precision works with"):
        export(tiny_llama, tmp_path / "m", target="cpu-x86", precision="int4", int4={"algorithm": "awq"}, mixed={"fraction": 0.5})
    assert not (tmp_path / "p").exists() and not (tmp_path / "m").exists()


def _with_outliers(model, norms, out, src):
    """Save ``model`` with 4 input channels of each of its ``norms`` 30x larger (Gemma's 1 + w form too)."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in norms:
                norm = getattr(layer, name)
                idx = torch.randperm(norm.weight.numel(), generator=g)[:4]
                norm.weight[idx] = 30.0 * (norm.weight[idx] + 1) - 1 if "Gemma" in type(norm).__name__ else 30.0 * norm.weight[idx]
    model.save_pretrained(str(out), safe_serialization=True)
    for f in src.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_awq_on_phi3_fused_qkv_and_gate_up_is_exact_and_beats_rtn(tiny_phi3, calib, tmp_path):
    """Phi-3 packs q/k/v and gate/up: the folds scale the fused columns and divide the v / up row slices."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), torch_dtype=torch.float32)
    src = _with_outliers(model, ("input_layernorm", "post_attention_layernorm"), tmp_path / "phi3", tiny_phi3)
    awq = export(src, tmp_path / "awq", target="cpu-x86", precision="int4", int4={"algorithm": "awq"}, calibration=calib)
    rtn = export(src, tmp_path / "rtn", target="cpu-x86", precision="int4")
    info = json.loads((awq / "edgetune.json").read_text())["results"]["quantization"]["awq"]
    assert info["groups"] == 8 and {r["group"] for r in info["table"]} == {"attn-in", "mlp-in", "down", "o"}
    assert info["float_logit_check"]["max_abs_diff"] <= 1e-4 * max(1.0, info["float_logit_check"]["max_abs_logit"])
    assert all(r["err_awq"] <= r["err_rtn"] for r in info["table"]) and info["output_error_vs_rtn"] < 0.9
    err = _held_out_error(src, {"awq": awq, "rtn": rtn})
    assert err["awq"] < 0.9 * err["rtn"], err


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_awq_folds_into_gemmas_one_plus_w_norms_exactly(family, tmp_path):
    """Gemma's RMSNorm multiplies by (1 + w): x / s is w' = (1 + w) / s - 1, exact in float (checked on the logits
    inside scale_checkpoint), and every group's int4 error is at most RTN's."""
    import torch
    import transformers

    from edgetune.export.decoder.awq import scale_checkpoint
    from tiny_models import build_bpe_tokenizer

    src = tmp_path / family
    src.mkdir()
    tok = build_bpe_tokenizer(src)
    cls = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
           "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[family]
    torch.manual_seed(0)  # head_dim 64, GQA 2:1, a sliding window shorter than the calibration texts
    cfg = cls[0](vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, sliding_window=8, max_position_embeddings=256,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = cls[1](cfg).eval()
    src = _with_outliers(model, ("input_layernorm", "pre_feedforward_layernorm"), src, src)
    ids = [tok.encode(t) for t in TEXTS[:4]]
    info = scale_checkpoint(src, tmp_path / "scaled", token_ids=ids, q={"block_size": 32, "symmetric": True})
    assert info["groups"] == 8 and info["scaled_groups"] >= 2
    assert all(r["err_awq"] <= r["err_rtn"] for r in info["table"]) and info["output_error_vs_rtn"] < 1.0
    scaled = cls[1].from_pretrained(str(tmp_path / "scaled"), torch_dtype=torch.float32).eval()
    original = cls[1].from_pretrained(str(src), torch_dtype=torch.float32).eval()
    x = torch.tensor([tok.encode(" ".join(TEXTS))])  # past the sliding window
    with torch.no_grad():
        assert torch.allclose(scaled(input_ids=x).logits, original(input_ids=x).logits, atol=1e-4, rtol=1e-4)
