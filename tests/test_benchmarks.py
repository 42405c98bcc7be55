"""benchmarks (the package): the Markdown report renders every row of a results.json (refused, failed
and missing rows with their reason), the README table is regenerated from the JSON deterministically,
the peer comparison's ratios and task comparison are right, and the quantization grid covers every
int4 algorithm and block size the target schema offers. Fast: no model is loaded, no llama.cpp."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import inputs, peers, report, texts, variants
from benchmarks.common import ROOT


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


def test_markdown_has_every_row_and_error(tmp_path):
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


def test_grid_covers_every_int4_algorithm_and_block_size():
    from typing import get_args

    from edgetune.targets import Int4

    s = {"quick": False, "full_grid": False}
    vs = variants.variants(s)
    algos = {v["int4"]["algorithm"] for v in vs if v["precision"] == "int4"}
    assert set(get_args(Int4.model_fields["algorithm"].annotation)) <= algos
    rtn_blocks = {v["int4"]["block_size"] for v in vs if v["precision"] == "int4" and v["int4"]["algorithm"] == "rtn"}
    assert rtn_blocks == set(get_args(Int4.model_fields["block_size"].annotation))
    from edgetune.quant import CPU_UNRUNNABLE_LLM_PRECISIONS

    assert {"fp32", "int8"} <= {v["precision"] for v in vs}
    assert not {v["precision"] for v in vs} & set(CPU_UNRUNNABLE_LLM_PRECISIONS)  # the bench runs on the CPU provider
    for name, field in Int4.model_fields.items():  # any other int4 option (e.g. lm_head): each value has a row
        if name not in variants.SWEPT:
            assert set(get_args(field.annotation) or (True, False)) <= {v["int4"][name] for v in vs if v["precision"] == "int4"}, name
    assert len({v["slug"] for v in vs}) == len(vs)  # cache folders never collide
    full = variants.variants({"quick": False, "full_grid": True})
    assert len(full) > len(vs)


def _sp(tps1, tps2, ttft=100.0, peak=200.0):
    return {"1": {"decode_tok_s": tps1, "ttft_ms": ttft, "peak_rss_mb": peak}, "2": {"decode_tok_s": tps2, "ttft_ms": ttft / 2, "peak_rss_mb": peak}}


TEXTS = [{"name": "python-docs", "kind": "documentation prose", "role": "judge", "origin": "pydoc_data", "chars": 9000},
         {"name": "licences", "kind": "legal prose", "role": "judge", "origin": "common-licenses", "chars": 9000},
         {"name": "shakespeare-tail", "kind": "verse drama", "role": "seen", "origin": "tail", "chars": 9000}]


def _qt(docs, lic, seen):
    """Figures per text from the ΔPPL % on each (python-docs, licences, shakespeare-tail)."""
    q = lambda d: {"perplexity": 20.0 * (1 + d / 100), "perplexity_increase_pct": d, "kl_divergence": d / 100, "top1_agreement": 0.9}  # noqa: E731
    return {"python-docs": q(docs), "licences": q(lic), "shakespeare-tail": q(seen)}


def _peer_results() -> dict:
    rows = [
        {"id": "ref", "label": "PyTorch fp32 (reference)", "toolchain": "reference", "engine": "torch", "status": "ok", "size_mb": 513.0,
         "quality_by_text": _qt(0.0, 0.0, 0.0), "task": {"exact_match": 0.5, "n": 40}, "speed_note": "not speed-measured (the reference)"},
        {"id": "llama-q4_k_m", "label": "llama.cpp Q4_K_M", "toolchain": "llama.cpp", "engine": "llama", "llama_type": "Q4_K_M", "status": "ok",
         "size_mb": 100.0, "quality_by_text": _qt(2.6, 3.0, 4.7), "task": {"exact_match": 0.45, "n": 40}, "speed": _sp(50.0, 80.0)},
        {"id": "llama-q4_0", "label": "llama.cpp Q4_0", "toolchain": "llama.cpp", "engine": "llama", "llama_type": "Q4_0", "status": "failed",
         "error": "llama_model_quantize(Q4_0) returned 1"},
        {"id": "et-rtn-h8", "label": "edgetune int4 RTN b32, int8 head", "toolchain": "edgetune", "engine": "ort", "status": "ok",
         "size_mb": 115.0, "quality_by_text": _qt(10.0, 8.0, 12.0), "task": {"exact_match": 0.3, "n": 40}, "speed": _sp(100.0, 120.0)},
        # better than Q4_K_M on the seen text and on one judge text, worse on the other: misses the goal on that one only
        {"id": "et-qat", "label": "edgetune QAT", "toolchain": "edgetune", "engine": "ort", "status": "ok",
         "size_mb": 110.0, "quality_by_text": _qt(2.0, 3.5, 1.9), "task": {"exact_match": 0.5, "n": 40}, "speed": _sp(80.0, 130.0)},
        # worse than Q4_K_M on the seen text only, every other figure at its limit: meets the goal (the seen text is no judge)
        {"id": "et-good", "label": "edgetune good", "toolchain": "edgetune", "engine": "ort", "status": "ok",
         "size_mb": 114.0, "quality_by_text": _qt(2.5, 2.9, 5.0), "task": {"exact_match": 0.495, "n": 200}, "speed": _sp(75.0, 120.0)},
        {"id": "et-slow", "label": "edgetune int4 hqq b32, int4 head", "toolchain": "edgetune", "engine": "ort", "status": "ok",
         "size_mb": 90.0, "quality_by_text": {t["name"]: {"error": "score worker exit 1: Killed"} for t in TEXTS},
         "task": {"error": "task worker exit 1: | pipe"},
         "speed": {"1": {"error": "speed worker exit 1"}, "2": {"decode_tok_s": 3.0, "ttft_ms": 900.0, "peak_rss_mb": 300.0}}},
        {"id": "et-gguf-fa", "label": "edgetune gguf base + float LoRA adapter", "toolchain": "edgetune", "engine": "ort", "status": "missing",
         "error": "`edgetune export --precision` has no 'gguf' yet (engineer gguf + lora)"},
        {"id": "et-auto", "label": "edgetune --recipe auto", "toolchain": "edgetune", "engine": "ort", "status": "refused",
         "error": "exit 1: no recipe met the budgets"},
        {"id": "et-gptq", "label": "edgetune int4 gptq b32, int4 head", "toolchain": "edgetune", "engine": "ort", "status": "skipped",
         "error": "calibrated algorithm: add --slow-algorithms"},
    ]
    for r in rows:
        r["group"] = "finetune"
    refs = {t["name"]: {"perplexity": 20.0, "tokens_scored": 1024} for t in TEXTS}
    return {"created": "2026-12-02T01:00:00+00:00", "command": ".venv/bin/python -m benchmarks.run --quick",
            "machine": {"cpu": "Test CPU", "cpu_count": 2, "memory_gib": 24.0, "doctor_cpu_features": ["avx2"], "loadavg_start": "1.0, 1.0, 1.0",
                        "loadavg_end": "2.0, 2.0, 2.0"},
            "peers": {"settings": {"chunk": 512, "topk": 64, "prompt_tokens": 128, "new_tokens": 64, "rounds": 2, "eval_tokens": 2048},
                      "texts": [dict(t) for t in TEXTS], "peer": {"llama_cpp_python": "0.3.36"}, "task_metric": "json_equal",
                      "groups": {"finetune": {"label": "demo fine-tune (merged)", "references": refs}},
                      "rows": rows, "summary": ["edgetune int4 RTN b32, int8 head vs Q4_K_M: decode 2.00x at 1 thread."],
                      "notes": ["a note"]},
            "llm": {"skipped": "--quick runs the llama.cpp comparison only"}}


def _peer_results_file(peers, tmp_path):
    """The synthetic peer results with their ratios, written as tmp_path/results.json."""
    res = _peer_results()
    peers.ratios(res["peers"]["rows"], [1, 2])
    peers.goals(res["peers"]["rows"], res["peers"]["texts"])
    res["peers"]["summary"] = peers.summary(res["peers"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    return res, path


def test_peer_ratios_and_task_compare():
    res = _peer_results()
    rows = res["peers"]["rows"]
    peers.ratios(rows, [1, 2])
    et = next(r for r in rows if r["id"] == "et-rtn-h8")
    assert et["vs_q4_k_m"] == {"size": 1.15, "decode_1t": 2.0, "ttft_1t": 1.0, "decode_2t": 1.5, "ttft_2t": 1.0,
                               "dppl_pt": {"python-docs": 7.4, "licences": 5.0, "shakespeare-tail": 7.3}, "exact_match_pt": -15.0}
    assert next(r for r in rows if r["id"] == "llama-q4_k_m")["vs_q4_k_m"]["decode_2t"] == 1.0
    assert "vs_q4_k_m" not in next(r for r in rows if r["id"] == "et-auto")  # no figures, no ratios
    assert peers.json_equal('{"room": "office", "device": "light"}', ' {"device":"light","room":"office"}\n')
    assert not peers.json_equal('{"device":"light","level":45}', '{"device":"light","level":46}')
    assert not peers.json_equal("Sure! {...}", '{"device":"light"}')
    peers.goals(rows, res["peers"]["texts"])
    summary = peers.summary({"rows": rows, "texts": res["peers"]["texts"]})
    assert any("edgetune int4 RTN b32, int8 head vs Q4_K_M" in ln and "python-docs +7.40 pt" in ln and "licences +5.00 pt" in ln
               and "-15.0 pt" in ln for ln in summary)


def test_a_difference_to_q4_k_m_carries_its_paired_standard_error(tmp_path):
    """Two rows scored on the same windows: what they share (the text's hard passages) cancels in the paired error,
    so a row that is Q4_K_M plus a constant has a difference with no spread, though each ΔPPL alone has one."""
    from edgetune.device.metrics import increase_se_pct

    bar_w = [0.02, 0.09, -0.01, 0.05, 0.12, 0.03, 0.07, 0.00]
    row_w = [x + 0.01 for x in bar_w]
    assert peers.paired_se_pt({"window_nll_delta": row_w}, {"window_nll_delta": bar_w}) == pytest.approx(0, abs=1e-9)
    assert increase_se_pct(row_w, sum(row_w) / 8) > 1.0  # alone: more than a point
    noisy = [x + e for x, e in zip(row_w, [0.01, -0.01, 0.02, -0.02, 0.0, 0.01, -0.01, 0.0])]
    se = peers.paired_se_pt({"window_nll_delta": noisy}, {"window_nll_delta": bar_w})
    assert 0 < se < increase_se_pct(noisy, sum(noisy) / 8)
    assert peers.paired_se_pt({"window_nll_delta": noisy[:4]}, {"window_nll_delta": bar_w}) is None  # other windows
    assert peers.paired_se_pt({}, {"window_nll_delta": bar_w}) is None  # an older results.json: no figures

    res = _peer_results()
    rows = res["peers"]["rows"]
    for r in rows:
        for q in (r.get("quality_by_text") or {}).values():
            if "perplexity_increase_pct" in q:
                q["window_nll_delta"] = noisy if r["id"] == "et-rtn-h8" else bar_w
    peers.ratios(rows, [1, 2])
    et = next(r for r in rows if r["id"] == "et-rtn-h8")
    assert et["vs_q4_k_m"]["dppl_se_pt"]["python-docs"] == pytest.approx(se, abs=1e-3)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    assert report.main([str(path)]) == 0
    assert f"+7.40 ±{se:.2f} / +5.00 ±{se:.2f}" in (tmp_path / "results.md").read_text()


def test_peer_report_renders_every_row(tmp_path):
    res, path = _peer_results_file(peers, tmp_path)
    assert report.main([str(path)]) == 0
    md = (tmp_path / "results.md").read_text()
    for row in res["peers"]["rows"]:
        assert row["label"] in md, row["label"]
        if row.get("error"):
            assert row["error"].replace("|", "\\|") in md, row["error"]
    for status in ("**missing**", "**refused**", "**skipped**", "**failed**", "**scoring failed**", "**task failed**"):
        assert status in md, status
    assert "2.00x / 1.50x" in md and "+7.40 / +5.00 / +7.30" in md and "-15.0" in md
    # every text is named with its role next to its figures, and the CPU next to the speeds
    head = next(ln for ln in md.splitlines() if ln.startswith("| row | size MB"))
    for col in ("ΔPPL % python-docs (judge)", "ΔPPL % licences (judge)", "ΔPPL % shakespeare-tail (seen)",
                "ΔPPL vs Q4_K_M pt (python-docs / licences / shakespeare-tail)", "goal"):
        assert f"| {col} |" in head, col
    assert "**licences** (legal prose; judge" in md and "**shakespeare-tail** (verse drama; seen" in md
    assert "Speeds (tok/s, TTFT) on Test CPU, 2 logical CPUs" in md
    cells: dict[str, list[str]] = {}
    for ln in md.splitlines():  # a row's first line is in the main table, its second in the per-text table
        if ln.startswith("| edgetune "):
            cells.setdefault(ln.split(" | ")[0][2:], ln.split(" | "))
    assert cells["edgetune QAT"][2:5] == ["+2.00", "+3.50", "+1.90"] and cells["edgetune QAT"][-3] == "-0.60 / +0.50 / -2.80"
    assert cells["edgetune good"][-1] == "**yes** |" and cells["edgetune QAT"][-1] == "no |"
    assert "| PPL licences | KL licences | top-1 % licences |" in md and "| 20.700 | 0.0350 | 90.0 |" in md  # the per-text quality table
    assert "met by edgetune good." in md
    assert "avx2" in md and "1.0, 1.0, 1.0" in md and "2026-12-02T01:00:00+00:00" in md
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.replace("\\|", "").count("|") for ln in lines}) == 1, block


def test_readme_table_regeneration_is_deterministic(tmp_path):
    res, path = _peer_results_file(peers, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\n## Tests\n")
    assert report.main([str(path), "--readme", str(readme)]) == 0
    first = readme.read_text()
    assert "old table" not in first and first.startswith("# x\n\n## Benchmarks\n\n") and first.endswith(f"{report.README_END}\n\n## Tests\n")
    for row in res["peers"]["rows"]:
        assert row["label"] in first
    assert report.main([str(path), "--readme", str(readme)]) == 0
    assert readme.read_text() == first  # same JSON, same bytes
    assert not report.update_readme(readme, json.loads(path.read_text()))
    res["peers"]["rows"][1]["size_mb"] = 101.0
    assert report.update_readme(readme, res) and "101.0" in readme.read_text()
    repo_readme = Path(__file__).resolve().parent.parent / "README.md"
    assert report.README_BEGIN in repo_readme.read_text() and report.README_END in repo_readme.read_text()


def test_parallel_recipes_are_missing_rows_until_the_cli_has_them():
    rows = {r["id"]: r for r in peers.edgetune_rows("finetune", peers.settings(True, object()), False)}
    old = {"options": {"--precision", "--adapter"}, "precisions": ("fp32", "fp16", "bf16", "int8", "int4")}
    new = {"options": old["options"] | {"--float-adapter", "--recipe"}, "precisions": old["precisions"] + ("gguf",)}
    assert "gguf" in peers.check_available(rows["et-gguf-fa"], old, set())
    assert "--float-adapter" in peers.check_available(rows["et-rtn-fa"], old, set())
    assert "--recipe" in peers.check_available(rows["et-auto"], old, set())
    assert all(peers.check_available(rows[i], new, set()) is None for i in ("et-gguf-fa", "et-rtn-fa", "et-auto"))
    assert {"et-fp32", "et-rtn", "et-rtn-h8"} <= set(rows)  # the quick subset keeps fp32 and both RTN heads
    # asked of edgetune itself, not parsed from --help: today's CLI offers every row's option and precision
    cli = peers.export_cli()
    assert "gguf" in cli["precisions"] and {"--mixed-8bit", "--float-adapter", "--recipe"} <= cli["options"]
    assert all(peers.check_available(r, cli, set()) is None for r in rows.values())


def test_full_peer_rows_cover_every_int4_algorithm_as_exportable():
    """A full run has one row per int4 algorithm of the schema, each asking for what the exporter accepts
    (hqq asymmetric: a symmetric hqq is refused), and the quick run keeps the AWQ rows."""
    from typing import get_args

    from edgetune.quant import INT4_ALGORITHMS
    from edgetune.targets import Int4

    full = {r["id"]: r for r in peers.edgetune_rows("finetune", {"quick": False}, False)}
    for a in get_args(Int4.model_fields["algorithm"].annotation):
        if a == "rtn":
            continue
        q = full[f"et-{a}"]["variant"]["int4"]
        assert q["algorithm"] == a and q["symmetric"] == (not INT4_ALGORITHMS[a].asymmetric_only), a
    assert full["et-gptq"].get("slow") and not full["et-awq"].get("slow")
    quick = {r["id"] for r in peers.edgetune_rows("finetune", {"quick": True}, False)}
    assert {"et-awq", "et-awq-h8", "et-awq-h8-acc4"} <= quick


def test_goal_is_judged_on_judge_texts_only():
    """Issue 33's goal: ΔPPL <= Q4_K_M's on every judge text (the seen text never counts), exact match within
    1 point of fp32, size <= 1.15x, decode >= 1.5x at 1 and 2 threads; an unmeasured figure leaves it undecided."""
    res = _peer_results()
    rows = res["peers"]["rows"]
    peers.ratios(rows, [1, 2])
    peers.goals(rows, res["peers"]["texts"])
    g = {r["id"]: r.get("goal") for r in rows}
    assert g["et-good"]["met"] is True and not g["et-good"]["misses"]  # worse than Q4_K_M on the seen text only
    assert g["et-qat"]["met"] is False and g["et-qat"]["misses"] == ["ΔPPL on licences +0.50 pt over Q4_K_M"]
    # 1.15x size and 1.50x decode at 2 threads are at the limits: not misses
    assert g["et-rtn-h8"]["misses"] == ["ΔPPL on python-docs +7.40 pt over Q4_K_M", "ΔPPL on licences +5.00 pt over Q4_K_M",
                                        "exact match -20.0 pt vs PyTorch fp32"]
    assert g["llama-q4_k_m"] is None and g["ref"] is None and g["et-auto"] is None  # the bar, the reference, a row without figures
    # just under a limit is a miss, and says so with enough digits (1.496x, not a rounded 1.50x)
    rows1 = [dict(r) for r in _peer_results()["peers"]["rows"]]
    good = next(r for r in rows1 if r["id"] == "et-good")
    good["speed"] = _sp(75.0, 119.7)
    peers.ratios(rows1, [1, 2])
    peers.goals(rows1, TEXTS)
    assert good["goal"]["met"] is False and good["goal"]["misses"] == ["decode 1.496x at 2 threads"]
    # the same row with one judge text unscored: undecided, not met
    rows2 = [dict(r) for r in _peer_results()["peers"]["rows"]]
    good = next(r for r in rows2 if r["id"] == "et-good")
    good["quality_by_text"] = {k: v for k, v in good["quality_by_text"].items() if k != "licences"}
    peers.ratios(rows2, [1, 2])
    peers.goals(rows2, TEXTS)
    assert good["goal"]["met"] is None and good["goal"]["unknown"] == ["ΔPPL on licences"]
    # a row 1.1 points below fp32's exact match misses; the fp32 figure is edgetune fp32's when PyTorch's task did not run
    rows3 = [dict(r) for r in _peer_results()["peers"]["rows"]]
    rows3[0] = {**rows3[0], "task": None}
    rows3.append({"id": "et-fp32", "label": "edgetune fp32", "toolchain": "edgetune", "engine": "ort", "status": "ok", "group": "finetune",
                  "task": {"exact_match": 0.506}})
    peers.ratios(rows3, [1, 2])
    peers.goals(rows3, TEXTS)
    good = next(r for r in rows3 if r["id"] == "et-good")
    assert good["goal"]["misses"] == ["exact match -1.1 pt vs edgetune fp32"]
    rows3[-1]["task"] = {"exact_match": 0.505}  # exactly 1 point below: within the goal (no float rounding miss)
    peers.goals(rows3, TEXTS)
    assert good["goal"]["met"] is True


def test_goal_names_what_the_run_cannot_decide():
    """A verdict on the goal says which of its figures lie within this run's noise, met or missed: a ΔPPL difference from
    Q4_K_M smaller than its paired standard error, a decode ratio whose rounds straddle 1.5x; clear figures are not named."""
    rows = [dict(r) for r in _peer_results()["peers"]["rows"]]
    bar = next(r for r in rows if r["id"] == "llama-q4_k_m")
    good = next(r for r in rows if r["id"] == "et-good")
    qat = next(r for r in rows if r["id"] == "et-qat")
    bar["speed"]["1"]["decode_tok_s_rounds"] = [50.0, 50.0, 50.0]
    good["speed"]["1"]["decode_tok_s_rounds"] = [72.0, 75.0, 79.0]  # 1.44-1.58x around a 1.50x median
    qat["speed"]["1"]["decode_tok_s_rounds"] = [80.0, 81.0, 79.0]  # 1.58-1.62x: clear
    for r, deltas in ((bar, [0.02, 0.03, 0.025, 0.03]), (good, [0.0, 0.06, 0.01, 0.03]), (qat, [0.02, 0.031, 0.026, 0.03])):
        for q in r["quality_by_text"].values():
            q["window_nll_delta"] = deltas
    peers.ratios(rows, [1, 2])
    peers.goals(rows, TEXTS)
    g = good["goal"]
    assert g["met"] is True and len(g["within_noise"]) == 3, g
    assert g["within_noise"][0].startswith("ΔPPL on python-docs -0.10 pt, standard error ")
    assert g["within_noise"][2] == "decode at 1 thread 1.44-1.58x round by round"
    text = peers.goal_text(g)
    assert text.startswith("meets the goal on every judge text; within this run's noise (more --repeats or --peer-eval-tokens")
    # et-qat: the same windows as Q4_K_M's but for a hair, so its ΔPPL gaps (-0.6 / +0.5 pt) exceed their tiny errors,
    # and its rounds are clear of 1.5x: nothing undecided
    assert qat["goal"]["met"] is False and qat["goal"]["within_noise"] == []
    assert "noise" not in peers.goal_text(qat["goal"])


def test_report_renders_results_from_before_per_text_scoring(tmp_path):
    """README's table comes from a results.json; one written with a single quality per row still renders, its text labelled seen."""
    res = _peer_results()
    del res["peers"]["texts"]
    res["peers"]["settings"]["text_name"] = "last 10% of tinyshakespeare.txt (from character 1003854)"
    res["peers"]["groups"]["finetune"] = {"label": "demo fine-tune (merged)", "reference": {"perplexity": 20.0, "tokens_scored": 1024}}
    for r in res["peers"]["rows"]:
        if "quality_by_text" in r:
            r["quality"] = r.pop("quality_by_text")["shakespeare-tail"]
        if r["id"] == "et-rtn-h8":
            r["vs_q4_k_m"] = {"dppl_pt": 7.3}
    block = report.readme_block(res)
    assert "ΔPPL % tinyshakespeare tail (seen)" in block and "+12.00" in block and "| +7.30 |" in block
    assert "last 10% of tinyshakespeare.txt (from character 1003854)" in block


# ---------------------------------------------------------------- texts.py: which text may be read for what


@pytest.fixture
def texts_mod():
    return texts


def _fake_sources(tmp_path):
    """A tinyshakespeare file and a licence folder with a symlinked duplicate (as /usr/share/common-licenses has)."""
    sp = tmp_path / "tinyshakespeare.txt"
    sp.write_text("".join(f"CITIZEN {i}:\n" + "We are accounted poor citizens, the patricians good.\n" * 4 + f"So says {i}.\n\n"
                          for i in range(200)))
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "GPL-3").write_text("   GNU GENERAL PUBLIC LICENSE\n\nEveryone is permitted to copy and distribute verbatim copies\n\f\n\n\n\nof this license document.\t \n")
    (lic / "GPL").symlink_to("GPL-3")
    (lic / "Apache-2.0").write_text("Licensed under the Apache License, Version 2.0 (the \"License\");\n")
    return {"shakespeare": sp, "licence_dir": lic}


