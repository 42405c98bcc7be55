"""Markdown and PNG plots from the benchmark's results.json (pure functions of the results dict).

    python -m benchmarks.report runs/bench/results.json     # re-render results.md and the plots
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .common import ROOT

DASH = "–"


def fmt(v: Any, spec: str = ".1f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return DASH
    if isinstance(v, str):
        return v
    return f"{format(v, spec)}{suffix}"


def ratio(v: Any) -> str:
    return DASH if v is None else f"{v:.2f}x"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _status(row: dict) -> str | None:
    """One-cell message for a row that has no figures (refused, failed, timed out)."""
    if row.get("status", "ok") == "ok":
        return None
    err = " ".join((row.get("error") or "").split())
    err = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", err)  # onnxruntime's prefix says nothing
    err = re.sub(r"/onnxruntime_src/\S+ ", "", err)  # nor its source paths
    if len(err) > 260:  # keep the start (what failed) and the end (why)
        err = f"{err[:110]} ... {err[-140:]}"
    return f"**{row.get('status')}**: {err}"


def _quality_cells(q: dict | None) -> list[str]:
    q = q or {}
    top1 = q.get("top1_agreement")
    gen = q.get("generation_agreement")
    return [fmt(q.get("perplexity"), ".3f"), fmt(q.get("perplexity_increase_pct"), "+.2f"), fmt(q.get("kl_divergence"), ".4f"),
            fmt(None if top1 is None else 100 * top1, ".1f"), fmt(None if gen is None else 100 * gen, ".0f")]


def _speed_cells(s: dict | None) -> list[str]:
    s = s or {}
    return [fmt(s.get("decode_tok_s"), ".1f"), fmt(s.get("ttft_ms"), ".0f"), fmt(s.get("peak_rss_mb"), ".0f")]


def quant_section(llm: dict) -> str:
    head = ["variant", "size MB", "PPL", "ΔPPL %", "mean KL", "top-1 %", "gen. agr. %", "decode tok/s", "TTFT ms", "peak MB"]
    rows = []
    for r in llm.get("quant", []):
        msg = _status(r)
        if msg:
            rows.append([r["label"], fmt(r.get("size_mb"), ".1f"), msg] + [""] * (len(head) - 3))
            continue
        rows.append([r["label"], fmt(r.get("size_mb"), ".1f")] + _quality_cells(r.get("quality")) + _speed_cells(r.get("speed")))
    ref = llm.get("reference") or {}
    s = llm.get("settings", {})
    lines = ["## Quantization (onnxruntime-genai, CPU EP)", "",
             f"Perplexity on {fmt(ref.get('tokens_scored'), 'd')} tokens of {s.get('text_name', 'the evaluation text')} "
             f"({s.get('method')} windows of {s.get('window')}, stride {s.get('stride')}); KL over the fp32 reference's top-{s.get('topk')} + rest; "
             f"reference (PyTorch fp32) PPL {fmt(ref.get('perplexity'), '.3f')}. Speed: {s.get('prompt_tokens')}-token prompt, "
             f"{s.get('new_tokens')} new tokens, median of {s.get('repeats')} runs (1 when a run takes > 30 s), "
             f"session options: {llm.get('runtime_label', 'defaults')}.", "",
             table(head, rows)]
    if llm.get("quality_note"):
        lines += ["", f"_{llm['quality_note']}_"]
    return "\n".join(lines)


def engines_section(llm: dict) -> str:
    head = ["engine", "weights", "threads", "decode tok/s", "vs PyTorch", "TTFT ms", "peak MB", "size MB", "PPL", "ΔPPL %", "mean KL", "top-1 %"]
    rows = []
    for r in llm.get("engines", []):
        msg = _status(r)
        if msg:
            rows.append([r["label"], r.get("weights", ""), msg] + [""] * (len(head) - 3))
            continue
        s, q = r.get("speed") or {}, r.get("quality") or {}
        top1 = q.get("top1_agreement")
        rows.append([r["label"], r.get("weights", ""), fmt(s.get("threads"), "d"), fmt(s.get("decode_tok_s"), ".1f"), ratio(r.get("vs_torch")),
                     fmt(s.get("ttft_ms"), ".0f"), fmt(s.get("peak_rss_mb"), ".0f"), fmt(r.get("size_mb"), ".1f"),
                     fmt(q.get("perplexity"), ".3f"), fmt(q.get("perplexity_increase_pct"), "+.2f"), fmt(q.get("kl_divergence"), ".4f"),
                     fmt(None if top1 is None else 100 * top1, ".1f")])
    s = llm.get("settings", {})
    lines = ["## Engines side by side", "",
             f"Same prompt token ids ({s.get('prompt_tokens')} tokens) and token count ({s.get('new_tokens')} new, EOS ignored, greedy) "
             f"for every engine, each in its own process.", "", table(head, rows)]
    for n in llm.get("engine_notes", []):
        lines += ["", f"_{n}_"]
    return "\n".join(lines)


def tuning_section(llm: dict) -> str:
    head = ["step", "setting", "decode tok/s", "vs baseline", "TTFT ms", "ΔPPL %", "top-1 %", "kept"]
    rows = []
    for r in llm.get("tuning", []):
        msg = _status(r)
        if msg:
            rows.append([r.get("step", ""), r["label"], msg, "", "", "", "", ""])
            continue
        s, q = r.get("speed") or {}, r.get("quality") or {}
        top1 = q.get("top1_agreement")
        rows.append([r.get("step", ""), r["label"], fmt(s.get("decode_tok_s"), ".1f"), ratio(r.get("vs_baseline")), fmt(s.get("ttft_ms"), ".0f"),
                     fmt(q.get("perplexity_increase_pct"), "+.2f"), fmt(None if top1 is None else 100 * top1, ".1f"),
                     "yes" if r.get("kept") else ("n/a" if r.get("kept") is None else "no")])
    lines = ["## Tuning (what edgetune controls, int4 on CPU)", "", table(head, rows)]
    t = llm.get("tuned")
    if t:
        lines += ["", f"Tuned = {t.get('label')}: **{ratio(t.get('vs_baseline'))}** the target-default decode speed."]
    for n in llm.get("tuning_notes", []):
        lines += ["", f"_{n}_"]
    return "\n".join(lines)


def headline_section(llm: dict) -> str:
    h = llm.get("headline") or {}
    out = ["## Headline", ""]
    for line in h.get("lines", []):
        out.append(f"- {line}")
    return "\n".join(out)


def finetune_section(ft: dict) -> str:
    if ft.get("skipped"):
        return f"## Fine-tuning\n\n_skipped: {ft['skipped']}_"
    head = ["method", "train tok/s", "vs first", "peak MiB", "trainable params", "eval loss (base)", "wall s"]
    rows = []
    ref = next((r for r in ft.get("rows", []) if r.get("status", "ok") == "ok"), None)
    for r in ft.get("rows", []):
        msg = _status(r)
        if msg:
            rows.append([r.get("method", r.get("label", "?")), msg, "", "", "", "", ""])
            continue
        rows.append([r["method"], fmt(r.get("tokens_per_second"), ".1f"),
                     ratio(r["tokens_per_second"] / ref["tokens_per_second"]) if ref else DASH,
                     fmt(r.get("peak_mib"), ".0f"), fmt(r.get("trainable"), ","),
                     f"{fmt(r.get('eval_loss'), '.3f')} ({fmt(r.get('base_eval_loss'), '.3f')})", fmt(r.get("wall_s"), ".0f")])
    s = ft.get("settings", {})
    return "\n".join(["## Fine-tuning (SmolLM2-135M, CPU)", "",
                      f"{s.get('steps')} steps x batch {s.get('batch')} x {s.get('seq_len')} tokens (packed), examples/data/smarthome_train.jsonl; "
                      "each method in its own process (peak = process peak RSS, model load included).", "", table(head, rows)])


def encoder_section(enc: dict) -> str:
    if enc.get("skipped"):
        return f"## Encoder\n\n_skipped: {enc['skipped']}_"
    head = ["model", "accuracy %", "drop pt", "macro F1", "p50 ms", "p99 ms", "size MB", "peak MB"]
    rows = []
    for r in enc.get("rows", []):
        msg = _status(r)
        if msg:
            rows.append([r["label"], msg, "", "", "", "", "", ""])
            continue
        lat = r.get("latency") or {}
        rows.append([r["label"], fmt(r.get("accuracy"), ".2f"), fmt(r.get("accuracy_drop"), "+.2f"), fmt(r.get("f1"), ".3f"),
                     fmt(lat.get("p50"), ".2f"), fmt(lat.get("p99"), ".2f"), fmt(r.get("size_mb"), ".1f"), fmt(r.get("peak_memory_mb"), ".0f")])
    s = enc.get("settings", {})
    lines = ["## Encoder (all-MiniLM-L6-v2 SMS-spam classifier, CPU)", "",
             f"Held-out {s.get('n_eval')} messages of sms_spam_train.tsv (classifier head trained on {s.get('n_train')} others); "
             f"latency of one {s.get('sequence_tokens')}-token input, batch 1, {s.get('repeats')} runs after {s.get('warmup')} warm-up, "
             f"fresh process per model.", "", table(head, rows)]
    if enc.get("tuning"):
        th = ["session (int8 dynamic)", "p50 ms", "vs default", "p99 ms"]
        tr = []
        for r in enc["tuning"]:
            msg = _status(r)
            if msg:
                tr.append([r["label"], msg, "", ""])
                continue
            tr.append([r["label"], fmt((r.get("latency") or {}).get("p50"), ".2f"), ratio(r.get("vs_default")), fmt((r.get("latency") or {}).get("p99"), ".2f")])
        lines += ["", table(th, tr)]
    return "\n".join(lines)


# ---------------------------------------------------------------- peers (edgetune vs llama.cpp)

README_BEGIN = "<!-- bench:peers:begin (generated by `python -m benchmarks.report --readme`; do not edit) -->"
README_END = "<!-- bench:peers:end -->"
LEGACY_TEXT = "tinyshakespeare tail"  # results.json written before per-text scoring had one text, the seen one


def peer_texts(p: dict) -> list[dict]:
    """The evaluation texts of a peer comparison, in column order (judge texts first), present ones only."""
    if "texts" in p:
        return [t for t in p["texts"] if t.get("chars")]
    return [{"name": LEGACY_TEXT, "kind": "verse drama", "role": "seen", "origin": (p.get("settings") or {}).get("text_name", "?")}]


def row_quality(r: dict, p: dict) -> dict[str, dict]:
    """A row's figures per text name (older results: their one ``quality`` is the seen text's)."""
    if "texts" in p:
        return r.get("quality_by_text") or {}
    return {LEGACY_TEXT: r["quality"]} if r.get("quality") else {}


def row_dppl_vs_bar(r: dict, p: dict) -> dict[str, float]:
    d = (r.get("vs_q4_k_m") or {}).get("dppl_pt")
    return d if isinstance(d, dict) else ({} if d is None else {LEGACY_TEXT: d})


def _text_label(t: dict) -> str:
    return f"{t['name']} ({t.get('role', '?')})"


def peer_head(texts: list[dict]) -> list[str]:
    return (["row", "size MB"] + [f"ΔPPL % {_text_label(t)}" for t in texts]
            + ["exact match %", "tok/s 1t", "tok/s 2t", "TTFT ms 1t", "TTFT ms 2t", "peak MB", "size vs Q4_K_M", "tok/s vs Q4_K_M (1t / 2t)",
               f"ΔPPL vs Q4_K_M pt ({' / '.join(t['name'] for t in texts)})", "exact match vs Q4_K_M pt", "goal"])


def _quality_cell(q: dict | None, key: str, spec: str, scale: float = 1.0, first_error: list | None = None) -> str:
    """One figure of one text; a failed scoring says why once per row (``first_error``), then just 'failed'."""
    q = q or {}
    if "error" in q:
        if first_error is not None and not first_error:
            first_error.append(1)
            return _status({"status": "scoring failed", "error": q["error"]})
        return "failed"
    v = q.get(key)
    return fmt(None if v is None else scale * v, spec)


def _goal_cell(g: dict | None) -> str:
    if not g:
        return DASH
    return "**yes**" if g["met"] else ("no" if g["met"] is False else "?")


def _peer_row(r: dict, p: dict) -> list[str]:
    texts = peer_texts(p)
    label = r.get("label", r.get("id", "?"))
    msg = _status(r)
    if msg:
        return [label, fmt(r.get("size_mb"), ".1f"), msg] + [""] * (len(peer_head(texts)) - 3)
    qt, t = row_quality(r, p), r.get("task") or {}
    sp = r.get("speed") or {}
    s1, s2 = sp.get("1") or {}, sp.get("2") or {}
    v = r.get("vs_q4_k_m") or {}
    em = t.get("exact_match")
    err: list = []
    qcells = [_quality_cell(qt.get(x["name"]), "perplexity_increase_pct", "+.2f", first_error=err) for x in texts]
    emc = fmt(None if em is None else 100 * em, ".1f") if "error" not in t else _status({"status": "task failed", "error": t["error"]})

    def spd(x, k, spec):
        if "error" in x:
            return "failed"
        return fmt(x.get(k), spec) if x else (DASH if not r.get("speed_note") else "ref.")
    peak = max([x.get("peak_rss_mb") for x in (s1, s2) if x.get("peak_rss_mb")] or [None])
    d1, d2 = v.get("decode_1t"), v.get("decode_2t")
    spd_ratio = DASH if d1 is None and d2 is None else f"{ratio(d1)} / {ratio(d2)}"
    dv = row_dppl_vs_bar(r, p)
    se = v.get("dppl_se_pt") or {}

    def vs_bar(name: str) -> str:
        return fmt(dv.get(name), "+.2f") + (f" ±{se[name]:.2f}" if se.get(name) is not None and dv.get(name) is not None else "")
    dppl = DASH if not dv else " / ".join(vs_bar(x["name"]) for x in texts)
    return ([label, fmt(r.get("size_mb"), ".1f")] + qcells + [emc, spd(s1, "decode_tok_s", ".1f"), spd(s2, "decode_tok_s", ".1f"),
            spd(s1, "ttft_ms", ".0f"), spd(s2, "ttft_ms", ".0f"), fmt(peak, ".0f"), ratio(v.get("size")), spd_ratio,
            dppl, fmt(v.get("exact_match_pt"), "+.1f"), _goal_cell(r.get("goal"))])


def _quality_row(r: dict, p: dict) -> list[str]:
    """PPL, mean KL and top-1 per text (the main table has ΔPPL)."""
    texts = peer_texts(p)
    msg = _status(r)
    if msg:
        return [r.get("label", r.get("id", "?")), r.get("status", "")] + [""] * (3 * len(texts) - 1)
    qt, err, cells = row_quality(r, p), [], []
    for x in texts:
        q = qt.get(x["name"])
        cells += [_quality_cell(q, "perplexity", ".3f", first_error=err), _quality_cell(q, "kl_divergence", ".4f"),
                  _quality_cell(q, "top1_agreement", ".1f", scale=100)]
    return [r.get("label", r.get("id", "?"))] + cells


def texts_line(p: dict) -> str:
    """Which texts the quality columns come from, of what kind, and their role."""
    roles = {"judge": "judge: nothing in the project calibrated, tuned, chose a recipe or tested on it",
             "seen": "seen: recipes were chosen on it before; reported, never the goal's judge",
             "tune": "tune: calibration only"}
    parts = [f"**{t['name']}** ({t.get('kind', '?')}; {roles.get(t.get('role'), t.get('role'))}): {t.get('origin', '?')}" for t in peer_texts(p)]
    return "Texts: " + "; ".join(parts) + ". Calibration (AWQ, --recipe auto) reads the tinyshakespeare head only (checked against every judge text)."


def peers_tables(p: dict, machine: dict | None = None) -> list[str]:
    texts = peer_texts(p)
    m = machine or {}
    cpu = f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} logical CPUs"
    out = []
    for g, info in (p.get("groups") or {}).items():
        rows = [r for r in p.get("rows", []) if r.get("group") == g]
        refs = info.get("references") or ({LEGACY_TEXT: info["reference"]} if info.get("reference") else {})
        ref = "; ".join(f"{n} {fmt(x.get('perplexity'), '.3f')} on {fmt(x.get('tokens_scored'), 'd')} scored tokens" for n, x in refs.items())
        qhead = ["row"] + [f"{h} {t['name']}" for t in texts for h in ("PPL", "KL", "top-1 %")]
        out += [f"**{info.get('label', g)}**: reference PyTorch fp32 PPL {ref or DASH}. Speeds (tok/s, TTFT) on {cpu}.", "",
                table(peer_head(texts), [_peer_row(r, p) for r in rows]), "",
                f"Per text ({', '.join(_text_label(t) for t in texts)}): perplexity, mean KL and top-1 agreement vs PyTorch fp32.", "",
                table(qhead, [_quality_row(r, p) for r in rows]), ""]
        bw = bandwidth_rows(rows)
        if bw:
            out += ["Weights one decode step reads (the MatMuls' and the head's, not the embedding table; "
                    "benchmarks/weights_read.py) and the memory bandwidth that makes at each row's decode speed: rows that reach "
                    "the same GB/s are bound by their bytes.", "",
                    table(["row", "MB read / token", "vs Q4_K_M", "GB/s 1t", "GB/s 2t"], bw), ""]
    return out


def bandwidth_rows(rows: list[dict]) -> list[list[str]]:
    """MB read per decode step and GB/s at 1 and 2 threads (MB x tok/s), for the rows that have both."""
    out = []
    for r in rows:
        mb = r.get("read_mb")
        if r.get("status", "ok") != "ok" or not mb:
            continue
        tok_s = [((r.get("speed") or {}).get(t) or {}).get("decode_tok_s") for t in ("1", "2")]
        gbs = [fmt(mb * x * 2**20 / 1e9, ".2f") if x else DASH for x in tok_s]
        out.append([r.get("label", r.get("id", "?")), fmt(mb, ".1f"), ratio((r.get("vs_q4_k_m") or {}).get("read")), *gbs])
    return out


def peers_intro(results: dict) -> str:
    p = results.get("peers") or {}
    s = p.get("settings") or {}
    m = results.get("machine") or {}
    peer = p.get("peer") or {}
    feats = m.get("doctor_cpu_features") or m.get("cpu_features") or []
    mask = m.get("cpu_mask")
    masked = (f" **masked to {mask['mask'].upper()} for this run** (CPUID without {mask['hidden']}: benchmarks/cpumask.py; "
              f"llama.cpp: {peer.get('system_info') or '?'})" if mask else "")
    return (f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} logical CPUs, {fmt(m.get('memory_gib'), '.0f')} GiB, CPU features "
            f"(edgetune doctor): {', '.join(feats) or '?'}{masked}; load average at start {m.get('loadavg_start', DASH)}, at end "
            f"{m.get('loadavg_end', DASH)}. Date {results.get('created', '?')}; `{results.get('command', '')}`; llama-cpp-python "
            f"{peer.get('llama_cpp_python') or DASH}. Perplexity: llama-perplexity's chunked method (chunks of {s.get('chunk')}, second "
            f"half scored) on the first {fmt(s.get('eval_tokens'), 'd')} tokens of each text, the same token ids for every engine; KL / "
            f"top-1 vs the PyTorch fp32 model of the same folder (top-{s.get('topk')} + rest). Exact match: examples/data/smarthome_eval.jsonl, "
            f"greedy, JSON compared as values ({p.get('task_metric', '?')}). Speed: {s.get('prompt_tokens')}-token prompt, {s.get('new_tokens')} new "
            f"tokens (EOS ignored), median of {s.get('rounds')} interleaved rounds, fresh process per run; peak MB = that process's VmHWM. "
            f"Ratios: each row / llama.cpp Q4_K_M of the same model, same run; ± after a ΔPPL difference: its standard error, "
            f"paired over the same scoring windows. Goal: issue 33's, judged on the judge texts only. "
            f"Columns: docs/benchmarks.md.\n\n{texts_line(p)}")


def peers_section(results: dict) -> str:
    p = results.get("peers") or {}
    if p.get("skipped"):
        return f"## edgetune vs llama.cpp (same fine-tuned model)\n\n_skipped: {p['skipped']}_"
    lines = ["## edgetune vs llama.cpp (same fine-tuned model)", "", peers_intro(results), ""] + peers_tables(p, results.get("machine"))
    if p.get("summary"):
        lines += [f"- {ln}" for ln in p["summary"]] + [""]
    for n in p.get("notes", []):
        lines += [f"_{n}_", ""]
    return "\n".join(lines).rstrip()


def readme_block(results: dict) -> str:
    """The README's benchmark block: a pure function of results.json (same JSON -> same bytes)."""
    p = results.get("peers") or {}
    if p.get("skipped") or not p.get("rows"):
        body = f"_No peer comparison in this results.json ({p.get('skipped', 'no rows')})._"
    else:
        fin = {**p, "groups": {k: v for k, v in (p.get("groups") or {}).items() if k == "finetune"}}
        body = "\n".join([peers_intro(results), ""] + peers_tables(fin, results.get("machine")) + [f"- {ln}" for ln in p.get("summary", [])])
    return f"{README_BEGIN}\n{body.rstrip()}\n{README_END}"


