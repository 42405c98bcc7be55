"""Quant-aware LoRA on the real model: the demo's task trained through the int4 grid ships as plain int4 RTN.

Runs (or reuses) `edgetune build examples/smollm2-qat-int4-cpu.toml`: SmolLM2-135M, the demo's data and
LoRA settings with `quant_aware = "int4"`, exported at int4 RTN block 32 for cpu-x86 (accuracy_level 0)
and cpu-x86-avx512 (level 4), each validated against the fp32 merged fine-tune on the 40 held-out requests.
Without QAT the same recipe on the demo's merged model keeps 72.5 % of 100 % (docs/finetune.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import real_model, run_build
from edgetune.targets import load_target

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "smollm2-qat-int4-cpu.toml"


@pytest.fixture(scope="module")
def qat_build() -> dict:
    real_model("smollm2")
    return run_build(CONFIG)


def test_int4_bundles_keep_the_quant_aware_fine_tune(qat_build):
    assert qat_build["exit_code"] == 0, qat_build["summary"]
    s = qat_build["summary"]
    assert {r["target"] for r in s["targets"]} == {"cpu-x86", "cpu-x86-avx512"}
    for row in s["targets"]:
        budget = load_target(row["target"]).budgets.max_task_accuracy_drop
        assert row["result"] == "pass" and row["task_figures"]["drop"] <= budget, row
        assert row["task_figures"]["exact_match"] >= 95.0, row
        record = json.loads((qat_build["work"] / f"export-{row['target']}" / "edgetune.json").read_text())["results"]
        assert record["precision"] == "int4" and record["int4"]["algorithm"] == "rtn"
        assert record["quantization"]["quant_aware"]["matches"] is True
        assert record["kernel_paths"]["slow"] == [] and record["kernel_paths"]["prepacked"] == 151


def test_the_merge_gate_proves_the_int4_model_is_what_was_trained(qat_build):
    adapter = json.loads((qat_build["work"] / "adapter" / "edgetune.json").read_text())["results"]
    assert adapter["quant_aware"]["lora_linears"] == 210 and adapter["quant_aware"]["block_size"] == 32
    gate = json.loads((qat_build["work"] / "merged" / "edgetune.json").read_text())["results"]["gate"]
    vs = gate["vs_fake_quant"]
    assert vs["int4_vs_trained"]["passed"] and vs["int4_vs_trained"]["top1_agreement"] >= 0.99
    # the float merged model is further from what was trained than its int4 rounding is
    assert vs["merged_vs_trained"]["kl"] > max(10 * vs["int4_vs_trained"]["kl"], 1e-2)
