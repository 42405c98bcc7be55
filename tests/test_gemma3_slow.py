"""The real Gemma 3 270M GGUF reaches a device (issue 27): Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 tensors) with a
SentencePiece vocabulary of 262k (imported by transformers 5 as a byte-fallback BPE tokenizer.json).

`edgetune export gemma3-270m --target cpu-x86` at its default precision (gguf: the GGUF's own blocks, every
tensor proved exact; 5-/6-/8-bit linears as 4-bit + 2-/4-bit planes), perplexity within 0.5 % of the
dequantized PyTorch model in `edgetune validate` on real text, size <= 1.15x the GGUF file, and the bundle
answers in `edgetune run` in a process where torch and transformers cannot be imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import real_model, shared_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    real_model("gemma3-270m")
    from edgetune.model_input import materialize

    return materialize("gemma3-270m").path


def test_gemma3_gguf_reaches_the_device(gemma3, tmp_path):
    from test_bundle_run import device_cli

    from edgetune.bundle import make_bundle
    from edgetune.export import export
    from edgetune.validate import validate

    text = shared_data("tinyshakespeare.txt").read_text()
    (tmp_path / "tail.txt").write_text(text[text.find("\n", int(len(text) * 0.9)) + 1:])  # the last 10 %
    out = export(gemma3, tmp_path / "gguf", target="cpu-x86")  # no precision: the default for a GGUF not fine-tuned
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    g = rec["gguf"]
    assert rec["precision"] == "gguf" and g["gguf_types"] == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    # 18 layers x 7 linears + the Q8_0 table as head and as embedding, each equal to gguf's own dequantization
    assert len(g["tensors"]) == 128 and g["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and g["max_rel_diff_vs_builder_fp32"] <= 1e-6
    assert g["embedding"]["shared_with_lm_head"] and g["all_prepacked"]
    # every 5-/6-/8-bit linear but the tied head (Q5_0, Q6_K, the Q8_0 v_proj) as a 4-bit node at level 0 + a low-bits node
    eight = [n for n in g["nodes"] if n.get("bits") == 8 and n["node"] != "/lm_head/MatMul" and n.get("accuracy_level") is not None]
    assert eight and all(n.get("planes") and n["accuracy_level"] == 0 for n in eight), eight[:2]
    assert g["size_vs_gguf"] <= 1.15, g["size_vs_gguf"]
    proof = rec["graph_proof"]  # the builder's fp32 graph == PyTorch past the 512-token window (tolerance relative to the logits)
    assert proof["top1_agreement"] == 1.0 and proof["max_abs_logit_diff_past_window"] < proof["tolerance"] * proof["logit_scale"]
    assert rec["tokenizer_check"]["mismatches"] == 0
    report = validate(out, target="cpu-x86", reference=gemma3, data=tmp_path / "tail.txt", out=tmp_path / "rep",
                      eval_tokens=1024, window=512, stride=256, max_tokens=16, latency=False)
    a = report["accuracy"]
    print("gemma3 gguf:", {k: a[k] for k in ("perplexity", "reference_perplexity", "perplexity_increase_pct", "kl_divergence",
                                             "top1_agreement", "generation_agreement")}, "size_vs_gguf", g["size_vs_gguf"])
    assert abs(a["perplexity_increase_pct"]) < 0.5 and a["top1_agreement"] > 0.95
    assert report["tokenizer"]["mismatches"] == 0
    bundle = tmp_path / "bundle"
    make_bundle(out, bundle, target="cpu-x86", report=tmp_path / "rep")
    r = device_cli("run", str(bundle), "-p", "The capital of France is", "-n", "8", "--json")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert res["new_tokens"] >= 1 and res["output"].strip(), res
    print("run:", res["output"])


@pytest.mark.skipif(os.environ.get("EDGETUNE_HEAVY_TESTS") != "1",
                    reason="a cold build is ~47 min on 2 cores (40 LoRA steps through a 262k-token head: 30 min), over CI's "
                           "budget; EDGETUNE_HEAVY_TESTS=1 (make test-heavy) runs it")
def test_gemma3_demo_task_build():
    """The demo task on Gemma 3 (examples/gemma3-270m-lora-cpu.toml, the demo's requests as prompt/completion: the
    GGUF is a base model without a chat template): base -> fine-tuned >= 95 % exact match on the 40 held-out
    requests -> the bundle (exact GGUF base + float LoRA) within cpu-x86's task budget."""
    from conftest import ROOT, run_build
    from test_demo_slow import SPEED_CHECKS

    from edgetune.targets import load_target

    real_model("gemma3-270m")
    b = run_build(ROOT / "examples" / "gemma3-270m-lora-cpu.toml")
    s = b["summary"]
    task = s["task"]
    print("\ngemma3 demo task:", {k: task.get(k) for k in ("metric", "base", "finetuned")},
          [(r["target"], r["result"], r.get("task_figures")) for r in s["targets"]])
    assert task["metric"] == "exact_match" and task["finetuned"] >= 95.0
    (row,) = s["targets"]
    assert row["task_figures"]["drop"] <= load_target(row["target"]).budgets.max_task_accuracy_drop
    report = json.loads((Path(row["bundle"]) / "validation" / "report.json").read_text())
    missed = {c["name"]: c.get("value") for c in report["checks"] if not c["passed"]}
    assert set(missed) <= SPEED_CHECKS, missed  # speed belongs to the benchmarks (see test_demo_slow)
    if missed:
        print(f"speed budgets missed on this CPU (bundle kept under rejected/): {missed}")
    assert b["exit_code"] == (1 if missed else 0)
