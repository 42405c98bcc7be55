"""The validation report: versioned JSON (schema in docs/validation.md), Markdown, optional PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def check(name: str, value: Any, limit: Any, op: str, *, detail: str | None = None) -> dict[str, Any]:
    """One check: ``value op limit`` (op in <=, >=, ==); a None value fails (not measured)."""
    if value is None:
        passed = False
    elif op == "<=":
        passed = value <= limit
    elif op == ">=":
        passed = value >= limit
    else:
        passed = value == limit
    out = {"name": name, "value": value, "limit": limit, "op": op, "passed": bool(passed)}
    if detail:
        out["detail"] = detail
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# Validation: {report['model']['path']}", ""]
    status = "PASSED" if report["passed"] else "FAILED: " + ", ".join(c["name"] for c in report["checks"] if not c["passed"])
    lines += [f"**{status}** on target `{report['target']['name']}` ({', '.join(report['runtime']['providers'])})", ""]
    dev = report.get("device") or {}
    if dev and not dev.get("available", True):
        lines += [f"**Cross-build**: the {dev['execution_provider']} execution provider is not on this machine. Accuracy was validated "
                  f"with the same graph on {dev['accuracy_on']}; on-device latency: **not measured**.", ""]
    lines += ["| check | value | limit | result |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {c['op']} {_fmt(c['limit'])} | {'pass' if c['passed'] else '**FAIL**'} |")
    lines += [f"\n{c['name']}: {c['detail']}" for c in report["checks"] if c.get("within_noise")]
    if report.get("not_measured"):
        lines += ["", "Not measured here: " + ", ".join(report["not_measured"])]
    acc = report.get("accuracy") or {}
    if acc:
        lines += ["", "## Accuracy vs reference", "", "| figure | value |", "|---|---|"]
        for k, v in acc.items():
            if not isinstance(v, (dict, list)):
                lines.append(f"| {k} | {_fmt(v)} |")
    lines += _task_markdown(report.get("task"))
    tok = report.get("tokenizer") or {}
    if tok:
        lines += ["", "## Tokenizer parity", "", f"{tok.get('checked', 0)} strings checked, {tok.get('mismatches', 0)} mismatches."]
        if tok.get("first_mismatch"):
            fm = tok["first_mismatch"]
            lines += ["", f"First difference ({fm['where']}): `{fm['text'][:80]!r}`", f"- reference: {fm['reference'][:24]}", f"- device: {fm['device'][:24]}"]
    lat = report.get("latency") or {}
    if lat:
        lines += ["", "## Latency and memory", "", "| figure | p50 | p90 | p99 | std | n |", "|---|---|---|---|---|---|"]
        for k in ("time_to_first_token_ms", "decode_tokens_per_s", "latency_ms"):
            s = lat.get(k)
            if s:
                lines.append(f"| {k} | {_fmt(s['p50'])} | {_fmt(s['p90'])} | {_fmt(s['p99'])} | {_fmt(s['std'])} | {s['n']} |")
        for k in ("load_time_s", "peak_memory_mb", "size_mb", "throughput_per_s", "prompt_tokens", "output_tokens"):
            if lat.get(k) is not None:
                lines.append(f"| {k} | {_fmt(lat[k])} | | | | |")
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    m = report["machine"]
    lines += ["", "## Environment", "", f"- machine: {m.get('cpu')} ({m.get('machine')}, {m.get('cpu_count')} cores, {m.get('memory_gib')} GiB)",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    return "\n".join(lines) + "\n"


def _cell(v: Any, n: int = 80) -> str:
    s = str(v).replace("\n", "\\n").replace("|", "\\|")
    return "`" + (s if len(s) <= n else s[: n - 1] + "…") + "`" if s else "(empty)"


def _task_markdown(task: dict[str, Any] | None) -> list[str]:
    """Task accuracy: reference, model, drop per figure, then the failing examples side by side."""
    if not task:
        return []
    ref, model = task.get("reference") or {}, task.get("model") or {}
    lines = ["", "## Task accuracy (gold answers)", "",
             f"{task.get('examples')} examples; primary figure: **{task['metric']}** (%).", "",
             "| figure | reference | model | drop (points) |", "|---|---|---|---|"]
    for k, v in model.items():
        if k == "examples" or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        r = ref.get(k)
        drop = r - v if isinstance(r, (int, float)) else None
        lines.append(f"| {k} | {_fmt(r)} | {_fmt(v)} | {_fmt(drop)} |")
    if task.get("answer_agreement") is not None:
        lines += ["", f"Model answers identical to the reference's: {100 * task['answer_agreement']:.1f} %."]
    fails = task.get("failing_examples") or []
    if fails:
        has_ref = any("reference" in f for f in fails)
        lines += ["", f"### First {len(fails)} failing examples (regressions vs the reference first)", ""]
        lines += ["| # | prompt | gold | reference | model |" if has_ref else "| # | prompt | gold | model |",
                  "|---|---|---|---|---|" if has_ref else "|---|---|---|---|"]
        for f in fails:
            cells = [str(f["index"]), _cell(f["prompt"]), _cell(f["gold"])] + ([_cell(f.get("reference", "-"))] if has_ref else []) + [_cell(f["model"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plots(report: dict[str, Any], folder: Path, series: dict[str, Any]) -> list[str]:
    """PNG plots where matplotlib is installed (skipped silently otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if series.get("nll_model") is not None and series.get("nll_reference") is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist([series["nll_reference"], series["nll_model"]], bins=50, label=["reference", "model"], alpha=0.7)
        ax.set_xlabel("per-token NLL (nats)")
        ax.set_ylabel("tokens")
        ax.legend()
        ax.set_title("Accuracy vs reference")
        fig.tight_layout()
        fig.savefig(folder / "accuracy.png", dpi=100)
        plt.close(fig)
        made.append("accuracy.png")
    if series.get("kl") is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(series["kl"], bins=50)
        ax.set_xlabel("KL(reference || model) per token")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(folder / "kl.png", dpi=100)
        plt.close(fig)
        made.append("kl.png")
    samples = (report.get("latency") or {}).get("samples") or {}
    samples = {k: v for k, v in samples.items() if v}
    if samples:
        fig, axes = plt.subplots(1, len(samples), figsize=(4.5 * len(samples), 3.2), squeeze=False)
        for ax, (k, v) in zip(axes[0], samples.items()):
            ax.hist(v, bins=min(30, max(5, len(v))))
            ax.set_xlabel(k)
            ax.set_ylabel("runs")
        fig.suptitle("Latency distribution (warm-up excluded)")
        fig.tight_layout()
        fig.savefig(folder / "latency.png", dpi=100)
        plt.close(fig)
        made.append("latency.png")
    return made


def write(folder: Path, report: dict[str, Any], series: dict[str, Any] | None = None) -> None:
    made = plots(report, folder, series or {})
    report["files"] = [REPORT_JSON, REPORT_MD, *made]
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (folder / REPORT_MD).write_text(markdown(report, made))
