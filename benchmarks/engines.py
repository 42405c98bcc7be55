"""Speed and scoring workers for the benchmark: one engine per process, so peak memory is its own.

Speed (every engine gets the same prompt token ids and generates exactly `--new-tokens` tokens,
EOS ignored, greedy; `--warmup` untimed runs of `--warmup-tokens` then `--repeats` timed runs; medians reported):

    python -m benchmarks.engines ort-genai <export folder> --prompt-ids ids.json [--overlay '{"search": {...}}']
    python -m benchmarks.engines torch <hf folder> --prompt-ids ids.json
    python -m benchmarks.engines llama.cpp <file.gguf> --prompt-ids ids.json [--threads N]

Scoring llama.cpp against an edgetune reference pack (same token ids and windows as
`edgetune validate`; perplexity, KL over the pack's top-k, top-1 agreement):

    python -m benchmarks.engines llama.cpp-score <file.gguf> --pack <reference pack folder>

Each prints one JSON line on stdout. Timings: `ttft_ms` = prompt prefill + first token,
`decode_tok_s` = (new_tokens - 1) / time of the remaining tokens. `peak_rss_mb` is this process's
VmHWM (load + runs), which unlike ru_maxrss does not inherit the parent's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


DEADLINE = [float("inf")]  # --max-seconds: stop repeating once past it (after at least one timed run)


def _peak_rss_mb() -> float:
    from edgetune.device.measure import peak_rss_mb

    return round(peak_rss_mb(), 1)


def _timed(generate, new_tokens: int, warmup: int, warmup_tokens: int, repeats: int) -> dict:
    """``generate(stamps, n)`` makes n tokens, stamping each: ``warmup`` untimed runs of ``warmup_tokens``, then
    edgetune's decode timer (:func:`edgetune.device.measure.time_generation`), no new run once past --max-seconds."""
    from edgetune.device.measure import time_generation

    for _ in range(warmup):
        generate([], warmup_tokens)
    return time_generation(lambda stamps: generate(stamps, new_tokens), repeats=repeats, stop=lambda: time.perf_counter() > DEADLINE[0])


def _summary(load_s: float, t: dict, new_tokens: int, prompt_tokens: int, extra: dict) -> dict:
    ttft, dec = t["ttft_ms"], t["decode_tok_s"]
    return {
        "load_s": round(load_s, 3),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": len(ttft),
        "tokens_per_run": t["tokens_per_run"],  # fewer than new_tokens: a run cut short by --max-seconds
        "ttft_ms": round(statistics.median(ttft), 2),
        "ttft_ms_samples": [round(x, 2) for x in ttft],
        "decode_tok_s": round(statistics.median(dec), 2),
        "decode_tok_s_samples": [round(x, 2) for x in dec],
        "peak_rss_mb": _peak_rss_mb(),
        "generated_ids": [int(x) for x in t["tokens"]],
        **extra,
    }


