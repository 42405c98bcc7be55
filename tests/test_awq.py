"""int4 algorithm 'awq': activation-aware scales folded exactly into the checkpoint, then the builder's RTN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.errors import BadInput
from edgetune.export import export
from edgetune.llm.export import matmulnbits_attributes

TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
         "Turn on the kitchen lights.", "def f(x):\n    return x**2", "Set the thermostat to 21 degrees.",
         "A list: apples, pears, plums and three kinds of cherries."]


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with a few input channels of every RMSNorm 30x larger: the activation outliers AWQ is for."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("outlier") / "model"
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
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    return p


def _logits(folder, ids):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens(np.array([ids], dtype=np.int32))
    return np.asarray(gen.get_logits()).reshape(-1)


def test_ort_dequant_is_the_qat_grid():
    """The search rounds on onnxruntime's own RTN; for symmetric int4 that is the grid QAT trains on too."""
    import torch

    from edgetune.finetune.qat import fake_quant
    from edgetune.llm.awq import ort_dequant

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ort_dequant(w, block_size=32, symmetric=True), fake_quant(w, 4, 32))
    asym = ort_dequant(w, block_size=32, symmetric=False)
    assert float((asym - w).abs().max()) < float(w.abs().max()) / 15 and not torch.equal(asym, fake_quant(w, 4, 32))


def test_awq_export_is_exact_in_float_plain_on_the_kernel_and_beats_rtn(outlier_llama, calib, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    tok = AutoTokenizer.from_pretrained(str(outlier_llama))
    model = AutoModelForCausalLM.from_pretrained(str(outlier_llama), torch_dtype=torch.float32).eval()
    err = {"awq": 0.0, "rtn": 0.0}
    for text in TEXTS[4:]:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        for name, folder in (("awq", awq), ("rtn", rtn)):
            err[name] += float(np.abs(_logits(folder, ids) - ref).mean())
    assert err["awq"] < 0.8 * err["rtn"], err


def test_awq_is_refused_where_it_cannot_be_exact(tiny_phi3, tiny_llama, calib, tmp_path):
    with pytest.raises(BadInput, match="layer layout of model type 'phi3'"):
        export(tiny_phi3, tmp_path / "p", target="cpu-x86", precision="int4", int4={"algorithm": "awq"}, calibration=calib)
    with pytest.raises(BadInput, match="mixed precision works with"):
        export(tiny_llama, tmp_path / "m", target="cpu-x86", precision="int4", int4={"algorithm": "awq"}, mixed={"fraction": 0.5})
    assert not (tmp_path / "p").exists() and not (tmp_path / "m").exists()
