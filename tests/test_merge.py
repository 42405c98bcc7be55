"""Merge gate: merged == base + adapter within tolerance; tampered merges and corrupt adapters are refused."""

from __future__ import annotations

import json

import pytest

from edgetune.cli import main
from edgetune.errors import CheckFailed
from edgetune.merge import merge


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def make_adapter(base, out, *, dora=False, task="CAUSAL_LM"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                     use_dora=dora, task_type=task)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def lora(tiny_llama, module_tmp):
    return make_adapter(tiny_llama, module_tmp("a") / "lora")


@pytest.mark.parametrize("dora", [False, True])
def test_merge_gate_passes_and_changes_weights(tiny_llama, tmp_path, dora, lora):
    import torch
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_llama, tmp_path / "dora", dora=True) if dora else lora
    out = merge(tiny_llama, adapter, tmp_path / "merged")
    gate = json.loads((out / "edgetune.json").read_text())["results"]["gate"]
    assert gate["passed"] and gate["max_abs_diff"] < 1e-3 and gate["top1_agreement"] == 1.0
    assert gate["use_dora"] is dora
    assert "vs_trained_4bit" not in gate  # a LoRA trained on the float base has no 4-bit reference
    ids = torch.tensor([[5, 9, 30, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()(ids).logits
    assert (merged - base).abs().max() > 1e-3  # the adapter is non-trivial and landed in the weights
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_tampered_merge_fails_gate(tiny_llama, lora, tmp_path, monkeypatch):
    import torch
    from peft.tuners.tuners_utils import BaseTuner

    real = BaseTuner.merge_and_unload

    def tampered(self, *a, **k):
        m = real(self, *a, **k)
        with torch.no_grad():
            m.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        return m

    monkeypatch.setattr(BaseTuner, "merge_and_unload", tampered)
    with pytest.raises(CheckFailed, match="merge gate failed"):
        merge(tiny_llama, lora, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cli_missing_config_exits_2(tiny_llama, lora, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    code, _, err = run_cli(["merge", str(tiny_llama), str(broken), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "adapter_config.json" in err and "Traceback" not in err


def test_cli_not_safetensors_exits_2(tiny_llama, lora, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 not a safetensors file")
    code, _, err = run_cli(["merge", str(tiny_llama), str(broken), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "safetensors" in err


def test_cli_wrong_shapes_exits_2(tiny_llama, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    w = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.zeros(w[key].shape[0] + 3, w[key].shape[1])
    save_file(w, str(adapter / "adapter_model.safetensors"))
    code, _, err = run_cli(["merge", str(tiny_llama), str(adapter), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "does not fit" in err
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ QLoRA: distance to what was trained

def _as_qlora(adapter, out, **options):
    """A copy of ``adapter`` whose finetune record says it was trained with QLoRA (what edgetune finetune writes)."""
    import shutil

    shutil.copytree(adapter, out)
    (out / "edgetune.json").write_text(json.dumps({"format": 1, "stage": "finetune", "options": {"method": "qlora", **options}}))
    return out


def _trained_logits(base, adapter, quant_type, double_quant, ids):
    """Independent reference: the bitsandbytes 4-bit base + the unmerged adapter, as in training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, dtype=torch.float32, device_map={"": "cpu"})
    with torch.no_grad():
        return PeftModel.from_pretrained(m, str(adapter)).eval()(ids).logits


def test_qlora_merge_measures_distance_to_the_4bit_model(tiny_llama, lora, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("bitsandbytes")
    adapter = _as_qlora(lora, tmp_path / "q", quant_type="fp4", double_quant=False, compute_dtype="auto", precision="auto")
    out = merge(tiny_llama, adapter, tmp_path / "merged")
    rec = json.loads((out / "edgetune.json").read_text())
    gate = rec["results"]["gate"]
    assert gate["passed"] and gate["max_abs_diff"] < 1e-3  # merged == float base + adapter, as for any LoRA
    v = gate["vs_trained_4bit"]
    assert (v["quant_type"], v["double_quant"], v["compute_dtype"], v["source"]) == ("fp4", False, "float32", "finetune record")
    assert v["linear4bit_layers"] == 14 and v["passed"] is None  # informational without a tolerance
    assert v["max_abs_diff"] > 1e-3 and 0 < v["kl"] < 0.5 and v["top1_agreement"] > 0.5
    assert rec["options"]["vs_trained_4bit"]["quant_type"] == "fp4"
    # the figure is the real distance: recompute it from an independent 4-bit model on one gate prompt
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_llama))("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    d = (merged - _trained_logits(tiny_llama, adapter, "fp4", False, ids)).abs().max().item()
    assert 1e-3 < d <= v["max_abs_diff"] + 1e-5
    # other settings give another 4-bit model: the settings really reach bitsandbytes
    d_nf4 = (merged - _trained_logits(tiny_llama, adapter, "nf4", True, ids)).abs().max().item()
    assert abs(d_nf4 - d) > 1e-4


def test_qlora_flag_defaults_and_tolerance(tiny_llama, lora, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    code, out, _ = run_cli(["merge", str(tiny_llama), str(lora), "--out", str(tmp_path / "m"), "--qlora",
                            "--vs-4bit-max-kl", "1.0", "--json"], capsys)
    assert code == 0
    v = json.loads(out)["gate"]["vs_trained_4bit"]
    assert (v["quant_type"], v["double_quant"], v["source"]) == ("nf4", True, "defaults (nf4, double quantization)")
    assert v["passed"] is True and v["max_kl"] == 1.0
    code, _, err = run_cli(["merge", str(tiny_llama), str(lora), "--out", str(tmp_path / "bad"), "--qlora",
                            "--vs-4bit-max-kl", "0"], capsys)  # the 4-bit base differs from the float one: KL > 0
    assert code == 1 and "too far from the 4-bit base + adapter" in err and "top-1=" in err
    assert not (tmp_path / "bad").exists()
    # an impossible bound is a usage error before any work (a top-1 agreement is at most 1)
    code, _, err = run_cli(["merge", str(tiny_llama), str(lora), "--out", str(tmp_path / "bad"), "--qlora",
                            "--vs-4bit-min-top1", "1.01"], capsys)
    assert code == 2 and "1.01" in err and not (tmp_path / "bad").exists()
    # --no-qlora wins over the record
    adapter = _as_qlora(lora, tmp_path / "q")
    code, out, _ = run_cli(["merge", str(tiny_llama), str(adapter), "--out", str(tmp_path / "n"), "--no-qlora", "--json"], capsys)
    assert code == 0 and "vs_trained_4bit" not in json.loads(out)["gate"]



def test_a_bf16_base_merges_into_bf16_without_an_fp32_copy(tiny_llama, lora, tmp_path, monkeypatch):
    """--dtype auto (the default) keeps a bf16 base's dtype, as peft's merge_and_unload does: the merged checkpoint is
    bf16 (half the disk and memory of the fp32 one: a 3.8B model's merge peaked at 22 GiB in fp32), its config says
    so, the gate's reference is base + adapter computed in fp32 (the stored weights widened one module at a time, never
    a whole fp32 copy), and the merged model is the fp32 merge rounded to bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune import model_input
    from tiny_models import bf16_copy

    bf16 = bf16_copy(tiny_llama, tmp_path / "bf16")
    widened = []
    real = model_input.compute_in_fp32
    monkeypatch.setattr(model_input, "compute_in_fp32", lambda m, **kw: widened.append(kw) or real(m, **kw))
    out = merge(bf16, lora, tmp_path / "merged")
    rec = json.loads((out / "edgetune.json").read_text())
    assert rec["options"]["dtype"] == "auto" and rec["results"]["dtype"] == "bfloat16" and widened
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    gate = rec["results"]["gate"]
    assert gate["passed"] and gate["top1_agreement"] == 1.0 and gate["limits"]["top1_agreement"] is None, gate
    assert gate["max_abs_diff"] <= gate["limits"]["max_abs_diff"] == 1.0
    full = merge(bf16, lora, tmp_path / "merged-fp32", dtype="float32")
    assert json.loads((full / "config.json").read_text())["dtype"] == "float32"
    a = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32)
    assert next(AutoModelForCausalLM.from_pretrained(str(out)).parameters()).dtype == torch.bfloat16
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        # one bf16 rounding of the fp32 merge (peft may round the delta first: two half-ulps)
        assert torch.allclose(p, q.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6), name
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # bf16, not the fp32 values
    # an fp32 base still merges into fp32 (the demo's dequantized GGUF)
    assert json.loads((merge(tiny_llama, lora, tmp_path / "m32") / "config.json").read_text())["dtype"] == "float32"
