"""Latency benchmark, run in a fresh process so load time and peak memory are the model's own.

    python -m edgetune.device.bench MODEL [--target T] [--prompt-tokens P] [--max-tokens N]
                                          [--repeats R] [--warmup W] [--batch B]

Prints one JSON object on stdout. Device-only imports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .measure import peak_rss_mb, size_on_disk_mb, summary, time_generation

_FILLER = ("The quick brown fox jumps over the lazy dog while the edge device measures how fast "
           "it can read and write tokens. ")


def bench_llm(folder: str, target, prompt_tokens: int, max_tokens: int, repeats: int, warmup: int) -> dict:
    from . import llm as L

    rss0 = peak_rss_mb()
    m = L.load(folder, target)
    ids = L.encode(m, _FILLER * (1 + prompt_tokens // 8))[:prompt_tokens]

    def generate(stamps: list) -> None:
        gen = L._generator(m, len(ids) + max_tokens, min_length=len(ids) + max_tokens)
        gen.append_tokens(ids.astype(np.int32))
        while len(stamps) < max_tokens and not (stamps and gen.is_done()):
            gen.generate_next_token()
            gen.get_next_tokens()
            stamps.append(time.perf_counter())
        del gen

    t = time_generation(generate, repeats=repeats, warmup=warmup)
    ttft, decode_tps, e2e = t["ttft_ms"], t["decode_tok_s"], t["end_to_end_s"]
    return {
        "kind": "decoder",
        "providers": m.providers,
        "load_time_s": m.load_time_s,
        "prompt_tokens": int(len(ids)),
        "output_tokens": int(max_tokens),
        "repeats": repeats,
        "warmup": warmup,
        "time_to_first_token_ms": summary(ttft),
        "decode_tokens_per_s": summary(decode_tps),
        "end_to_end_s": summary(e2e),
        "samples": {"time_to_first_token_ms": ttft, "decode_tokens_per_s": decode_tps},
        "peak_memory_mb": peak_rss_mb(),
        "baseline_memory_mb": rss0,
        "size_mb": size_on_disk_mb(m.folder),
    }


def bench_encoder(folder: str, target, seq_tokens: int, repeats: int, warmup: int, batch: int) -> dict:
    from . import encoder as E

    rss0 = peak_rss_mb()
    enc = E.load(folder, target)
    text = " ".join((_FILLER * (1 + seq_tokens // 8)).split()[: max(1, seq_tokens - 2)])
    feeds = E.tokenize(enc, [text] * batch)
    name = enc.session.get_outputs()[0].name
    lat = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        enc.session.run([name], feeds)
        if r >= warmup:
            lat.append((time.perf_counter() - t0) * 1000)
    s = summary(lat)
    return {
        "kind": "encoder",
        "providers": enc.session.get_providers(),
        "load_time_s": enc.load_time_s,
        "sequence_tokens": int(feeds["input_ids"].shape[1]),
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "latency_ms": s,
        "samples": {"latency_ms": lat},
        "throughput_per_s": batch * 1000.0 / s["mean"] if s else None,
        "peak_memory_mb": peak_rss_mb(),
        "baseline_memory_mb": rss0,
        "size_mb": size_on_disk_mb(enc.folder),
    }


def run_in_subprocess(folder, target_source: str | None, *, kind: str, prompt_tokens: int, max_tokens: int,
                      repeats: int, warmup: int, batch: int = 1, timeout: float = 1800) -> dict:
    """Run this benchmark in a fresh interpreter and return its JSON."""
    import subprocess

    from ..errors import EdgetuneError

    cmd = [sys.executable, "-m", "edgetune.device.bench", str(folder), "--kind", kind, "--prompt-tokens", str(prompt_tokens),
           "--max-tokens", str(max_tokens), "--repeats", str(repeats), "--warmup", str(warmup), "--batch", str(batch)]
    if target_source:
        cmd += ["--target", str(target_source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        err = EdgetuneError(f"latency benchmark failed: {last}")
        err.exit_code = proc.returncode if proc.returncode in (1, 2, 3) else 4
        raise err
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgetune.device.bench")
    ap.add_argument("model")
    ap.add_argument("--kind", choices=["decoder", "encoder"], default=None)
    ap.add_argument("--target", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    from ..errors import EdgetuneError

    kind = a.kind or ("decoder" if (Path(a.model) / "genai_config.json").is_file() or (Path(a.model) / "model" / "genai_config.json").is_file() else "encoder")
    try:
        if kind == "decoder":
            res = bench_llm(a.model, a.target, a.prompt_tokens, a.max_tokens, a.repeats, a.warmup)
        else:
            res = bench_encoder(a.model, a.target, a.prompt_tokens, a.repeats, a.warmup, a.batch)
    except EdgetuneError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