def test_texts_have_roles_kinds_and_a_deterministic_budget(texts_mod, tmp_path):
    T = texts_mod
    where = _fake_sources(tmp_path)
    src = T.sources(**where)
    assert [s.role for s in src] == ["judge", "judge", "seen", "tune"] and {s.role for s in src} <= set(T.ROLES)
    judge = [s for s in src if s.role == "judge"]
    assert len({s.kind for s in judge}) >= 2  # at least two texts of different kinds judge
    a, b = T.load(("judge", "seen"), 64, **where), T.load(("judge", "seen"), 64, **where)
    assert a == b and [t.name for t in a] == ["python-docs", "licences", "shakespeare-tail"]
    docs = a[0].text
    assert docs.endswith("\n") and 64 * T.CHARS_PER_TOKEN <= len(docs) <= 64 * T.CHARS_PER_TOKEN + 200  # cut at a line end past the budget
    assert T.python_docs().startswith(docs) and len(T.load("judge", 128, **where)[0].text) > len(docs)
    lic = a[1].text
    assert lic.count("GNU GENERAL PUBLIC LICENSE") == 1 and "Apache License" in lic  # GPL -> GPL-3 read once
    assert "\t" not in lic and "\f" not in lic and "\n\n\n" not in lic and " \n" not in lic
    head, tail, start = T.shakespeare_split(where["shakespeare"])
    assert head + tail == where["shakespeare"].read_text() and head.endswith("\n") and start == len(head)
    assert a[2].text == tail and T.load("tune", 64, **where)[0].text == head  # the seen and tune texts are the two halves


