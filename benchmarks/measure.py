"""`make bench`: the measurements of one export: speed (each run in a fresh process, `python -m benchmarks.engines`),
interleaved rounds of several configurations, and quality (`edgetune validate` against the fp32 reference pack)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .common import TARGET, child_env

WARMUP_TOKENS = 16  # a short untimed generation per process: kernels, arena and KV buffers warm


def speed(engine: str, model: Path | str, s: dict, ids_file: Path, *, threads: int | None = None, overlay: dict | None = None,
          repeats: int | None = None, max_seconds: float | None = None) -> dict:
    """One engine in a fresh process (benchmarks.engines): same prompt ids, s['new_tokens'] new tokens, medians."""
    cmd = [sys.executable, "-m", "benchmarks.engines", engine, str(model), "--prompt-ids", str(ids_file), "--new-tokens", str(s["new_tokens"]),
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
