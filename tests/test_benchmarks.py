"""examples/benchmarks: the Markdown report renders every row of a results.json (refused and
failed rows with their error), and the quantization grid covers every int4 algorithm and block
size the target schema offers. Fast: no model is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "examples" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import report
        import run

        yield run, report
    finally:
        sys.path.remove(str(BENCH))


def _results() -> dict:
    q = {"perplexity": 30.1, "perplexity_increase_pct": 10.2, "kl_divergence": 0.1234, "top1_agreement": 0.81, "generation_agreement": 0.5}
    sp = {"decode_tok_s": 101.5, "ttft_ms": 120.0, "peak_rss_mb": 210.0, "threads": 2}
    return {
        "model": "SmolLM2-135M-Instruct", "command": "make bench", "wall_s": 1234.5, "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu": "Test CPU", "cpu_count": 2, "physical_cores": 2, "memory_gib": 24.0},
        "versions": {"onnxruntime": "1.32.0", "onnxruntime-genai": "0.15.2"},
        "notes": ["the machine was busy"],
        "llm": {
            "settings": {"prompt_tokens": 128, "new_tokens": 128, "repeats": 3, "window": 512, "stride": 256, "method": "sliding", "topk": 64},
            "reference": {"perplexity": 27.3, "tokens_scored": 4095},
            "headline": {"lines": ["int4 tuned: **7.50x** PyTorch"]},
            "quant": [
                {"label": "fp32", "status": "ok", "size_mb": 520.0, "quality": {**q, "perplexity_increase_pct": 0.0}, "speed": sp},
                {"label": "int4 rtn b32", "status": "ok", "size_mb": 88.0, "quality": q, "speed": sp},
                {"label": "int4 rtn b128", "status": "failed", "error": "Reshape node /model/embed_tokens/Reshape failed"},
                {"label": "int4 gptq", "status": "refused", "error": "int4 algorithm 'gptq' | not available"},
            ],
            "engines": [
                {"id": "torch", "label": "PyTorch eager fp32 (transformers generate)", "weights": "fp32", "speed": {**sp, "decode_tok_s": 14.0}, "vs_torch": 1.0},
                {"id": "int4-tuned", "label": "onnxruntime-genai int4 rtn b32 (tuned)", "weights": "int4", "speed": sp, "quality": q, "vs_torch": 7.25},
                {"id": "llama-2", "label": "llama.cpp Q4_1 GGUF, 2 threads", "weights": "Q4_1", "status": "failed", "error": "llama crashed"},
            ],
            "engine_notes": ["llama-cpp-python is not installed"],
            "tuning": [
                {"step": "baseline", "label": "int4 rtn b32, cpu-x86 defaults", "speed": sp, "vs_baseline": 1.0, "kept": None},
                {"step": "session", "label": "intra_op_num_threads = 2", "speed": sp, "vs_baseline": 1.4, "kept": True},
                {"step": "session", "label": "graph_optimization_level = ORT_ENABLE_BASIC", "speed": sp, "vs_baseline": 0.8, "kept": False},
            ],
            "tuned": {"label": "int4 rtn b32 + threads 2", "vs_baseline": 1.4},
        },
        "finetune": {"settings": {"steps": 16, "batch": 4, "seq_len": 96},
                     "rows": [{"method": "lora", "tokens_per_second": 130.0, "peak_mib": 900.0, "trainable": 460800, "eval_loss": 1.2,
                               "base_eval_loss": 2.0, "wall_s": 60},
                              {"method": "qlora", "status": "failed", "error": "bitsandbytes missing"}]},
        "encoder": {"skipped": "sms_spam_train.tsv not present"},
    }


def test_markdown_has_every_row_and_error(bench, tmp_path):
    _, report = bench
    res = _results()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    assert report.main([str(path)]) == 0  # re-render from the JSON, as `python report.py results.json` does
    md = (tmp_path / "results.md").read_text()
    for section in ("quant", "engines", "tuning"):
        for row in res["llm"][section]:
            assert row["label"] in md, row["label"]
    assert "Reshape node /model/embed_tokens/Reshape failed" in md
    assert "int4 algorithm 'gptq' \\| not available" in md  # a pipe in an error must not break the table
    assert "llama crashed" in md and "bitsandbytes missing" in md
    assert "lora" in md and "130.0" in md
    assert "_skipped: sms_spam_train.tsv not present_" in md
    assert "7.25x" in md and "1.40x" in md
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            widths = {ln.replace("\\|", "").count("|") for ln in lines}
            assert len(widths) == 1, block


def test_grid_covers_every_int4_algorithm_and_block_size(bench):
    from typing import get_args

    from edgetune.targets import Int4

    run, _ = bench
    s = {"quick": False, "full_grid": False}
    vs = run.variants(s)
    algos = {v["int4"]["algorithm"] for v in vs if v["precision"] == "int4"}
    assert set(get_args(Int4.model_fields["algorithm"].annotation)) <= algos
    rtn_blocks = {v["int4"]["block_size"] for v in vs if v["precision"] == "int4" and v["int4"]["algorithm"] == "rtn"}
    assert rtn_blocks == set(get_args(Int4.model_fields["block_size"].annotation))
    assert {"fp32", "fp16", "int8"} <= {v["precision"] for v in vs}
    for name, field in Int4.model_fields.items():  # any other int4 option (e.g. lm_head): each value has a row
        if name not in run.SWEPT:
            assert set(get_args(field.annotation) or (True, False)) <= {v["int4"][name] for v in vs if v["precision"] == "int4"}, name
    assert len({v["slug"] for v in vs}) == len(vs)  # cache folders never collide
    full = run.variants({"quick": False, "full_grid": True})
    assert len(full) > len(vs)
