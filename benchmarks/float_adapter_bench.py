"""Float adapter vs merged: task exact match and decode speed of onnxruntime-genai exports.

    # greedy exact match on chat JSONL (the last assistant turn is the gold answer)
    python -m benchmarks.float_adapter_bench exact examples/data/smarthome_eval.jsonl NAME=FOLDER ...
    # decode tok/s, interleaved rounds in one process, same prompt ids, EOS ignored, greedy
    python -m benchmarks.float_adapter_bench speed NAME=FOLDER ... [--threads 1 --new-tokens 100 --rounds 5]

Each prints one JSON object on stdout. Exact match: the decoded answer equals the gold text after
stripping whitespace (``exact``), or both parse as the same JSON value (``json_equal``).
Speed: per model the median over rounds of (new_tokens - 1) / time after the first new token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _load(folder: str, threads: int | None):
    import onnxruntime_genai as og

    from edgetune.device import llm as dev

    llm = dev.load(folder)
    if threads:  # reload with the thread count in the session options
        cfg = og.Config(str(llm.folder))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        llm.model = og.Model(cfg)
        llm.tokenizer = og.Tokenizer(llm.model)
    return llm


def exact(data: str, models: dict[str, str], max_new: int, threads: int | None) -> dict:
    from edgetune.device import llm as dev

    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    out = {"data": data, "examples": len(rows), "max_new_tokens": max_new, "models": {}}
    for name, folder in models.items():
        llm = _load(folder, threads)
        hit = jeq = 0
        t0 = time.perf_counter()
        answers = []
        for r in rows:
            msgs = r["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            gold = msgs[last]["content"].strip()
            got = dev.decode(llm, dev.generate_ids(llm, dev.prompt_ids(llm, msgs[:last]), max_new)).strip()
            hit += int(got == gold)
            try:
                jeq += int(json.loads(got) == json.loads(gold))
            except ValueError:
                pass
            answers.append(got)
        out["models"][name] = {"folder": folder, "exact": hit / len(rows), "json_equal": jeq / len(rows),
                               "seconds": round(time.perf_counter() - t0, 1), "first_answers": answers[:3]}
        print(f"{name}: exact {hit}/{len(rows)}, json_equal {jeq}/{len(rows)}", file=sys.stderr)
    return out


def speed(models: dict[str, str], new_tokens: int, rounds: int, threads: int | None, prompt: str) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from edgetune.device import llm as dev

    llms = {n: _load(f, threads) for n, f in models.items()}
    ids = None
    times: dict[str, list[float]] = {n: [] for n in llms}
    from edgetune.device.measure import time_generation

    def generate(llm, stamps: list) -> None:
        params = og.GeneratorParams(llm.model)
        total = len(ids) + new_tokens
        # the KV buffer at least the sliding window (genai 0.18 refuses a shorter one: Gemma, Mistral, Phi-3)
        params.set_search_options(max_length=dev.kv_capacity(llm, total), min_length=total, do_sample=False, top_k=1)
        gen = og.Generator(llm.model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        for _ in range(new_tokens):
            gen.generate_next_token()
            stamps.append(time.perf_counter())

    for r in range(rounds + 1):  # round 0 = warm-up, untimed
        for name, llm in llms.items():
            if ids is None:
                ids = dev.prompt_ids(llm, prompt)
            t = time_generation(lambda stamps: generate(llm, stamps), repeats=1)  # edgetune's decode timer
            if r:
                times[name].append(t["decode_tok_s"][0])
    res = {n: {"folder": models[n], "decode_tok_s_median": round(statistics.median(v), 2), "decode_tok_s": [round(x, 2) for x in v]}
           for n, v in times.items()}
    names = list(res)
    if len(names) > 1:
        for n in names[1:]:
            res[n]["ratio_to_" + names[0]] = round(res[n]["decode_tok_s_median"] / res[names[0]]["decode_tok_s_median"], 3)
    return {"threads": threads, "new_tokens": new_tokens, "rounds": rounds, "prompt_tokens": len(ids), "models": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("exact")
    e.add_argument("data")
    e.add_argument("models", nargs="+", help="NAME=FOLDER")
    e.add_argument("--max-new-tokens", type=int, default=48)
    e.add_argument("--threads", type=int)
    s = sub.add_parser("speed")
    s.add_argument("models", nargs="+", help="NAME=FOLDER")
    s.add_argument("--new-tokens", type=int, default=100)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--prompt", default="Turn on the kitchen lights at 7 pm and tell me the weather.")
    a = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in a.models)
    if a.cmd == "exact":
        res = exact(a.data, models, a.max_new_tokens, a.threads)
    else:
        res = speed(models, a.new_tokens, a.rounds, a.threads, a.prompt)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
