"""Packed projections: one linear holding several (Phi-3 / Phi-4-mini's ``qkv_proj`` = [q; k; v] and ``gate_up_proj`` =
[gate; up], llama.cpp's ``attn_qkv`` / ``ffn_up``), and the row block of each part.

The builder splits a packed linear into its parts where it needs them (gate/up always; q/k/v when a LoRA is on
them). The exact GGUF transcode (``gguf_export``) and the separate LoRA adapters (``adapters``) both map a part back
to its rows of the packed tensor here. Pure Python.
"""

from __future__ import annotations

from ..errors import CheckFailed

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {p: packed for packed, parts in PACKED.items() for p in parts}  # part -> its packed linear


def part_rows(part: str, n: int, q: int, kv: int) -> slice:
    """The rows that ``part`` takes of its packed tensor of ``n`` rows: gate/up are halves; q/k/v are ``q`` rows
    (heads x head_dim) and ``kv`` rows (kv_heads x head_dim) twice, unequal with grouped-query attention
    (Phi-4-mini: 24/8 heads)."""
    if PART_OF[part] == "gate_up_proj":
        return slice(0, n // 2) if part == "gate_proj" else slice(n // 2, n)
    if q + 2 * kv != n:
        raise CheckFailed(f"a packed qkv tensor of {n} rows is not q {q} + k/v 2 x {kv}",
                          hint="a layout edgetune does not know: report it with the model's config.json")
    return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, n)}[part]