def update_readme(readme: Path, results: dict) -> bool:
    """Replace the generated block of README.md (between the markers); True when the file changed."""
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} block")
    new = text[:i] + readme_block(results) + text[j + len(README_END):]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    v = results.get("versions", {})
    llm = results.get("llm") or {}
    parts = [f"# edgetune benchmarks: {results.get('model', 'SmolLM2-135M-Instruct')} on {m.get('cpu') or m.get('machine', '?')}",
             "",
             f"Machine: {m.get('cpu')}, {m.get('cpu_count')} logical CPUs ({m.get('physical_cores', '?')} cores), "
             f"{fmt(m.get('memory_gib'), '.0f')} GiB; load average at start {m.get('loadavg_start', DASH)}, at end {m.get('loadavg_end', DASH)}. "
             f"Run: `{results.get('command', '')}` ({fmt(results.get('wall_s'), '.0f')} s, {results.get('created', '')}).",
             "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "."]
    for n in results.get("notes", []):
        parts += ["", f"> {n}"]
    if results.get("peers") is not None:
        parts += ["", peers_section(results)]
    if llm.get("skipped"):
        parts += ["", f"## LLM\n\n_skipped: {llm['skipped']}_"]
    elif llm:
        parts += ["", headline_section(llm), "", quant_section(llm), "", engines_section(llm), "", tuning_section(llm)]
    if results.get("finetune") is not None:
        parts += ["", finetune_section(results["finetune"])]
    if results.get("encoder") is not None:
        parts += ["", encoder_section(results["encoder"])]
    if results.get("plots"):
        parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots

def _save(fig, out: Path, name: str, written: list[str]) -> None:
    """Lay out, write out/name, close the figure and list it."""
    import matplotlib.pyplot as plt  # already imported (backend set) by the caller

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    written.append(name)


def plots(results: dict, out: Path) -> list[str]:
    """PNG plots next to results.md; returns the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    written += peer_plots(results, out, plt)
    llm = results.get("llm") or {}
    ok = [r for r in llm.get("quant", []) if r.get("status", "ok") == "ok" and (r.get("speed") or {}).get("decode_tok_s")]
    if ok:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in ok:
            x = r["speed"]["decode_tok_s"]
            y = (r.get("quality") or {}).get("perplexity_increase_pct")
            if y is None:
                continue
            ax.scatter(x, y, s=max(20, (r.get("size_mb") or 50) / 2), alpha=0.6)
            ax.annotate(r["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_ylabel("perplexity increase vs PyTorch fp32, % (lower is better)")
        ax.set_title("SmolLM2-135M quantization: speed vs quality (marker area ~ size on disk)")
        _save(fig, out, "quant_tradeoff.png", written)
    eng = [r for r in llm.get("engines", []) if r.get("status", "ok") == "ok" and (r.get("speed") or {}).get("decode_tok_s")]
    if eng:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [r["label"] for r in eng]
        vals = [r["speed"]["decode_tok_s"] for r in eng]
        bars = ax.barh(labels, vals, color="tab:blue")
        for b, r in zip(bars, eng):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {b.get_width():.0f} tok/s ({ratio(r.get('vs_torch'))})", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s")
        ax.set_title("Engines on the same prompt and token count")
        ax.set_xlim(0, max(vals) * 1.35)
        _save(fig, out, "engines.png", written)
    tun = [r for r in llm.get("tuning", []) if r.get("status", "ok") == "ok" and (r.get("speed") or {}).get("decode_tok_s")]
    if tun:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(tun) + 1.5))
        bars = ax.barh([r["label"] for r in tun], [r["speed"]["decode_tok_s"] for r in tun],
                       color=["tab:green" if r.get("kept") else "tab:gray" for r in tun])
        for b, r in zip(bars, tun):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {ratio(r.get('vs_baseline'))}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (green: kept in the tuned configuration)")
        ax.set_title("int4 CPU tuning")
        ax.set_xlim(0, max(r["speed"]["decode_tok_s"] for r in tun) * 1.2)
        _save(fig, out, "tuning.png", written)
    ft = [r for r in (results.get("finetune") or {}).get("rows", []) if r.get("status", "ok") == "ok"]
    if ft:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        names = [r["method"] for r in ft]
        a1.bar(names, [r["tokens_per_second"] for r in ft], color="tab:orange")
        a1.set_title("training tokens/s")
        a2.bar(names, [r["peak_mib"] for r in ft], color="tab:purple")
        a2.set_title("peak memory, MiB")
        _save(fig, out, "finetune.png", written)
    enc = [r for r in (results.get("encoder") or {}).get("rows", []) if r.get("status", "ok") == "ok" and r.get("latency")]
    if enc:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        names = [r["label"] for r in enc]
        xs = range(len(enc))
        ax.bar([x - 0.2 for x in xs], [r["latency"]["p50"] for r in enc], width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r["latency"]["p99"] for r in enc], width=0.4, label="p99")
        for x, r in zip(xs, enc):
            ax.text(x, r["latency"]["p99"], f"acc {fmt(r.get('accuracy'), '.1f')}%", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("latency, ms")
        ax.legend()
        ax.set_title("MiniLM SMS-spam classifier on CPU")
        _save(fig, out, "encoder.png", written)
    return written


def _peer_point(r: dict, p: dict, text: str) -> tuple[float, float] | None:
    """(decode tok/s at the most threads measured, ΔPPL % on ``text``) of a measured row."""
    sp = r.get("speed") or {}
    tps = [sp[k]["decode_tok_s"] for k in sorted(sp, key=int) if (sp[k] or {}).get("decode_tok_s")]
    d = (row_quality(r, p).get(text) or {}).get("perplexity_increase_pct")
    return (tps[-1], d) if tps and d is not None else None


def peer_plots(results: dict, out: Path, plt) -> list[str]:
    p = results.get("peers") or {}
    rows = [r for r in p.get("rows", []) if r.get("status") == "ok" and r.get("group", "finetune") == "finetune"]
    colors = {"llama.cpp": "tab:orange", "edgetune": "tab:blue", "reference": "tab:gray"}
    written: list[str] = []
    texts = peer_texts(p)
    if not texts:
        return written
    text = texts[0]  # the first judge text when there is one (judge texts come first)
    pts = [(r, _peer_point(r, p, text["name"])) for r in rows]
    pts = [(r, xy) for r, xy in pts if xy]
    if pts:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r, (x, y) in pts:
            ax.scatter(x, y, color=colors.get(r.get("toolchain"), "k"), s=40)
            ax.annotate(r["label"].replace("edgetune ", "").replace("llama.cpp ", "llama.cpp "), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("decode tokens/s, most threads measured (higher is better)")
        ax.set_ylabel(f"perplexity increase vs fp32 on {_text_label(text)}, % (lower is better)")
        ax.set_title("Same fine-tuned model: quality vs speed (blue edgetune, orange llama.cpp)")
        _save(fig, out, "peers_quality_speed.png", written)
    sz = [(r, r.get("size_mb"), (row_quality(r, p).get(text["name"]) or {}).get("perplexity_increase_pct")) for r in rows
          if r.get("toolchain") != "reference"]
    sz = [(r, x, y) for r, x, y in sz if x and y is not None]
    if sz:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r, x, y in sz:
            ax.scatter(x, y, color=colors.get(r.get("toolchain"), "k"), s=40)
            ax.annotate(r["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("file size, MB")
        ax.set_ylabel(f"perplexity increase vs fp32 on {_text_label(text)}, %")
        ax.set_title("Same fine-tuned model: size vs quality")
        _save(fig, out, "peers_size_quality.png", written)
    return written


def main(argv: list[str] | None = None) -> int:
    """`report.py [results.json]`: re-render results.md + plots; `--readme [README.md]`: regenerate README's table."""
    import argparse

    ap = argparse.ArgumentParser(description="render the benchmark report from results.json")
    ap.add_argument("results", nargs="?", default="runs/bench/results.json")
    ap.add_argument("--readme", nargs="?", const=str(ROOT / "README.md"), default=None,
                    help="only regenerate the benchmark block of README.md (default: the repository's) from the JSON")
    a = ap.parse_args(argv if argv is not None else sys.argv[1:])
    path = Path(a.results)
    results = json.loads(path.read_text())
    if a.readme:
        changed = update_readme(Path(a.readme), results)
        print(f"{a.readme}: {'updated' if changed else 'unchanged'}")
        return 0
    results["plots"] = plots(results, path.parent)
    (path.parent / "results.md").write_text(markdown(results))
    print(path.parent / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
