"""What `edgetune build` reports: one row per target (size, accuracy, task accuracy base -> fine-tuned -> bundle,
latency, verdict) and the console table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import console


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def task_summary(base_task: dict | None, rows: list[dict]) -> dict | None:
    """Task accuracy base -> fine-tuned -> each bundle (percent, the primary metric)."""
    firsts = [r["task_figures"] for r in rows if r.get("task_figures")]
    if not firsts and not base_task:
        return None
    metric = (firsts[0]["metric"] if firsts else base_task.get("metric"))
    return {"metric": metric,
            "base": base_task.get(metric) if base_task else None,
            "finetuned": next((t["finetuned"] for t in firsts if t.get("finetuned") is not None), None),
            "bundles": {r["target"]: r["task_figures"]["bundle"] for r in rows if r.get("task_figures")}}


FLOAT_REFERENCE = "the float fine-tune's fp32 merge (same base, data and LoRA settings, without quant_aware)"


def _accuracy_text(acc: dict) -> str | None:
    """The one accuracy figure of a summary row; a perplexity increase with its standard error over the scoring windows
    (``ppl -0.13% ±0.20``, the demo's: a change inside about two of them is not one the text can show)."""
    if acc.get("perplexity_increase_pct") is not None:
        se = acc.get("perplexity_increase_se_pct")
        return f"ppl {acc['perplexity_increase_pct']:+.2f}%" + (f" ±{se:.2f}" if isinstance(se, (int, float)) else "")
    for k, fmt in (("accuracy_drop", "acc drop {:.3f}"), ("top1_agreement", "top1 {:.3f}")):
        if acc.get(k) is not None:
            return fmt.format(acc[k])
    return None


def _vs_float_row(vs_float: dict) -> dict[str, Any]:
    """A bundle's figures against the float fine-tune (a quant-aware build): what the summary and its table show."""
    rep = vs_float["report"]
    acc = {k: v for k, v in (rep.get("accuracy") or {}).items() if isinstance(v, (int, float))}
    task = rep.get("task") or {}
    metric = task.get("metric")
    tfig = {"metric": metric, "float_finetune": (task.get("reference") or {}).get(metric), "bundle": (task.get("model") or {}).get(metric),
            "drop": task.get("drop")} if metric else None
    text = ", ".join(x for x in (_accuracy_text(acc), f"top1 {acc['top1_agreement']:.3f}" if "top1_agreement" in acc else None,
                                  f"task {_pct(tfig['bundle'])} of {_pct(tfig['float_finetune'])}" if tfig else None) if x)
    failed = list(rep.get("failed") or ([] if vs_float["passed"] else ["validation"]))
    text = f"{text}: {'pass' if vs_float['passed'] else 'FAIL ' + ','.join(failed)}"
    return {"reference": FLOAT_REFERENCE, "passed": vs_float["passed"], "failed": failed, "accuracy_figures": acc,
            "task_figures": tfig, "report": str(vs_float["dir"] / "report.json"), "text": text}


def summary_row(key: str, dest: Path, manifest: dict, report: dict, passed: bool, archive: bool,
                 base_task: dict | None = None, vs_float: dict | None = None, own: str | None = None,
                 search: dict | None = None, recipe_name: str | None = None) -> dict[str, Any]:
    """``search``: the export's recipe search (``results.recipe`` of a target whose profile says recipe = "auto");
    ``recipe_name``: the named recipe that made the export (a target's or a profile's ``recipe = NAME``)."""
    figs = manifest.get("figures") or {}
    acc = report.get("accuracy") or {}
    lat = report.get("latency") or {}
    dev = report.get("device") or {}
    task = report.get("task") or {}
    metric = task.get("metric")
    tfig = None
    if metric and report.get("model", {}).get("kind") == "decoder":
        tfig = {"metric": metric, "base": base_task.get(metric) if base_task else None,
                "finetuned": (task.get("reference") or {}).get(metric), "bundle": (task.get("model") or {}).get(metric),
                "drop": task.get("drop"), "exact_match": (task.get("model") or {}).get("exact_match"),
                "valid_format": (task.get("model") or {}).get("valid_format")}
    elif metric:  # encoders: the fine-tuned fp32 reference and the bundle
        tfig = {"metric": metric, "base": None, "finetuned": (task.get("reference") or {}).get(metric),
                "bundle": (task.get("model") or {}).get(metric), "drop": task.get("drop")}

    def p50(k):
        v = lat.get(k)
        return v.get("p50") if isinstance(v, dict) else None

    accuracy = _accuracy_text(acc)
    latency = None
    if p50("decode_tokens_per_s") is not None:
        latency = f"{p50('decode_tokens_per_s'):.1f} tok/s"
        if p50("time_to_first_token_ms") is not None:
            latency += f", ttft {p50('time_to_first_token_ms'):.0f} ms"
    elif isinstance(lat.get("latency_ms"), dict):
        latency = f"p50 {lat['latency_ms'].get('p50'):.2f} ms"
    if dev and not dev.get("available", True):
        latency = f"not measured (no {dev.get('execution_provider')} here)"
    failed = list(report.get("failed") or [])
    vs = _vs_float_row(vs_float) if vs_float is not None else None
    if vs is not None and not vs["passed"]:
        failed += [f"{f} vs float fine-tune" for f in vs["failed"]]
    if not passed and not failed:
        failed = ["validation"]
    row = {
        "target": key,
        "precision": manifest.get("precision"),
        "size_mb": round(figs["size_mb"], 2) if isinstance(figs.get("size_mb"), (int, float)) else None,
        "accuracy": accuracy,
        "latency": latency,
        "result": "pass" if passed else "FAIL: " + ",".join(failed),
        "bundle": str(dest),
        "archive": str(dest.with_name(dest.name + ".tar.gz")) if archive else None,
        "base": _pct(tfig["base"]) if tfig else None,
        "fine-tuned": _pct(tfig["finetuned"]) if tfig else None,
        "task": _pct(tfig["bundle"]) if tfig else None,
        "task_metric": metric,
        "accuracy_figures": {k: v for k, v in acc.items() if isinstance(v, (int, float))},
        "task_figures": tfig,
        "device": dev or None,
        "latency_figures": {"decode_tokens_per_s_p50": p50("decode_tokens_per_s"), "time_to_first_token_ms_p50": p50("time_to_first_token_ms"),
                            "latency_ms_p50": (lat.get("latency_ms") or {}).get("p50") if isinstance(lat.get("latency_ms"), dict) else None},
    }
    if recipe_name:
        row["recipe"] = recipe_name
    if search and search.get("chosen"):  # recipe = "auto": which candidate ships, and why (the table is the export's record)
        tried = [r for r in search.get("table") or [] if r.get("failed") != ["time budget"]]
        row["recipe"] = f"auto: {search['chosen']} ({sum(r['passed'] for r in tried)} of {len(tried)} passed)"
        row["recipe_search"] = {"chosen": search["chosen"], "why": search.get("why"), "table": search.get("table")}
    if vs is not None:  # a quant-aware build: the figures above are against `reference`, these against the float fine-tune
        row["reference"] = own
        row["vs float FT"] = vs.pop("text")
        row["vs_float_finetune"] = vs
    return row


def summary_text(result: dict[str, Any]) -> str:
    ran = [s for s in result["stages"] if s["status"] == "ran" and s["stage"] != "materialize"]
    skipped = [s for s in result["stages"] if s["status"] in ("skipped", "reused")]
    head = f"build {result['name']}: {len(ran)} stage(s) ran, {len(skipped)} skipped, {result['seconds']:.1f}s"
    cols = ["target", "precision"] + (["recipe"] if any(r.get("recipe") for r in result["targets"]) else []) + ["size_mb"]
    if any(r.get("task") for r in result["targets"]):
        cols += ["base", "fine-tuned", "task"]  # task accuracy (exact match or token F1, %): base -> fine-tuned -> bundle
    qat = any(r.get("vs_float_finetune") for r in result["targets"])
    table = console.table(result["targets"], cols + ["accuracy"] + (["vs float FT"] if qat else []) + ["latency", "result", "bundle"])
    t = result.get("task") or {}
    note = f"\ntask accuracy = {t['metric']} on the held-out [validate] data (base -> fine-tuned fp32 -> bundle)" if t else ""
    if qat:
        own = next(r.get("reference") for r in result["targets"] if r.get("vs_float_finetune"))
        note += (f"\nfine-tuned, task, accuracy: against {own}; vs float FT: the same bundle against {FLOAT_REFERENCE}, "
                 "the same budgets (latency measured once); a bundle passes only if it keeps both")
    return f"{head}\n{table}{note}"
