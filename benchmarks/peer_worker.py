"""One row of the peer benchmark, in its own process: the same measurements for onnxruntime-genai
(edgetune exports) and llama.cpp (GGUF files), on the same token ids.

    python -m benchmarks.peer_worker score   ort|llama MODEL --job a.npz [--job b.npz ...] [--threads N]   perplexity, KL, top-1 per text
    python -m benchmarks.peer_worker task    ort|llama MODEL --job task.json [--threads N]   greedy answers (token ids)
    python -m benchmarks.peer_worker speed   ort|llama MODEL --job speed.json --threads N    decode tok/s, TTFT, peak RSS
    python -m benchmarks.peer_worker quantize llama IN.gguf --out OUT.gguf --ftype Q4_K_M   llama_model_quantize

`ort` runs with the project venv (edgetune.device.llm: onnxruntime-genai, runtime LoRA adapters
activated); `llama` runs with the peer venv's python (llama-cpp-python only; edgetune.device.metrics
needs nothing but numpy; the parent puts the repository root on PYTHONPATH, so either python finds
`benchmarks` and `edgetune`). Every engine gets token ids, never text, so tokenization cannot differ.

score: one job per evaluation text (the engine is loaded once for all of them); each job.npz holds
`ids` (the evaluation tokens), `windows` ([start, end, score_from] rows: llama-perplexity's chunks) and the fp32 reference's `top_ids`/`top_logp` per scored position;
logits of each chunk come from one forward pass from an empty cache (llama.cpp: `logits_all`).
speed: the prompt ids, `new_tokens` generated with EOS ignored (greedy) after a `warmup_tokens`
warm-up; TTFT = prefill + first token, decode tok/s = (new_tokens - 1) / time of the rest;
peak_rss_mb = this process's VmHWM (load + runs). Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB (edgetune's own probe: VmHWM)."""
    from edgetune.device.measure import peak_rss_mb as probe

    return round(probe(), 1)


# ---------------------------------------------------------------- engines

class Ort:
    """An edgetune export (onnxruntime-genai folder), with its runtime LoRA adapter when it ships exactly one."""

    def __init__(self, folder: str, threads: int | None, adapter: str | None = None):
        import onnxruntime_genai as og

        from edgetune.device import llm as L

        self.L, self.og = L, og
        t0 = time.perf_counter()
        folder_p = L.find_model_folder(folder)
        cfg = og.Config(str(folder_p))
        if threads:
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
        model = og.Model(cfg)
        config = json.loads((folder_p / "genai_config.json").read_text())
        self.llm = L.LLM(folder=folder_p, model=model, tokenizer=og.Tokenizer(model), config=config, target=None,
                         load_time_s=0.0, providers=["cpu"], adapter_files=L.adapter_files(folder_p))
        files = sorted(self.llm.adapter_files)
        if adapter is None and len(files) == 1:
            adapter = files[0]
        L.set_adapter(self.llm, adapter)
        self.adapter = adapter
        self.threads = threads
        self.load_s = time.perf_counter() - t0

    def logits(self, ids):
        if self.threads and self.llm._session is None:  # scoring session: same thread count as asked
            import onnxruntime as ort

            dec = self.llm.config["model"]["decoder"]
            so = ort.SessionOptions()
            so.intra_op_num_threads = int(self.threads)
            so.log_severity_level = 3
            self.llm._session = ort.InferenceSession(str(self.llm.folder / dec["filename"]), sess_options=so, providers=["CPUExecutionProvider"])
        return self.L.logits(self.llm, ids)

    def generate(self, ids, max_new: int, eos: set[int], ignore_eos: bool = False, stamps: list | None = None) -> list[int]:
        import numpy as np

        ids = np.asarray(ids, dtype=np.int32)
        total = len(ids) + max_new
        gen = self.L._generator(self.llm, total, min_length=total if ignore_eos else 0)
        gen.append_tokens(ids)
        out: list[int] = []
        while not gen.is_done() and len(out) < max_new:
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if stamps is not None:
                stamps.append(time.perf_counter())
            if not ignore_eos and tok in eos:
                break
            out.append(tok)
        del gen
        return out


