"""Quantization-aware LoRA (`finetune --quant-aware int4`): the grid is the export's, and merge -> int4 export
reproduces the model the adapter was trained as."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.errors import BadInput
from edgetune.finetune import FinetuneOptions, finetune

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "data" / "smarthome_train.jsonl"
IDS = [5, 17, 42, 99, 7, 3, 250, 11]


def _ort_dequant(w_kn: np.ndarray, bits: int, block: int) -> np.ndarray:
    """onnxruntime's own MatMulNBits RTN (what the builder calls), dequantized: [K, N] -> [N, K]."""
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w_kn.shape
    kb = (k + block - 1) // block
    scales = np.zeros((n * kb,), dtype=np.float32)
    if bits == 4:
        packed = np.zeros((n, kb, block // 2), dtype=np.uint8)
        quantize_matmul_4bits(packed, w_kn, scales, np.zeros((n * ((kb + 1) // 2),), np.uint8), block, n, k, True)
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, kb, block).astype(np.float32)
    else:
        packed = np.zeros((n, kb, block), dtype=np.uint8)
        quantize_matmul_8bits(packed, w_kn, scales, np.zeros((n * kb,), np.uint8), block, n, k, True)
        q = packed.astype(np.float32)
    mid = 1 << (bits - 1)
    return ((q - mid) * scales.reshape(n, kb, 1)).reshape(n, kb * block)[:, :k]


@pytest.mark.parametrize("bits,block,k", [(4, 32, 128), (4, 16, 96), (4, 64, 200), (8, 32, 128)])
def test_fake_quant_is_onnxruntimes_grid(bits, block, k):
    import torch

    from edgetune.finetune.qat import fake_quant

    rng = np.random.default_rng(bits * block + k)
    w = rng.standard_normal((48, k)).astype(np.float32)  # [out, in] like nn.Linear
    w[0, :block] = 0.0  # an all-zero block (scale 0)
    w[1, :block] = np.round(w[1, :block] * 4) / 4  # values on a coarse grid: ties at the rounding boundary
    w[2, 3] = -7.0  # a negative extreme (the signed maximum sets the scale)
    got = fake_quant(torch.from_numpy(w), bits, block).numpy()
    want = _ort_dequant(np.ascontiguousarray(w.T), bits, block)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(w).max()
    assert np.unique(got[5, :block]).size <= (1 << bits)


def test_options_are_checked_before_any_work():
    for kw, words in [({"quant_aware": "int3"}, "unknown --quant-aware"),
                      ({"quant_aware": "int4", "method": "dora"}, "needs --method lora"),
                      ({"quant_aware": "int4", "method": "qlora"}, "needs --method lora"),
                      ({"quant_aware": "int4", "quant_aware_block_size": 48}, "power of two"),
                      ({"quant_aware": "int4", "quant_aware_lm_head": "int2"}, "lm-head"),
                      ({"quant_aware": "int4", "deepspeed": "zero2"}, "--deepspeed"),
                      ({"quant_aware_distill": 1.0}, "needs --quant-aware"),
                      ({"quant_aware": "int4", "quant_aware_distill": -1.0}, ">= 0")]:
        with pytest.raises(BadInput, match=words):
            FinetuneOptions(**kw).check()


def test_classifier_refused(tiny_bert, tmp_path):
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"lights {x}", "label": x}) + "\n" for x in ["on", "off"] * 4))
    with pytest.raises(BadInput, match="decoder LLMs"):
        finetune(tiny_bert, data, tmp_path / "a", options=FinetuneOptions(quant_aware="int4", max_steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.work").exists()


@pytest.fixture(scope="module")
def qat_adapter(tiny_llama, tmp_path_factory):
    opts = FinetuneOptions(max_steps=8, save_steps=8, batch_size=4, max_seq_len=96, lr=3e-3, limit=48, seed=0,
                           quant_aware="int4", quant_aware_block_size=32, quant_aware_lm_head="int4")
    return finetune(tiny_llama, CHAT, tmp_path_factory.mktemp("qat") / "adapter", options=opts)


def test_quant_aware_training_records_its_grid_and_learns(qat_adapter):
    r = json.loads((qat_adapter / "edgetune.json").read_text())["results"]
    qa = r["quant_aware"]
    assert qa["bits"] == 4 and qa["block_size"] == 32 and qa["lm_head"] == "int4" and qa["lora_linears"] == 14
    assert "lm_head int4" in qa["frozen_quantized"]
    assert r["last_loss"] < r["first_loss"] and r["eval_loss"] < r["base_eval_loss"]


@pytest.fixture(scope="module")
def qat_merged(tiny_llama, qat_adapter, tmp_path_factory):
    from edgetune.merge import merge

    return merge(tiny_llama, qat_adapter, tmp_path_factory.mktemp("qat-merged") / "m")


def test_merge_then_int4_export_is_the_trained_model(tiny_llama, qat_adapter, qat_merged, tmp_path):
    """The adapter's QAT forward (torch) == the int4 ONNX export of the merged model; the plain export is not."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.finetune import qat

    merged = qat_merged
    gate = json.loads((merged / "edgetune.json").read_text())["results"]["gate"]
    vs = gate["vs_fake_quant"]
    assert vs["int4_vs_trained"]["passed"] and vs["int4_vs_trained"]["max_abs_diff"] < 1e-4
    assert vs["merged_vs_trained"]["max_abs_diff"] > 10 * vs["int4_vs_trained"]["max_abs_diff"]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    trained = PeftModel.from_pretrained(model, str(qat_adapter)).eval()
    qat.apply(trained, qat.QATSpec())
    with torch.no_grad():
        want = trained(torch.tensor([IDS])).logits[0].numpy()
    x = export(merged, tmp_path / "x", target="cpu-x86", precision="int4")
    assert json.loads((x / "edgetune.json").read_text())["results"]["quantization"]["quant_aware"]["matches"] is True
    got = dev.logits(dev.load(x), IDS)
    assert np.abs(got - want).max() < 1e-4
    fp32 = export(merged, tmp_path / "f", target="cpu-x86", precision="fp32")
    assert np.abs(dev.logits(dev.load(fp32), IDS) - want).max() > 100 * np.abs(got - want).max()


def test_cli_flags_reach_the_record(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import cli

    out = tmp_path / "a"
    res = CliRunner().invoke(cli, ["finetune", str(tiny_llama), str(CHAT), "-o", str(out), "--max-steps", "2",
                                   "--limit", "16", "--max-seq-len", "192", "--quant-aware", "int4",
                                   "--quant-aware-lm-head", "int8", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["quant_aware"]["lm_head"] == "int8" and "lm_head int8" in payload["quant_aware"]["frozen_quantized"]


def test_export_on_another_grid_says_so(qat_merged, tmp_path, capsys):
    from edgetune.export import export

    x = export(qat_merged, tmp_path / "x", target="cpu-x86", precision="int4", int4={"block_size": 64})
    qa = json.loads((x / "edgetune.json").read_text())["results"]["quantization"]["quant_aware"]
    assert qa["matches"] is False and qa["differences"] == ["block_size 64 (trained for 32)"]
    assert "fine-tuned quant-aware" in capsys.readouterr().err


def _config(tmp_path, targets: str, extra: str = "") -> Path:
    cfg = tmp_path / "b.toml"
    cfg.write_text(f"""name = "q"
[model]
base = "smollm2"
[data]
train = "{CHAT}"
[finetune]
method = "lora"
quant_aware = "int4"
{extra}
{targets}
""")
    return cfg


def test_build_takes_the_grid_from_its_targets_and_refuses_a_mismatch(tmp_path):
    from edgetune.build import load_config

    cfg, _ = load_config(_config(tmp_path, '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n'))
    ft = cfg.finetune.model_dump()
    assert ft["quant_aware_block_size"] == 32 and ft["quant_aware_lm_head"] == "int4"
    board = tmp_path / "board.toml"
    board.write_text('name = "board"\nextends = "cpu-x86"\n[quantization.int4]\nblock_size = 64\n')
    two = '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n[[targets]]\nname = "board.toml"\nprecision = "int4"\n'
    with pytest.raises(BadInput, match="block_size 64 \\(trained for 32\\)"):
        load_config(_config(tmp_path, two))
    with pytest.raises(BadInput, match="no target exports the merged model at int4"):
        load_config(_config(tmp_path, '[[targets]]\nname = "cpu-x86"\nprecision = "gguf"\nadapter = "float"\n'))
    with pytest.raises(BadInput, match="needs --method lora"):
        load_config(_dora(tmp_path))
    # a target's own int4 table is the grid too: lm_head int8 there trains the head at int8
    h8 = '[[targets]]\nname = "cpu-x86-avx512"\nprecision = "int4"\nint4 = { lm_head = "int8" }\n'
    assert load_config(_config(tmp_path, h8))[0].finetune.model_dump()["quant_aware_lm_head"] == "int8"
    with pytest.raises(BadInput, match="lm_head int4 \\(trained for int8\\)"):
        load_config(_config(tmp_path, h8 + '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n'))


def _dora(tmp_path) -> Path:
    p = _config(tmp_path, '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n')
    p.write_text(p.read_text().replace('method = "lora"', 'method = "dora"'))
    return p


def test_self_distillation_corpus_is_the_base_models_own_reproducible_and_cached(tiny_llama, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    opts = dict(max_steps=3, save_steps=3, batch_size=4, max_seq_len=96, lr=3e-3, limit=16, seed=0,
                quant_aware="int4", quant_aware_distill=1.0)

    def run(name, cache):
        monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / cache))
        out = finetune(tiny_llama, CHAT, tmp_path / name, options=FinetuneOptions(**opts))
        return json.loads((out / "edgetune.json").read_text())["results"]["quant_aware"]["distill"], load_file(out / "adapter_model.safetensors")

    (d, first), (again, _) = run("a", "cache-a"), run("b", "cache-b")
    assert d["weight"] == 1.0 and d["samples"] == 48 and d["tokens"] > 48 * 64 and "llm-general.jsonl" in d["source"]
    assert d["cache"] == again["cache"] == "written"
    assert again["sha256"] == d["sha256"]  # seeded: written twice from scratch, the same corpus
    [stored] = (tmp_path / "cache-a" / "qat-corpus").glob("*.json")
    hit, adapter = run("c", "cache-a")  # read back: the same corpus and, since nothing else changed, the same adapter
    assert hit["cache"] == "hit" and hit["sha256"] == d["sha256"]
    assert adapter.keys() == first.keys() and all(np.array_equal(adapter[k], first[k]) for k in first)
    stored.write_text('{"key": "%s", "seqs": [[1, -2]]}' % json.loads(stored.read_text())["key"])  # damaged: written anew
    redone, _ = run("d", "cache-a")
    assert redone["cache"] == "written" and redone["sha256"] == d["sha256"]
    opts["seed"] = 1  # another seed is another corpus, not a stale hit
    other, _ = run("e", "cache-a")
    assert other["cache"] == "written" and other["sha256"] != d["sha256"]
