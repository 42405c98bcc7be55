"""Packed projections: one linear holding several (Phi-3 / Phi-4-mini's ``qkv_proj`` = [q; k; v] and ``gate_up_proj`` =
[gate; up], llama.cpp's ``attn_qkv`` / ``ffn_up``), and the row block of each part.

The builder splits a packed linear into its parts where it needs them (gate/up always; q/k/v when a LoRA is on
them). The exact GGUF transcode (``gguf_export``) and the separate LoRA adapters (``adapters``) both map a part back
to its rows of the packed tensor here.

Also the one mapping between the builder's MatMul node names (``/model/layers.3/attn/qkv_proj/MatMul``) and the
HF linears they compute (``model.layers.3.self_attn.q_proj`` ...): the mixed-precision rules, the importance-weighted
quantizers and neural-compressor's weight check read it. Pure Python.
"""

from __future__ import annotations

import re

from ...errors import CheckFailed

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {p: packed for packed, parts in PACKED.items() for p in parts}  # part -> its packed linear

# what edgetune packs itself (export/decoder/pack.py: siblings that read one input), besides the checkpoints' own
SIBLINGS = {**PACKED, "qk_proj": ("q_proj", "k_proj")}

BLOCKS = {"attn": "self_attn", "mlp": "mlp"}  # the builder's block name -> the HF module it stands for
# every linear of a decoder layer, packed or not -> its builder block
LINEARS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn", "qkv_proj": "attn", "qk_proj": "attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "gate_up_proj": "mlp"}
HEAD = "/lm_head/MatMul"
_NODE = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>[a-z_]+)/MatMul")


def builder_linear(node_name: str) -> tuple[int, str, str] | None:
    """'/model/layers.3/attn/qkv_proj/MatMul_Q4' -> (3, 'attn', 'qkv_proj'); None for a node of no decoder linear."""
    m = _NODE.match(node_name)
    return (int(m["layer"]), m["block"], m["proj"]) if m else None


def hf_linears(node_name: str) -> tuple[str, ...] | None:
    """The HF linears a builder MatMul computes, in their packed order: ``('lm_head',)`` for the head,
    ``('model.layers.3.self_attn.q_proj', ...k_proj, ...v_proj)`` for a packed qkv; None for anything else."""
    if node_name == HEAD:
        return ("lm_head",)
    parsed = builder_linear(node_name)
    if parsed is None or LINEARS.get(parsed[2]) != parsed[1]:
        return None
    layer, block, proj = parsed
    return tuple(f"model.layers.{layer}.{BLOCKS[block]}.{p}" for p in SIBLINGS.get(proj, (proj,)))


def packed_name(projs) -> str | None:
    """The name of the packed linear whose parts are exactly ``projs`` (gate_proj + up_proj -> gate_up_proj), if any."""
    return next((name for name, parts in SIBLINGS.items() if sorted(parts) == sorted(projs)), None)


def builder_node(layer: int, proj: str) -> str:
    """(3, 'v_proj') -> '/model/layers.3/attn/v_proj/MatMul': the builder's name for that linear's MatMul."""
    return f"/model/layers.{layer}/{LINEARS[proj]}/{proj}/MatMul"


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
