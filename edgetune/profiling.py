"""`edgetune profile`: per-operator timing with onnxruntime's profiler, EP assignment, CPU fallbacks.

Runs the model's graph in an onnxruntime session created from the target (providers, session
options) with profiling on, feeds representative inputs (decoder: a prefill of ``prompt_tokens``
then ``decode_steps`` single-token steps with the KV cache; encoder: ``sequence_length`` tokens),
then reads the profiler's JSON trace: every ``Node`` event carries the operator type, the node
name, the execution provider it ran on and its duration. Device-side imports only.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .cleanup import temp_dir
from .device.session import create_session
from .targets import resolve
from .validate import model_kind


def _decoder_runs(sess, cfg: dict, prompt_tokens: int, decode_steps: int, repeats: int) -> None:
    dec = cfg["model"]["decoder"]
    vocab = int(cfg["model"]["vocab_size"])
    rng = np.random.default_rng(0)
    kv = dec.get("num_key_value_heads", dec["num_attention_heads"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]

    def feeds(ids, past, total):
        f = {}
        for name, inp in inputs.items():
            if name == "input_ids":
                f[name] = ids
            elif name == "attention_mask":
                f[name] = np.ones((1, total), np.int64)
            elif name == "position_ids":
                f[name] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
            else:
                f[name] = past[name]
        return f

    for _ in range(repeats):
        dtype = np.float16 if any("float16" in i.type for n, i in inputs.items() if "past" in n) else np.float32
        past = {n: np.zeros((1, kv, 0, dec["head_size"]), dtype) for n in inputs if "past" in n}
        ids = rng.integers(0, vocab, (1, prompt_tokens), dtype=np.int64)
        total = prompt_tokens
        res = sess.run(outs, feeds(ids, past, total))
        for _ in range(decode_steps):
            named = dict(zip(outs, res))
            past = {n: named[n.replace("past_key_values", "present")] for n in past}
            ids = named[outs[0]][:, -1:].argmax(-1).astype(np.int64)
            total += 1
            res = sess.run(outs, feeds(ids, past, total))


def _encoder_runs(sess, sequence_length: int, repeats: int) -> None:
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else (1 if i == 0 else sequence_length) for i, d in enumerate(inp.shape)]
        feeds[inp.name] = np.ones(shape, np.int64) if "mask" in inp.name else np.zeros(shape, np.int64) if "type" in inp.name else np.full(shape, 7, np.int64)
    for _ in range(repeats):
        sess.run(None, feeds)


def parse_trace(path: str | os.PathLike, target_provider: str) -> dict[str, Any]:
    events = json.loads(Path(path).read_text())
    nodes: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        name = e["name"][: -len("_kernel_time")]
        n = nodes.setdefault(name, {"node": name, "op_type": args.get("op_name", "?"), "provider": args.get("provider", "?"), "total_us": 0, "calls": 0})
        n["total_us"] += int(e.get("dur", 0))
        n["calls"] += 1
    total = sum(n["total_us"] for n in nodes.values()) or 1
    by_op: dict[str, dict[str, Any]] = defaultdict(lambda: {"total_us": 0, "calls": 0, "nodes": 0, "providers": set()})
    by_provider: dict[str, dict[str, Any]] = defaultdict(lambda: {"nodes": 0, "total_us": 0})
    for n in nodes.values():
        o = by_op[n["op_type"]]
        o["total_us"] += n["total_us"]
        o["calls"] += n["calls"]
        o["nodes"] += 1
        o["providers"].add(n["provider"])
        by_provider[n["provider"]]["nodes"] += 1
        by_provider[n["provider"]]["total_us"] += n["total_us"]
    ops = sorted(({"op_type": k, **v, "providers": sorted(v["providers"]), "pct": 100.0 * v["total_us"] / total} for k, v in by_op.items()),
                 key=lambda r: -r["total_us"])
    top_nodes = sorted(({**n, "pct": 100.0 * n["total_us"] / total} for n in nodes.values()), key=lambda r: -r["total_us"])
    fallbacks = [] if target_provider == "CPUExecutionProvider" else [n for n in top_nodes if n["provider"] != target_provider]
    return {"total_us": total, "by_op_type": ops, "nodes": top_nodes, "by_provider": dict(by_provider), "fallbacks": fallbacks}


def profile(model, *, target, top: int = 15, repeats: int = 3, prompt_tokens: int = 64, decode_steps: int = 8,
            sequence_length: int = 128, trace_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Profile ``model`` on this machine with ``target``'s providers; returns tables of the costliest ops."""
    t = resolve(target)
    kind, folder = model_kind(Path(model))
    cfg = json.loads((folder / "genai_config.json").read_text()) if kind == "decoder" else None
    onnx_file = folder / (cfg["model"]["decoder"]["filename"] if cfg else "decoder.onnx" if kind == "seq2seq" else "model.onnx")
    with temp_dir("profile") as tmp:
        sess = create_session(onnx_file, t, profile_prefix=str(Path(tmp) / "ort"))
        if kind == "decoder":
            _decoder_runs(sess, cfg, prompt_tokens, decode_steps, repeats)
        elif kind == "seq2seq":  # the decoder-with-past graph (where a translation spends its time), decode_steps per sentence
            from .device import seq2seq as S

            tr = S.load(folder, t)
            tr.decoder = sess
            for _ in range(repeats):
                tr.greedy_ids(tr.source_ids("The quick brown fox jumps over the lazy dog."), max_new_tokens=decode_steps)
        else:
            _encoder_runs(sess, sequence_length, repeats)
        trace = sess.end_profiling()
        parsed = parse_trace(trace, t.ort_providers[0])
        if trace_out:
            Path(trace_out).parent.mkdir(parents=True, exist_ok=True)
            Path(trace_out).write_bytes(Path(trace).read_bytes())
    return {
        "model": str(model), "kind": kind, "target": t.name, "requested_providers": t.ort_providers,
        "session_providers": sess.get_providers(),
        "workload": ({"prompt_tokens": prompt_tokens, "decode_steps": decode_steps} if kind == "decoder"
                     else {"graph": "decoder.onnx", "decode_steps": decode_steps} if kind == "seq2seq" else {"sequence_length": sequence_length})
        | {"repeats": repeats},
        "total_ms": parsed["total_us"] / 1000, "by_provider": parsed["by_provider"],
        "fallback_nodes": len(parsed["fallbacks"]), "fallbacks": parsed["fallbacks"][:top],
        "top_op_types": parsed["by_op_type"][:top], "top_nodes": parsed["nodes"][:top],
        "trace": str(trace_out) if trace_out else None,
    }