def test_texts_absent_are_skipped_with_a_note(texts_mod, tmp_path, monkeypatch):
    T = texts_mod
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # an interpreter without pydoc_data
    got = T.load(("judge", "seen", "tune"), 64, shakespeare=tmp_path / "none.txt", licence_dir=tmp_path / "none")
    assert [t.text for t in got] == [None] * 4
    assert all(t.note and t.name in t.note and "skipped" in t.note for t in got)
    assert T.load(("judge", "seen"), 64, **_fake_sources(tmp_path))[0].text is None  # just the missing one


def test_calibration_never_reads_a_judge_text(texts_mod, tmp_path, monkeypatch):
    T = texts_mod
    where = _fake_sources(tmp_path)
    T.check_tune_only([T.load("tune", **where)[0].text], "head", **where)
    leak = tmp_path / "cal.jsonl"
    leak.write_text(json.dumps({"text": "hi\n" + T.python_docs().splitlines()[3]}) + "\n")
    with pytest.raises(AssertionError, match="python-docs"):
        T.check_calibration_file(leak, **where)
    leak.write_text(json.dumps({"messages": [{"content": "Everyone is  permitted to copy and distribute verbatim copies"}]}) + "\n")
    with pytest.raises(AssertionError, match="licences"):
        T.check_calibration_file(leak, **where)
    # the project's generic calibration sets (what an export reads without --calibration) share nothing with the real judge texts
    for f in sorted((ROOT / "calibration").glob("*.jsonl")):
        T.check_calibration_file(f)
    # the bench's calibration file is the tinyshakespeare head, guarded
    monkeypatch.setattr(inputs, "TEXT", where["shakespeare"])
    cal = inputs.calibration_file(tmp_path)
    lines = [json.loads(x)["text"] for x in cal.read_text().splitlines()]
    head, tail, _ = T.shakespeare_split(where["shakespeare"])
    assert lines and all(x in head for x in lines) and not any(x in tail for x in lines)
    monkeypatch.setattr(T, "python_docs", lambda: "\n".join(lines))  # a judge text equal to the calibration text: refused
    with pytest.raises(AssertionError):
        inputs.calibration_file(tmp_path)