def ort_genai(folder: str, ids: list[int], new_tokens: int, warmup: int, repeats: int, threads: int | None, overlay: dict | None,
              warmup_tokens: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    ov = json.loads(json.dumps(overlay or {}))
    if threads:
        ov.setdefault("model", {}).setdefault("decoder", {}).setdefault("session_options", {})["intra_op_num_threads"] = threads
    t0 = time.perf_counter()
    config = og.Config(folder)
    if ov:
        config.overlay(json.dumps(ov))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    prompt = np.asarray(ids, dtype=np.int32)

    def generate(stamps: list, want: int) -> list[int]:
        params = og.GeneratorParams(model)
        total = len(ids) + want
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        cut = False
        while len(stamps) < want and not (stamps and gen.is_done()):
            gen.generate_next_token()
            stamps.append(time.perf_counter())
            if want == new_tokens and len(stamps) >= 16 and time.perf_counter() > DEADLINE[0]:
                cut = True  # a very slow model: decode speed from the tokens so far (at least 16)
                break
        if len(stamps) != want and not cut:
            raise RuntimeError(f"onnxruntime-genai stopped after {len(stamps)} of {want} tokens")
        return list(gen.get_sequence(0))[len(ids):]

    timing = _timed(generate, new_tokens, warmup, warmup_tokens, repeats)
    cfg = json.loads(open(os.path.join(folder, "genai_config.json")).read())
    so = cfg["model"]["decoder"].get("session_options", {})
    so.update(((ov.get("model") or {}).get("decoder") or {}).get("session_options") or {})
    share = (ov.get("search") or {}).get("past_present_share_buffer", cfg.get("search", {}).get("past_present_share_buffer"))
    return _summary(load_s, timing, new_tokens, len(ids), {
        "engine": "onnxruntime-genai", "overlay": ov or None,
        # genai's default is hardware_concurrency / 2 threads when the config sets none
        "threads": so.get("intra_op_num_threads") or max(1, (os.cpu_count() or 2) // 2),
        "graph_optimization_level": so.get("graph_optimization_level", "ORT_ENABLE_ALL"),
        "past_present_share_buffer": share,
    })


def torch_eager(folder: str, ids: list[int], new_tokens: int, warmup: int, repeats: int, threads: int | None, overlay: dict | None,
                warmup_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    if threads:
        torch.set_num_threads(threads)

    class Stamp(StoppingCriteria):
        def __init__(self, stamps: list):
            self.t = stamps

        def __call__(self, input_ids, scores, **kw):  # called once per generated token
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(x)
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def generate(stamps: list, want: int) -> list[int]:
        out = model.generate(x, attention_mask=mask, max_new_tokens=want, min_new_tokens=want, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([Stamp(stamps)]), pad_token_id=pad)
        n = out.shape[1] - x.shape[1]
        if n != want or len(stamps) != want:
            raise RuntimeError(f"transformers generated {n} of {want} tokens")
        return out[0, x.shape[1]:].tolist()

    with torch.inference_mode():
        timing = _timed(generate, new_tokens, warmup, warmup_tokens, repeats)
    import transformers

    return _summary(load_s, timing, new_tokens, len(ids), {
        "engine": "pytorch-eager-fp32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__})


def llama_cpp(path: str, ids: list[int], new_tokens: int, warmup: int, repeats: int, threads: int | None, overlay: dict | None,
              warmup_tokens: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    threads = threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=max(512, len(ids) + new_tokens + 8), n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False, seed=0)
    load_s = time.perf_counter() - t0

    def generate(stamps: list, want: int) -> list[int]:
        llm.reset()
        got: list[int] = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(int(tok))
            stamps.append(time.perf_counter())
            if len(got) == want:
                break
        return got

    timing = _timed(generate, new_tokens, warmup, warmup_tokens, repeats)
    return _summary(load_s, timing, new_tokens, len(ids), {
        "engine": "llama.cpp", "threads": threads, "llama_cpp_python": llama_cpp.__version__})


def llama_cpp_score(path: str, pack_dir: str, threads: int | None) -> dict:
    """Perplexity / KL / top-1 of the GGUF on the pack's token ids and windows (as `edgetune validate` scores an export)."""
    import numpy as np
    from llama_cpp import Llama

    from edgetune.device import metrics as M
    from edgetune.validate.reference import load_pack

    pack = load_pack(pack_dir)
    meta, ids = pack.meta, pack.arrays["ids"]
    ws = M.windows(len(ids), meta["window"], meta["stride"], meta["method"])
    width = max(e - s for s, e, _ in ws)
    threads = threads or os.cpu_count() or 1
    llm = Llama(model_path=path, n_ctx=width, n_batch=width, n_ubatch=width, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0)

    def logits(x):
        llm.reset()
        llm.eval([int(t) for t in x])
        return np.asarray(llm.scores[: len(x)], dtype=np.float32)

    t0 = time.perf_counter()
    figures, _ = M.score_windows(ids, ws, logits, pack.arrays["top_ids"], pack.arrays["top_logp"], pack.arrays["nll"])
    return {**figures, "score_s": round(time.perf_counter() - t0, 1)}


ENGINES = {"ort-genai": ort_genai, "torch": torch_eager, "llama.cpp": llama_cpp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", choices=sorted(ENGINES) + ["llama.cpp-score"])
    ap.add_argument("model")
    ap.add_argument("--prompt-ids", help="JSON file with a list of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warmup-tokens", type=int, default=None, help="tokens per warm-up run (default: --new-tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None, help="no further timed runs once this many seconds have passed")
    ap.add_argument("--overlay", default=None, help="onnxruntime-genai config overlay (JSON)")
    ap.add_argument("--pack", default=None, help="reference pack folder (llama.cpp-score)")
    a = ap.parse_args(argv)
    if a.max_seconds:
        DEADLINE[0] = time.perf_counter() + a.max_seconds
    if a.engine == "llama.cpp-score":
        result = llama_cpp_score(a.model, a.pack, a.threads)
    else:
        with open(a.prompt_ids) as f:
            ids = [int(t) for t in json.load(f)]
        result = ENGINES[a.engine](a.model, ids, a.new_tokens, a.warmup, a.repeats, a.threads, json.loads(a.overlay) if a.overlay else None,
                                   a.warmup_tokens or a.new_tokens)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