class Llama:
    """A GGUF through llama-cpp-python (the peer venv)."""

    def __init__(self, path: str, threads: int | None, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama as _L

        threads = threads or os.cpu_count() or 1
        t0 = time.perf_counter()
        kw = dict(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                  verbose=False, seed=0)
        if logits_all:
            kw["logits_all"] = True
        self.m = _L(**kw)
        self.threads = threads
        self.load_s = time.perf_counter() - t0
        self.adapter = None

    def logits(self, ids):
        import numpy as np

        self.m.reset()
        self.m.eval([int(t) for t in ids])
        return np.asarray(self.m.scores[: len(ids)], dtype=np.float32)

    def generate(self, ids, max_new: int, eos: set[int], ignore_eos: bool = False, stamps: list | None = None) -> list[int]:
        self.m.reset()
        out: list[int] = []
        for tok in self.m.generate([int(t) for t in ids], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tok = int(tok)
            if stamps is not None:
                stamps.append(time.perf_counter())
            if not ignore_eos and tok in eos:
                break
            out.append(tok)
            if len(out) >= max_new:
                break
        return out


def engine(kind: str, model: str, threads: int | None, *, n_ctx: int = 512, logits_all: bool = False, adapter: str | None = None):
    if kind == "ort":
        return Ort(model, threads, adapter)
    if kind == "llama":
        return Llama(model, threads, n_ctx, logits_all)
    raise SystemExit(f"unknown engine {kind!r}")


# ---------------------------------------------------------------- jobs

def score(kind: str, model: str, jobs: list[str], threads: int | None, adapter: str | None) -> dict:
    """Every job (one per evaluation text) with one loaded engine: {"texts": [figures per job, in order]}."""
    import numpy as np

    from edgetune.device import metrics as M

    packs = [np.load(j) for j in jobs]
    wins = [[tuple(int(x) for x in w) for w in z["windows"]] for z in packs]
    width = max(e - s for ws in wins for s, e, _ in ws)
    e = engine(kind, model, threads, n_ctx=width, logits_all=True, adapter=adapter)
    out = []
    for z, ws in zip(packs, wins):
        t0 = time.perf_counter()
        figures, series = M.score_windows(z["ids"], ws, e.logits, z["top_ids"], z["top_logp"], z["nll"])
        out.append({**figures, "window_nll_delta": [round(float(x), 6) for x in series["window_nll_delta"]],
                    "score_s": round(time.perf_counter() - t0, 1)})
    return {"texts": out, "adapter": e.adapter}


def task(kind: str, model: str, job: str, threads: int | None, adapter: str | None) -> dict:
    spec = json.loads(Path(job).read_text())
    prompts = spec["prompts"]
    n_ctx = max(len(p) for p in prompts) + spec["max_new_tokens"] + 8
    e = engine(kind, model, threads, n_ctx=max(256, n_ctx), adapter=adapter)
    eos = set(spec["eos"])
    t0 = time.perf_counter()
    outs = [e.generate(p, spec["max_new_tokens"], eos) for p in prompts]
    return {"outputs": outs, "task_s": round(time.perf_counter() - t0, 1), "adapter": e.adapter}


def speed(kind: str, model: str, job: str, threads: int | None, adapter: str | None) -> dict:
    spec = json.loads(Path(job).read_text())
    ids, new, warm = spec["prompt_ids"], int(spec["new_tokens"]), int(spec.get("warmup_tokens", 16))
    e = engine(kind, model, threads, n_ctx=max(512, len(ids) + new + 8), adapter=adapter)
    from edgetune.device.measure import time_generation

    e.generate(ids, warm, set(), ignore_eos=True)  # kernels, arena and KV buffers warm

    def generate(stamps: list) -> list[int]:
        toks = e.generate(ids, new, set(), ignore_eos=True, stamps=stamps)
        if len(stamps) != new:
            raise RuntimeError(f"generated {len(stamps)} of {new} tokens")
        return toks

    t = time_generation(generate, repeats=int(spec.get("repeats", 1)))  # edgetune's own decode timer
    ttft, dec, toks = t["ttft_ms"], t["decode_tok_s"], t["tokens"]
    return {"threads": e.threads, "load_s": round(e.load_s, 3), "ttft_ms": round(statistics.median(ttft), 2),
            "decode_tok_s": round(statistics.median(dec), 2), "ttft_ms_samples": [round(x, 2) for x in ttft],
            "decode_tok_s_samples": [round(x, 2) for x in dec], "peak_rss_mb": peak_rss_mb(), "generated_ids": toks,
            "adapter": e.adapter}


def quantize(src: str, out: str, ftype: str, threads: int | None) -> dict:
    """llama.cpp's quantizer (what `llama-quantize` runs) through llama-cpp-python: f32 GGUF -> ftype."""
    import llama_cpp

    name = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"
    if not hasattr(llama_cpp, name):
        raise SystemExit(f"llama-cpp-python {llama_cpp.__version__} has no {name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.nthread = int(threads or os.cpu_count() or 1)
    t0 = time.perf_counter()
    import ctypes

    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({ftype}) returned {rc}")
    return {"ftype": ftype, "seconds": round(time.perf_counter() - t0, 1), "size_mb": round(os.path.getsize(out) / 2**20, 2),
            "llama_cpp_python": llama_cpp.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job_kind", choices=["score", "task", "speed", "quantize"])
    ap.add_argument("engine", choices=["ort", "llama"])
    ap.add_argument("model")
    ap.add_argument("--job", action="append", help="job file (score: one per text, repeat the option)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--adapter", default=None, help="runtime adapter name of an ort export (default: its only one)")
    ap.add_argument("--out")
    ap.add_argument("--ftype")
    a = ap.parse_args(argv)
    if a.job_kind == "quantize":
        res = quantize(a.model, a.out, a.ftype, a.threads)
    elif a.job_kind == "score":
        res = score(a.engine, a.model, a.job, a.threads, a.adapter)
    else:
        if len(a.job or []) != 1:
            raise SystemExit(f"{a.job_kind} takes one --job")
        res = {"task": task, "speed": speed}[a.job_kind](a.engine, a.model, a.job[0], a.threads, a.adapter)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