# ---------------------------------------------------------------- the package's shape


def test_benchmark_modules_import_one_way():
    """The package's modules import each other without a cycle (run -> sections -> common), the standard
    tests/test_architecture.py holds edgetune to; lazy imports count too, and nothing edits sys.path."""
    import ast
    from graphlib import CycleError, TopologicalSorter

    pkg = ROOT / "benchmarks"
    mods = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        src = (pkg / f"{m}.py").read_text()
        assert "sys.path.insert" not in src and "sys.path.append" not in src, m
        for node in ast.walk(ast.parse(src)):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "benchmarks"
                                                     or (node.module or "").startswith("benchmarks.")):
                base = (node.module or "") if node.level else (node.module or "").removeprefix("benchmarks").lstrip(".")
                names = [base] if base else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.removeprefix("benchmarks.") for a in node.names if a.name.startswith("benchmarks.")]
            graph[m] |= {n.split(".")[0] for n in names if n.split(".")[0] in mods and n.split(".")[0] != m}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle between benchmark modules: {exc.args[1]}")
    assert order.index("common") < order.index("run") and "run" not in set().union(*graph.values())


def test_scale_reads_indented_json_and_renders_the_device_side():
    """benchmarks.scale: a stage's result is the last JSON object its command printed (``--json`` indents it over many
    lines: the device run's load time and decode speed were lost to a line-by-line parse), and the report has a row
    per bundle that ran on the device, with the peak against the bundle's size."""
    from benchmarks import scale

    out = "loading...\n" + json.dumps({"load_s": 2.5, "results": [{"seconds": 4.0, "tokens_per_s": 4.0}]}, indent=2)
    assert scale._last_json(out) == {"load_s": 2.5, "results": [{"seconds": 4.0, "tokens_per_s": 4.0}]}
    assert scale._last_json("no result\n{ not json") == {}
    run = {"name": "run (device)", "status": "ok", "seconds": 9.0, "peak_gib": 3.8, "extra": scale._last_json(out)}
    res = {"machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 24, "features": ["avx2"], "load_start": [0.1, 0.1, 0.1]},
           "date": "2026-12-06", "command": "python -m benchmarks.scale", "rows": [
               {"model": "phi-3-mini", "family": "llama/phi3", "params": 3.93e9, "stages": [
                   {"name": "bundle", "status": "ok", "seconds": 4.0, "peak_gib": 0.04, "disk_gib": 2.0}, run]},
               {"model": "qwen2.5-3b", "family": "qwen2", "params": 3.1e9, "stages": [
                   {"name": "export int4 rtn", "status": "timeout", "seconds": 2400.0, "note": "killed after 2400 s"}]}]}
    md = scale.render(res)
    assert "| phi-3-mini | 2.00 GiB | 3.80 GiB | 1.9x | 2.5 s | 4.0 s, 4.0 tok/s |" in md
    assert "qwen2.5-3b, export int4 rtn: timeout: killed after 2400 s" in md


