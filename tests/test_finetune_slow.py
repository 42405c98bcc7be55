"""Slow fine-tuning tests on the real models (SmolLM2-135M, all-MiniLM-L6-v2) and DeepSpeed.

Budget: about 1 min per SmolLM2 run, ~1 min for MiniLM, ~1 min per DeepSpeed run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_data
from edgetune.finetune import FinetuneOptions, finetune
from edgetune.merge import merge

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "data" / "smarthome_train.jsonl"


def _results(out: Path) -> dict:
    return json.loads((out / "edgetune.json").read_text())["results"]


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_smollm2_chat(smollm2_dir, tmp_path, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    # a shared 2-core CPU does ~40-100 tokens/s here: keep runs to 6 steps of 2 short chats
    opts = FinetuneOptions(method=method, max_steps=6, batch_size=2, max_seq_len=80, lr=2e-3, save_steps=100, limit=40, eval_fraction=0.2)
    out = finetune(smollm2_dir, TRAIN, tmp_path / method, options=opts)
    r = _results(out)
    print(method, {k: r[k] for k in ("first_loss", "last_loss", "base_eval_loss", "eval_loss", "tokens_per_second")})
    assert r["global_step"] == 6
    assert r["last_loss"] < r["first_loss"]
    assert r["eval_loss"] < r["base_eval_loss"] - 0.1
    # the real adapter goes through the merge gate (merged == base + adapter on held-out prompts)
    merged = merge(smollm2_dir, out, tmp_path / f"{method}-merged")
    gate = _results(merged)["gate"]
    print(method, "merge gate", {k: gate[k] for k in ("max_abs_diff", "kl", "top1_agreement")})
    assert gate["max_abs_diff"] < 1e-3 and gate["top1_agreement"] >= 0.99
    if method == "qlora":  # merged into the float base; the distance to the 4-bit model it was trained as is measured
        v = gate["vs_trained_4bit"]
        print("qlora merged vs trained 4-bit model", v)
        assert v["quant_type"] == "nf4" and v["kl"] > gate["kl"]


def test_minilm_spam_classifier(minilm_dir, tmp_path):
    src = shared_data("sms_spam_train.tsv")
    rows = list(csv.DictReader(open(src, encoding="utf-8", newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    ham = [r for r in rows if r["label"] == "ham"][:200]
    spam = [r for r in rows if r["label"] == "spam"][:100]
    data = tmp_path / "spam.jsonl"
    with open(data, "w") as f:
        for r in ham + spam:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    opts = FinetuneOptions(epochs=2, batch_size=16, max_seq_len=64, lr=2e-3, rank=8, eval_fraction=0.2, save_steps=1000)
    out = finetune(minilm_dir, data, tmp_path / "spam", options=opts)
    r = _results(out)
    print("minilm", r["eval_accuracy"], r["eval_records"])
    assert r["task"] == "seq-cls" and r["eval_records"] == 60
    assert r["eval_accuracy"] >= 0.93


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_processes(tiny_llama, tmp_path, stage):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (pip install 'edgetune[deepspeed]')")
    opts = FinetuneOptions(method="lora", max_steps=6, save_steps=3, batch_size=2, max_seq_len=96, lr=3e-3, limit=60, deepspeed=stage, num_processes=2)
    out = finetune(tiny_llama, TRAIN, tmp_path / stage, options=opts)
    r = _results(out)
    assert r["world_size"] == 2 and r["global_step"] == 6
    assert r["eval_loss"] < r["base_eval_loss"]
    assert r["adapter_parameters"] > 0
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.size > 0 for t in tensors.values())
    assert any("lora_B" in k and abs(t).sum() > 0 for k, t in tensors.items())
    # merge from the saved adapter in a fresh process (never inside the ZeRO-3 run), through the merge gate
    edgetune = Path(sys.executable).parent / "edgetune"
    proc = subprocess.run([str(edgetune), "merge", str(tiny_llama), str(out), "-o", str(tmp_path / "merged"), "--json", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gate = json.loads(proc.stdout)["gate"]
    assert gate["max_abs_diff"] < 1e-4 and gate["top1_agreement"] == 1.0
    # and the adapter really changes the model: the merged weights differ from the base's
    from safetensors.numpy import load_file as load

    base_w, merged_w = load(str(tiny_llama / "model.safetensors")), load(str(tmp_path / "merged" / "model.safetensors"))
    assert max(float(abs(merged_w[k] - base_w[k]).max()) for k in base_w if k in merged_w) > 1e-4
