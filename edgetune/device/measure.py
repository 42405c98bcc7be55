"""Latency, memory and size measurements (device side: stdlib + numpy).

Warm-up runs are excluded; every figure keeps its spread (min, p50, p90, p99, max, std).
Peak memory is the peak resident set of the process (``getrusage``), which is why the latency
benchmark runs in a fresh process (``python -m edgetune.device.bench``): its peak is the model's
load + run, not the host's torch reference.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def summary(samples: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {}
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def time_generation(generate: Callable[[list], object], *, repeats: int, warmup: int = 0,
                    stop: Callable[[], bool] | None = None) -> dict[str, list]:
    """The one decode timer, for every engine: ``generate(stamps)`` runs one generation after the prompt and appends
    ``time.perf_counter()`` once per new token (the first stamp ends the prefill), returning the generated ids.

    Per timed run: time to first token (ms, from the call to the first stamp), decode tokens/s (tokens after the
    first over the time between the first and the last stamp) and end to end (s, to the last stamp). Used by
    ``python -m edgetune.device.bench`` and by the benchmarks' engine workers, so every engine is timed alike.
    ``stop()``: checked before each timed run after the first; True ends the series early (a time budget).
    """
    out: dict[str, list] = {"ttft_ms": [], "decode_tok_s": [], "end_to_end_s": [], "tokens_per_run": [], "tokens": []}
    for r in range(warmup + repeats):
        if stop is not None and out["ttft_ms"] and stop():
            break
        stamps: list[float] = []
        t0 = time.perf_counter()
        tokens = generate(stamps)
        if not stamps:
            raise RuntimeError("the generation produced no token")
        out["tokens"] = list(tokens) if tokens is not None else []
        if r < warmup:
            continue
        out["ttft_ms"].append((stamps[0] - t0) * 1000)
        if len(stamps) > 1:
            out["decode_tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        out["end_to_end_s"].append(stamps[-1] - t0)
        out["tokens_per_run"].append(len(stamps))
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    On Linux this is ``VmHWM`` of /proc/self/status (the high-water mark of this address
    space): unlike ``getrusage``'s ``ru_maxrss``, it does not inherit the parent's peak
    across fork + exec, which would charge the host's torch to the benchmark.
    """
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def size_on_disk_mb(folder: str | os.PathLike) -> float:
    p = Path(folder)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
    return sum(f.stat().st_size for f in files) / 2**20
