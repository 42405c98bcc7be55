"""`make demo` keeps its promise: the fine-tune learns the task and the bundle answers like it.

Runs (or reuses) the demo build of examples/smollm2-lora-cpu.toml on the real SmolLM2 and the
40 held-out smart-home requests: base -> fine-tuned fp32 -> bundle task exact match.
"""

from __future__ import annotations

import json

import pytest

from edgetune.targets import load_target

pytestmark = pytest.mark.slow


def test_demo_bundle_keeps_the_fine_tune(demo_build):
    assert demo_build["exit_code"] == 0, demo_build["summary"]
    s = demo_build["summary"]
    task = s["task"]
    assert task["metric"] == "exact_match"
    assert task["finetuned"] >= 95.0  # the fine-tune learned the templated task
    assert task["base"] is not None and task["base"] < task["finetuned"] - 50  # and it was the fine-tune that did it
    (row,) = s["targets"]
    budget = load_target(row["target"]).budgets.max_task_accuracy_drop
    assert row["result"] == "pass" and row["task_figures"]["drop"] <= budget
    # the bundle is what the summary says: a verified manifest whose validation report holds the same figures
    bundle = demo_build["output"] / row["target"]
    report = json.loads((bundle / "validation" / "report.json").read_text())
    assert report["passed"] and report["task"]["model"]["exact_match"] == row["task_figures"]["exact_match"]
    assert (bundle / "manifest.json").is_file() and (demo_build["output"] / f"{row['target']}.tar.gz").is_file()
