"""`make bench`: what the LLM section measures: every export variant `edgetune.export.export` offers (precisions,
the int4 grid from the target schema) and the onnxruntime-genai session options tried, one change each."""

from __future__ import annotations

import os
from typing import Any

from .common import TARGET

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