def test_weights_read_per_token_counts_the_matmuls_folded_constants_and_untied_heads(tmp_path):
    """benchmarks.weights_read: an onnx graph's MatMul weights count (an fp16 weight widened by a Cast at its fp32
    size, a MatMulNBits' packed bytes, scales and zero points), the embedding's Gather table does not, a tensor read
    twice counts once; a GGUF's token table counts only when it is the (tied) head."""
    import numpy as np
    import onnx
    from gguf import GGUFWriter
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.weights_read import gguf_read_bytes, onnx_read_bytes, read_mb

    inits = [numpy_helper.from_array(np.zeros((100, 8), np.float32), "table"),  # the embedding: 3,200 bytes, not read
             numpy_helper.from_array(np.zeros((8, 16), np.float32), "w"),  # 512
             numpy_helper.from_array(np.zeros((16, 8), np.float16), "w16"),  # 256 stored, 512 after the Cast
             numpy_helper.from_array(np.zeros((8, 1, 16), np.uint8), "qb"),  # MatMulNBits K=32 N=8 b32: 128
             numpy_helper.from_array(np.zeros((8,), np.float32), "qs")]  # 32
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["h", "w32"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w"], ["h3"]),  # "w" again: read once
             helper.make_node("Concat", ["h3", "h3", "h3", "h3"], ["h4"], axis=-1),
             helper.make_node("MatMulNBits", ["h4", "qb", "qs"], ["y"], domain="com.microsoft", K=32, N=8, bits=4, block_size=32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    (tmp_path / "g").mkdir()
    onnx.save(model, tmp_path / "g" / "model.onnx")
    assert onnx_read_bytes(tmp_path / "g" / "model.onnx") == 512 + 512 + 128 + 32
    assert read_mb(tmp_path / "g") == round(1184 / 2**20, 2) and read_mb(tmp_path / "nothing") is None

    def gguf(name, tensors):
        w = GGUFWriter(str(tmp_path / name), "llama")
        for n, shape in tensors:
            w.add_tensor(n, np.zeros(shape, np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    untied = gguf("untied.gguf", [("token_embd.weight", (100, 8)), ("output.weight", (100, 8)), ("blk.0.attn_q.weight", (8, 8))])
    tied = gguf("tied.gguf", [("token_embd.weight", (100, 8)), ("blk.0.attn_q.weight", (8, 8))])
    assert gguf_read_bytes(untied) == 3200 + 256 and gguf_read_bytes(tied) == 3200 + 256


def test_bandwidth_table_is_bytes_times_speed():
    rows = [{"label": "llama.cpp Q4_K_M", "status": "ok", "read_mb": 100.0, "speed": {"1": {"decode_tok_s": 50.0}, "2": {"decode_tok_s": 80.0}},
             "vs_q4_k_m": {"read": 1.0}},
            {"label": "int4", "status": "ok", "read_mb": 50.0, "speed": {"1": {"decode_tok_s": 100.0}}, "vs_q4_k_m": {"read": 0.5}},
            {"label": "refused", "status": "refused", "read_mb": 10.0}, {"label": "no figure", "status": "ok"}]
    assert report.bandwidth_rows(rows) == [["llama.cpp Q4_K_M", "100.0", "1.00x", "5.24", "8.39"], ["int4", "50.0", "0.50x", "5.24", "–"]]
    bar, row = dict(rows[0]), dict(rows[1])
    bar["llama_type"], bar["size_mb"], row["size_mb"] = "Q4_K_M", 101.0, 60.0
    peers.ratios([bar, row], [1, 2])
    assert row["vs_q4_k_m"]["read"] == 0.5 and row["vs_q4_k_m"]["decode_1t"] == 2.0


def test_report_shows_paths_inside_the_repository_relative():
    assert peers.shown(str(ROOT / "build" / "demo" / ".work")) == "build/demo/.work"
    assert peers.shown("/elsewhere/.work") == "/elsewhere/.work" and peers.shown("rel/.work") == "rel/.work"


def test_a_speed_ratio_carries_its_range_over_paired_rounds():
    """Round i of every row runs under the same load, so the ratio is taken round by round: its range shows how far
    one run's ratio moves, which the median ratio hides."""
    assert peers.round_ratio_range([100.0, 90.0, 120.0], [50.0, 60.0, 60.0]) == [1.5, 2.0]
    assert peers.round_ratio_range([100.0], [50.0]) is None  # one round: no range
    assert peers.round_ratio_range(None, [50.0, 60.0]) is None  # an older results.json
    assert peers.round_ratio_range([100.0, 90.0, 80.0], [50.0, 45.0]) == [2.0, 2.0]  # a row that failed its last round

    res = _peer_results()
    rows = res["peers"]["rows"]
    bar = next(r for r in rows if r["id"] == "llama-q4_k_m")
    et = next(r for r in rows if r["id"] == "et-rtn-h8")
    bar["speed"]["1"]["decode_tok_s_rounds"] = [50.0, 40.0, 60.0]
    et["speed"]["1"]["decode_tok_s_rounds"] = [100.0, 100.0, 90.0]
    peers.ratios(rows, [1, 2])
    assert et["vs_q4_k_m"]["decode_1t"] == 2.0 and et["vs_q4_k_m"]["decode_1t_rounds"] == [1.5, 2.5]
    assert "decode_2t_rounds" not in et["vs_q4_k_m"]  # no rounds recorded at 2 threads
    peers.goals(rows, res["peers"]["texts"])
    line = next(ln for ln in peers.summary({"rows": rows, "texts": res["peers"]["texts"]}) if ln.startswith(et["label"]))
    assert "decode 2.00x (rounds 1.50-2.50x) at 1 thread, decode 1.50x at 2 threads" in line


# ------------------------------------------------------------------ --mask-cpu avx2 (benchmarks/cpumask.py)


def test_cpu_mask_refuses_a_peer_compiled_for_avx512():
    from benchmarks.cpumask import peer_refusal

    native = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
              "AVX512_VBMI = 1 | AVX512_VNNI = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
    refusal = peer_refusal(native)
    assert refusal and "AVX512, AVX512_VBMI, AVX512_VNNI, AVX_VNNI" in refusal and "make peers-avx2" in refusal
    avx2 = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
    assert peer_refusal(avx2) is None
    assert "could not be read" in peer_refusal(None)



def test_kernel_table_times_each_node_in_its_own_process(tmp_path):
    """benchmarks.kernels: one MatMulNBits per shape, with and without zero points, timed in a fresh process (the CPUID
    mask is per process); the table shows the AVX2 column only when it was measured."""
    from benchmarks import kernels

    rows = kernels.measure([("tiny 4-bit", 64, 128, 4, 32), ("tiny 8-bit", 32, 128, 8, 64)], reps=5, rounds=1, work=tmp_path)
    assert [(r["node"], r["zero_points"]) for r in rows] == [("tiny 4-bit", True), ("tiny 4-bit", False), ("tiny 8-bit", True),
                                                              ("tiny 8-bit", False)]
    assert all(r["native_us"] > 0 and "avx2_us" not in r for r in rows)
    text = kernels.table(rows)
    assert "| tiny 8-bit | none |" in text and "AVX2" not in text
    rows[0].update(avx2_us=2 * rows[0]["native_us"], avx2_vs_native=2.0)
    assert "| 2.00x |" in kernels.table(rows)


def test_scale_makes_a_qwen2_folder_whose_tokenizer_the_export_accepts(tmp_path):
    """benchmarks.scale's random models borrow SmolLM2's tokenizer; under transformers 5 a qwen2 folder loads it as
    Qwen2Tokenizer (another pre-tokenizer), and the export's tokenizer check refused every Qwen2 row of `make bench-scale`."""
    pytest.importorskip("torch")
    import subprocess

    from benchmarks import scale
    from edgetune.model_input import materialize
    from edgetune.tokenizer_parity import check_tokenizer_files

    cfg = dict(scale.SPECS["tiny"].config, model_type="qwen2")
    out = tmp_path / "qwen2"
    subprocess.run([sys.executable, "-c", scale.MAKE, json.dumps(cfg), str(materialize("smollm2").path), str(out)], check=True,
                   capture_output=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert check_tokenizer_files(out)["mismatches"] == 0
