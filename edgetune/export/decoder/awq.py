"""Activation-aware int4 scaling (AWQ), folded exactly into the checkpoint before the builder's RTN.

For the linears that read one input x, per-input-channel scales s move into the weights and out of
the op that makes x: ``W x = (W diag(s)) (x / s)``. In float nothing changes (checked on the
logits); after int4 rounding the input channels that carry large activations get finer steps,
which is where the rounding error of ``W x`` comes from (AWQ, Lin et al. 2023). Per decoder layer:

==========  ==================================  =============================================
group       linears (columns scaled by s)       x / s made by
==========  ==================================  =============================================
attn-in     q_proj, k_proj, v_proj              input_layernorm weight
mlp-in      gate_proj, up_proj                  post_attention_layernorm weight
down        down_proj                           up_proj rows (+ bias): act(gate) * up / s
o           o_proj                              v_proj rows (+ bias), s shared by the query
                                                heads of one kv head (GQA: they read the same v)
==========  ==================================  =============================================

The layouts (``_LAYOUTS``): Llama's above (llama, mistral, qwen2, qwen3: qwen3's q/k norms act on
q_proj/k_proj's outputs, not their inputs); Phi-3 (phi3: Phi-3/3.5-mini and Phi-4-mini) packs
q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``, so attn-in and mlp-in scale the
fused weights' columns, the down group divides the up rows (the second half of ``gate_up_proj``)
and the o group the v rows (the last ``kv_heads * head_dim`` rows of ``qkv_proj``); Gemma (gemma,
gemma2, gemma3_text) normalizes with ``x * (1 + w)``, so ``x / s`` is ``w' = (1 + w) / s - 1``, and
Gemma 2 / 3's MLP reads ``pre_feedforward_layernorm``. Refused (the folds would not be exact): phi
(Phi-2: parallel attention and MLP behind one LayerNorm with a bias), olmo (LayerNorm without
weights), granite, nemotron, chatglm (not worked out).

Row scaling of up_proj / v_proj does not change their own int4 error (a block runs along a row,
its scale scales with it). ``s = mean|x|^a`` (llm-awq's form, normalized to a geometric mean of 1),
``a`` searched on a grid of 20 per group for the least output error ``|x W^T - x (Q(W s)/s)^T|^2``
on calibration activations, where Q is exactly the export's grid (onnxruntime's
``quantize_matmul_4bits``, the function the builder's RTN calls, same block and symmetry). ``a = 0``
is RTN itself, so the chosen scales never do worse than RTN on that measure. The scales come from
the float model's activations in one pass (each fold is exact in float, so later layers see the
same inputs).

Why own code: neural-compressor 3.10's AWQ fails on transformers 4.57 (``torch.jit`` trace) and saves
a layout neither the builder nor onnxruntime-genai reads (``inc-awq``, docs/llm.md); NNCF's ONNX AWQ
is not in the pinned set and matches MatMul patterns of its own ONNX graphs, not the builder's fused
SimplifiedLayerNormalization/GroupQueryAttention graph. Folding into the checkpoint keeps the builder
(its graph, genai_config and tokenizer) and the plain prepacked MatMulNBits kernel: AWQ adds no node.

Host only: torch, transformers and onnxruntime's quantizer are imported inside the functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ...errors import BadInput, CheckFailed, require

# model type -> (layout, norm form): the layouts whose folds are exact (see the module docstring)
_LAYOUTS = {"llama": ("llama", "w"), "mistral": ("llama", "w"), "qwen2": ("llama", "w"), "qwen3": ("llama", "w"),
            "phi3": ("phi3", "w"), "gemma": ("llama", "1+w"), "gemma2": ("gemma", "1+w"), "gemma3_text": ("gemma", "1+w")}
SUPPORTED = tuple(_LAYOUTS)
GRID = 20
MAX_ROWS = 512  # calibration rows kept per group for the search (strided over all tokens)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
SKIP_FILES = ("edgetune.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_supported(model_dir: Path) -> None:
    import json

    mt = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if mt not in SUPPORTED:
        raise BadInput(f"int4 algorithm 'awq' does not know the layer layout of model type '{mt}'",
                       hint=f"use it with {', '.join(SUPPORTED)}, or --int4-algorithm rtn/gptq/hqq")


def ort_dequant(w, *, block_size: int, symmetric: bool):
    """``w`` [N, K] (torch) rounded onto onnxruntime's MatMulNBits int4 RTN grid and dequantized, same shape."""
    import numpy as np
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

    n, k = w.shape
    kb = (k + block_size - 1) // block_size
    w_kn = np.ascontiguousarray(w.detach().float().numpy().T)
    scales = np.zeros((n * kb,), dtype=np.float32)
    packed = np.zeros((n, kb, block_size // 2), dtype=np.uint8)
    zp = np.zeros((n * ((kb + 1) // 2),), np.uint8)
    quantize_matmul_4bits(packed, w_kn, scales, zp, block_size, n, k, symmetric)
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, kb, block_size).astype(np.float32)
    zero = (np.full((n, kb), 8.0, np.float32) if symmetric
            else np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :kb].astype(np.float32))
    deq = ((q - zero[..., None]) * scales.reshape(n, kb, 1)).reshape(n, kb * block_size)[:, :k]
    return torch.from_numpy(np.ascontiguousarray(deq))


class _Stats:
    """Per group: mean |x| per input channel over all calibration tokens, and a strided sample of rows."""

    def __init__(self, stride: int):
        self.stride, self.abs_sum, self.count, self.rows = stride, None, 0, []

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        self.rows.append(x[::self.stride].clone())

    def result(self):
        import torch

        rows = torch.cat(self.rows)[:MAX_ROWS]
        return self.abs_sum / max(self.count, 1), rows


def _search(x_mean, rows, weights, q: dict[str, Any], tie=None):
    """The grid point a (s = x_mean^a) with the least int4 output error over the group's linears."""
    import torch

    w = torch.cat([m.detach().float() for m in weights])
    ref = rows @ w.T
    best = None
    for i in range(GRID):
        a = i / GRID
        s = x_mean.clamp(min=1e-8).pow(a)
        if tie is not None:
            s = tie(s)
        s = s / torch.sqrt(s.max() * s.min())
        wq = ort_dequant(w * s, block_size=q["block_size"], symmetric=q["symmetric"]) / s
        err = float(((rows @ wq.T - ref) ** 2).mean())
        if best is None or err < best[1]:
            best = (a, err, s)
        if i == 0:
            rtn_err = err
    a, err, s = best
    return s, {"alpha": a, "err_rtn": rtn_err, "err_awq": err, "rows": int(rows.shape[0])}


def _divide_norm(norm, form: str):
    """x / s made by an RMSNorm: ``w / s``, or for Gemma's ``x * (1 + w)``, ``w' = (1 + w) / s - 1``."""
    def fold(s) -> None:
        if form == "1+w":
            norm.weight.copy_((1 + norm.weight) / s - 1)
        else:
            norm.weight.div_(s)
    return fold


def _divide_rows(linear, start: int = 0, stop: int | None = None):
    """x / s made by rows ``start:stop`` of a linear (its output channels), bias included."""
    def fold(s) -> None:
        linear.weight[start:stop].div_(s[:, None])
        if linear.bias is not None:
            linear.bias[start:stop].div_(s)
    return fold


def _plan(layer, layout: str, norm_form: str, q_size: int, kv_size: int) -> list[tuple[str, tuple, Any]]:
    """Per group: (name, the linears reading its input (the first is hooked), the fold that makes x / s)."""
    attn, mlp = layer.self_attn, layer.mlp
    if layout == "phi3":  # fused qkv_proj [q; k; v] and gate_up_proj [gate; up]
        inter = mlp.down_proj.in_features
        return [("attn-in", (attn.qkv_proj,), _divide_norm(layer.input_layernorm, norm_form)),
                ("mlp-in", (mlp.gate_up_proj,), _divide_norm(layer.post_attention_layernorm, norm_form)),
                ("down", (mlp.down_proj,), _divide_rows(mlp.gate_up_proj, inter, 2 * inter)),
                ("o", (attn.o_proj,), _divide_rows(attn.qkv_proj, q_size + kv_size, q_size + 2 * kv_size))]
    mlp_norm = layer.pre_feedforward_layernorm if layout == "gemma" else layer.post_attention_layernorm
    return [("attn-in", (attn.q_proj, attn.k_proj, attn.v_proj), _divide_norm(layer.input_layernorm, norm_form)),
            ("mlp-in", (mlp.gate_proj, mlp.up_proj), _divide_norm(mlp_norm, norm_form)),
            ("down", (mlp.down_proj,), _divide_rows(mlp.up_proj)),
            ("o", (attn.o_proj,), _divide_rows(attn.v_proj))]


def scale_checkpoint(src: Path, out: Path, *, token_ids: list[list[int]], q: dict[str, Any]) -> dict[str, Any]:
    """Write ``src`` (an HF decoder folder) with AWQ scales folded in to ``out``; return the record part."""
    torch = require("torch", purpose="awq")
    transformers = require("transformers", purpose="awq")
    check_supported(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32, trust_remote_code=False)
    model.eval()
    cfg = model.config
    layers = model.model.layers
    tokens = sum(len(t) for t in token_ids)
    stride = max(1, tokens // MAX_ROWS)
    layout, norm_form = _LAYOUTS[cfg.model_type]
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_kv = heads // kv
    plans = [_plan(layer, layout, norm_form, heads * head_dim, kv * head_dim) for layer in layers]
    stats = {(i, g): _Stats(stride) for i, plan in enumerate(plans) for g, *_ in plan}
    hooks = []
    for i, plan in enumerate(plans):
        for g, linears, _fold in plan:
            hooks.append(linears[0].register_forward_pre_hook(lambda _m, args, key=(i, g): stats[key].add(args[0])))
    probe = torch.tensor([token_ids[0]])
    run_calibration(model, token_ids, hooks)
    with torch.no_grad():
        before = model(input_ids=probe).logits[0]
    def tie_gqa(s):  # o_proj's input channel h*d + i is v row (h // per_kv)*d + i: one scale per v row
        return s.reshape(kv, per_kv, head_dim).mean(1).repeat_interleave(per_kv, 0).reshape(-1)

    table = []
    with torch.no_grad():
        for i, plan in enumerate(plans):
            for g, linears, fold in plan:
                x_mean, rows = stats[(i, g)].result()
                s, row = _search(x_mean, rows, [m.weight for m in linears], q, tie=tie_gqa if g == "o" else None)
                for m in linears:
                    m.weight.mul_(s)
                # o: one scale per v row (the query heads of a kv head share it, tie_gqa made them equal)
                fold(s.reshape(kv, per_kv, head_dim)[:, 0].reshape(-1) if g == "o" else s)
                table.append({"layer": i, "group": g, **row})
        after = model(input_ids=probe).logits[0]
    check = float_logit_check(before, after, what="awq", hint="use --int4-algorithm rtn")
    save_scaled(model, src, out)
    rtn = sum(r["err_rtn"] for r in table)
    awq = sum(r["err_awq"] for r in table)
    return {"method": "awq (own: scales folded into the checkpoint, then the builder's RTN)", "grid": GRID,
            "rows_per_group": max(r["rows"] for r in table), "groups": len(table),
            "scaled_groups": sum(r["alpha"] > 0 for r in table),
            "output_error_vs_rtn": round(awq / rtn, 4) if rtn else None,
            "float_logit_check": check,
            "table": [{**r, "err_rtn": round(r["err_rtn"], 8), "err_awq": round(r["err_awq"], 8)} for r in table]}


def run_calibration(model, token_ids: list[list[int]], hooks: list) -> None:
    """The float model over each calibration text (the ``hooks`` collect what they need), then the hooks removed."""
    import torch

    try:
        with torch.no_grad():
            for ids in token_ids:
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()


def float_logit_check(before, after, *, what: str, hint: str) -> dict[str, float]:
    """The folds are exact in float: the scaled model's logits equal the original's (CheckFailed, exit 1, if not)."""
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    if not diff <= 1e-4 * max(1.0, scale):
        raise CheckFailed(f"{what}: the scaled float model's logits moved by {diff:.3g} (max |logit| {scale:.3g})",
                          hint=f"a fold is not exact for this architecture; {hint}")
    return {"max_abs_diff": diff, "max_abs_logit": scale}


def save_scaled(model, src: Path, out: Path) -> None:
    """The scaled model to ``out`` with ``src``'s other files (tokenizer, chat template, ...: the builder reads them from
    there); never ``src``'s old weights or its stage record."""
    model.save_pretrained(str(out), safe_serialization=True)
    for f in Path(src).iterdir():
        if f.is_file() and not (out / f.name).exists() and f.suffix not in WEIGHT_SUFFIXES and f.name not in SKIP_FILES:
            shutil.copy2(f, out / f.name)
