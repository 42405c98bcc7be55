"""`make demo` keeps its promise: the fine-tune learns the task and the bundle answers like it.

Runs (or reuses) the demo build of examples/smollm2-lora-cpu.toml on the real SmolLM2 and the
40 held-out smart-home requests: base -> fine-tuned fp32 -> bundle task exact match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.targets import load_target

pytestmark = pytest.mark.slow


# Speed budgets depend on the CPU the suite runs on (an AVX2-only 2-core VM decodes the demo bundle at ~9.5 tok/s,
# below cpu-x86's 10): the build rightly rejects the bundle there, but a test cannot hold a machine's speed
# (speed belongs in the benchmarks). Every other check must hold, and a speed miss is named in the output.
SPEED_CHECKS = {"decode_tokens_per_s", "time_to_first_token_ms", "prefill_tokens_per_s", "latency_p50_ms", "latency_p95_ms"}


def test_demo_bundle_keeps_the_fine_tune(demo_build):
    s = demo_build["summary"]
    task = s["task"]
    assert task["metric"] == "exact_match"
    assert task["finetuned"] >= 95.0  # the fine-tune learned the templated task
    assert task["base"] is not None and task["base"] < task["finetuned"] - 50  # and it was the fine-tune that did it
    (row,) = s["targets"]
    budget = load_target(row["target"]).budgets.max_task_accuracy_drop
    assert row["task_figures"]["drop"] <= budget
    # the bundle is what the summary says: a verified manifest whose validation report holds the same figures
    bundle, archive = Path(row["bundle"]), Path(row["archive"])
    report = json.loads((bundle / "validation" / "report.json").read_text())
    missed = {c["name"]: c.get("value") for c in report["checks"] if not c["passed"]}
    assert set(missed) <= SPEED_CHECKS, missed
    assert demo_build["exit_code"] == (1 if missed else 0) and (row["result"] == "pass") == (not missed), (row["result"], missed)
    if missed:
        print(f"\nspeed budgets missed on this CPU (bundle kept under rejected/): {missed}")
    assert report["task"]["model"]["exact_match"] == row["task_figures"]["exact_match"]
    # the config's gguf target with int4 = { accuracy_level = 4 }: the setting reached the export, every 4-bit node (and
    # the Q8_0 head) runs on int8 activations, the GGUF's own blocks kept
    rec = json.loads((demo_build["work"] / f"export-{row['target']}" / "edgetune.json").read_text())["results"]
    assert rec["precision"] == "gguf" and rec["quantization"]["accuracy_level"] == 4, rec["quantization"]
    assert {(m["bits"], m["accuracy_level"]) for m in rec["matmulnbits"]} == {(4, 4), (8, 4)}, rec["matmulnbits"]
    assert (bundle / "manifest.json").is_file() and archive.is_file()
