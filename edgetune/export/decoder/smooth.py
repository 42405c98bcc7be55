"""Activation smoothing for the 8-bit nodes at accuracy_level 4 (``--smooth-8bit``), folded exactly into the weights.

At accuracy_level 4 onnxruntime's CPU kernel quantizes a MatMulNBits node's *activations* too: each row of its input,
in blocks of the node's block size along K, to int8 with one scale per block (``amax / 127``). down_proj's input
(``act(gate) * up``) carries a few channels hundreds of times larger than the rest, so in a wide block (the 8-bit
nodes' 128, the fast recipe's) one outlier sets the step for 127 small values: on SmolLM2 that rounding is most of
what the wide 8-bit blocks cost (docs/benchmarks.md: 8-bit nodes on fp32 activations lose half to three quarters of
it). SmoothQuant's fold (Xiao et al. 2023) moves the outliers into the weights, where 8 bits have room:
``W x = (W diag(s)) (x / s)``, the division made by up_proj's rows (awq.py's "down" group: exact in float, and the
row scale of up_proj changes nothing of its own int4 rounding, its blocks run along rows).

Per layer whose down_proj is 8-bit, ``s`` is chosen among the identity, ``mean|x|^a`` (AWQ's form) and
``max|x|^a / max|w|^(1 - a)`` (SmoothQuant's), ``a`` on a grid of 20, for the least output error of the node as the
kernel computes it: ``|x W^T - Qa(x / s) Qw(W s)^T|^2`` on calibration activations, with ``Qa`` the kernel's int8
blocks and ``Qw`` the 8-bit grid (uint8 zero point per block, or symmetric). The identity is a candidate, so no layer
does worse than without on that measure. Only calibration text decides; the scales are searched layer by layer on
the float model's activations (each fold is exact, so later layers see the same inputs).

**The int8 head** (``--int4-lm-head int8``) gets the same search on its input (the final norm's output), and the fold is
made in the graph, after the builder: the float head MatMul's rows times ``s`` before its 8-bit quantization, the
final norm's gamma over ``s`` (the norm's output feeds the head alone). A tied embedding that reads the head's int8
table (:func:`edgetune.export.decoder.quantize.share_embedding_with_head_in`) gets one ``Mul`` by ``1 / s`` after its
gather: one multiply of ``hidden`` values per token. Where the head's input is not made by such a norm, it is left.

Not smoothed: v_proj (its input is the attention norm's, shared with q/k at 4 bits: folding into that norm moved
their rounding too, and perplexity rose on every text measured; a ``Mul`` before v alone would cost a node per layer).

Host only: torch and transformers are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import onnx_graph
from ...errors import BadInput, require
from .awq import _LAYOUTS, _plan, float_logit_check, run_calibration, save_scaled

GRID = 20
MAX_ROWS = 2048  # calibration rows kept per layer for the search (strided over all tokens)
HEAD_OUTPUTS = 8192  # the head's search measures its error on this many vocabulary rows (a fixed random sample)


def down_layers(mixed: dict | None, num_layers: int) -> list[int]:
    """The layers whose down_proj an export's ``mixed`` request puts at 8 bits (``modules`` or given ``layers``)."""
    from .packed import builder_linear

    if not mixed:
        return []
    if "down_proj" in (mixed.get("modules") or ()):
        return list(range(num_layers))
    found = {p[0] for p in map(builder_linear, mixed.get("layers") or ()) if p and p[2] == "down_proj"}
    return sorted(found)


def check_request(mixed: dict | None, *, accuracy_level: int, lm_head: str, backend: str = "builder",
                  model_dir: Path | None = None) -> None:
    """Refuse (BadInput, exit 2, before any work) an int4 ``--smooth-8bit`` that has nothing to act on, or an algorithm
    whose weights it does not reach (onnxruntime's and neural-compressor's quantizers; awq's own folds with a down_proj
    rule are refused by mixed precision, and awq leaves the final norm to the head's fold)."""
    import json

    if backend in ("ort", "inc"):
        raise BadInput(f"--smooth-8bit works with the builder's int4 algorithms (rtn, k_quant, awq, imatrix, imatrix-gptq), "
                       f"not the '{backend}' quantizer's", hint="use --int4-algorithm imatrix-gptq, or drop --smooth-8bit")

    if not down_layers(mixed, 1) and lm_head != "int8":  # 1 layer: any down_proj at 8 bits by rule or by name
        raise BadInput("--smooth-8bit smooths the inputs of the 8-bit nodes (down_proj by rule, the int8 head); this export has none",
                       hint="add --int4-lm-head int8 and/or --mixed-8bit down_proj (a measured fraction is not known before the export)")
    if accuracy_level != 4:
        raise BadInput(f"--smooth-8bit shapes the int8 activations of accuracy_level 4; this export runs level {accuracy_level}",
                       hint="add --int4-accuracy-level 4, or drop --smooth-8bit")
    if model_dir and not supported(model_dir):
        mt = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
        raise BadInput(f"--smooth-8bit does not know the layer layout of model type '{mt}'",
                       hint=f"use it with {', '.join(_LAYOUTS)}, or drop --smooth-8bit")


def supported(model_dir: Path) -> bool:
    """Whether the folds know ``model_dir``'s layer layout (its config's model_type)."""
    import json

    return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") in _LAYOUTS


def _kernel_a(x, block: int):
    """Activations as the CompInt8 kernel rounds them: per row, per block of K, int8 with scale amax / 127."""
    import torch

    n, k = x.shape
    kp = -(-k // block) * block
    xb = torch.nn.functional.pad(x, (0, kp - k)).reshape(n, -1, block)
    s = xb.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.round(xb / s).clamp(-127, 127) * s).reshape(n, kp)[:, :k]


def _grid_w(w, block: int, symmetric: bool):
    """8-bit weights per row, per block of K: uint8 with a zero point (the export's asymmetric form) or int8."""
    import torch

    n, k = w.shape
    kp = -(-k // block) * block
    wb = torch.nn.functional.pad(w, (0, kp - k)).reshape(n, -1, block)
    if symmetric:
        sc = wb.abs().amax(-1, keepdim=True) / 127
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)
        return (torch.round(wb / sc).clamp(-128, 127) * sc).reshape(n, kp)[:, :k]
    lo, hi = wb.amin(-1, keepdim=True).clamp(max=0), wb.amax(-1, keepdim=True).clamp(min=0)
    sc = (hi - lo) / 255
    sc = torch.where(sc == 0, torch.ones_like(sc), sc)
    z = torch.round(-lo / sc)
    return ((torch.round(wb / sc) + z).clamp(0, 255) - z).mul(sc).reshape(n, kp)[:, :k]


def _candidates(x_mean, x_max, w_max):
    yield "identity", 0.0, None
    for i in range(1, GRID + 1):
        a = i / GRID
        yield "awq", a, x_mean.pow(a)
        yield "smoothquant", a, x_max.pow(a) / w_max.pow(1 - a)


def search(rows, weight, *, block: int, symmetric: bool, outputs: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The scales (None: leave the layer) with the least kernel-rounded output error of ``rows @ weight.T``, measured
    on all of ``weight``'s rows or on ``outputs`` of them (a fixed random sample: the head's vocabulary)."""
    import torch

    w_max = weight.abs().amax(0).clamp(min=1e-6)
    if outputs and weight.shape[0] > outputs:
        weight = weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))[:outputs]]
    ref = rows @ weight.T
    x_mean = rows.abs().mean(0).clamp(min=1e-6)
    x_max = rows.abs().amax(0).clamp(min=1e-6)
    best = None
    for form, a, s in _candidates(x_mean, x_max, w_max):
        if s is not None:
            s = s / torch.exp(torch.log(s).mean())  # geometric mean 1: the weights' and activations' ranges stay put
            err = float(((ref - _kernel_a(rows / s, block) @ _grid_w(weight * s, block, symmetric).T) ** 2).mean())
        else:
            err = float(((ref - _kernel_a(rows, block) @ _grid_w(weight, block, symmetric).T) ** 2).mean())
            before = err
        if best is None or err < best[0]:
            best = (err, form, a, s)
    err, form, a, s = best
    return s, {"form": form, "alpha": a, "err_before": before, "err_after": err}


def smooth_checkpoint(src: Path, out: Path, *, token_ids: list[list[int]], layers: list[int], block: int,
                      symmetric: bool, head_block: int | None = None) -> tuple[dict[str, Any], Any]:
    """Write ``src`` (an HF decoder folder) with down_proj's smoothing scales folded in for ``layers`` to ``out``; with
    ``head_block``, also search the int8 head's scales (folded later, in the graph: :func:`smooth_head_in`). Returns
    (the record part, the head's scales as a float32 array or None)."""
    import numpy as np

    torch = require("torch", purpose="--smooth-8bit")
    transformers = require("transformers", purpose="--smooth-8bit")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32, trust_remote_code=False)
    model.eval()
    cfg = model.config
    layout, norm_form = _LAYOUTS[cfg.model_type]
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = [i for i in layers if i < len(model.model.layers)]
    downs = {}
    for i in layers:
        (group, linears, fold), = [p for p in _plan(model.model.layers[i], layout, norm_form, heads * head_dim, kv * head_dim)
                                   if p[0] == "down"]
        downs[i] = (linears[0], fold)
    probe = torch.tensor([token_ids[0]])
    with torch.no_grad():
        before = model(input_ids=probe).logits[0]
    stride = -(-sum(len(t) for t in token_ids) // MAX_ROWS)  # at most MAX_ROWS rows, from every text
    rows: dict[int, list] = {i: [] for i in layers}

    def keep(i):
        return lambda _m, args: rows[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()[::stride].clone())

    hooks = [lin.register_forward_pre_hook(keep(i)) for i, (lin, _fold) in downs.items()]
    head = model.get_output_embeddings() if head_block else None
    if head is not None:
        rows["head"] = []
        hooks.append(head.register_forward_pre_hook(keep("head")))
    run_calibration(model, token_ids, hooks)
    table = []
    with torch.no_grad():
        for i, (lin, fold) in downs.items():
            x = torch.cat(rows[i])[:MAX_ROWS]
            s, row = search(x, lin.weight.detach().float(), block=block, symmetric=symmetric)
            if s is not None:
                lin.weight.mul_(s)
                fold(s)
            table.append({"layer": i, **row, "rows": int(x.shape[0])})
        after = model(input_ids=probe).logits[0]
    check = float_logit_check(before, after, what="--smooth-8bit", hint="drop --smooth-8bit")
    changed = any(r["form"] != "identity" for r in table)
    if changed:  # else the builder reads the user's folder as it is
        save_scaled(model, src, out)
    total_before = sum(r["err_before"] for r in table)
    total_after = sum(r["err_after"] for r in table)
    record = {"method": "8-bit nodes' input smoothing for int8 activations (own: down_proj's scales folded into up_proj rows, "
                        "the head's into the final norm)", "block_size": block, "grid": GRID, "layers": len(table),
              "smoothed_layers": sum(r["form"] != "identity" for r in table),
              "output_error_vs_unsmoothed": round(total_after / total_before, 4) if total_before else None,
              "float_logit_check": check, "checkpoint_changed": changed,
              "table": [{**r, "err_before": round(r["err_before"], 10), "err_after": round(r["err_after"], 10)} for r in table]}
    scales = None
    if head is not None:
        with torch.no_grad():
            x = torch.cat(rows["head"])[:MAX_ROWS]
            s, row = search(x, head.weight.detach().float(), block=head_block, symmetric=symmetric, outputs=HEAD_OUTPUTS)
        record["head"] = {**row, "block_size": head_block, "rows": int(x.shape[0]), "outputs_sampled": HEAD_OUTPUTS}
        scales = None if s is None else s.numpy().astype(np.float32)
    return record, scales


def smooth_head_in(folder: Path, scales) -> dict[str, Any] | None:
    """Fold the head's scales into a saved export whose head is still a float MatMul: its weight's rows (K) times
    ``scales``, the gamma of the (Skip)SimplifiedLayerNormalization that makes its input over them. None (nothing
    changed) where the head's input is not such a norm's first output read by the head alone, or its gamma is shared."""
    import numpy as np
    from onnx import numpy_helper

    model = onnx_graph.load(folder / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    readers = lambda name: [n for n in nodes if name in n.input]  # noqa: E731
    head = [n for n in nodes if n.op_type == "MatMul" and n.name.startswith("/lm_head/") and n.input[1] in inits]
    if len(head) != 1:
        return None
    h = head[0]
    norm = next((n for n in nodes if h.input[0] in n.output), None)
    if norm is None or norm.op_type not in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"):
        return None
    gamma = norm.input[2 if norm.op_type.startswith("Skip") else 1]
    if norm.output[0] != h.input[0] or readers(h.input[0]) != [h] or gamma not in inits or len(readers(gamma)) != 1 \
            or len(readers(h.input[1])) != 1:
        return None
    w, g = numpy_helper.to_array(inits[h.input[1]]), numpy_helper.to_array(inits[gamma])
    s = np.asarray(scales, np.float32)
    if w.ndim != 2 or w.shape[0] != s.shape[0] or g.shape != s.shape:
        return None
    inits[h.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), h.input[1]))
    inits[gamma].CopyFrom(numpy_helper.from_array((g / s).astype(g.dtype), gamma))
    onnx_graph.save(model, folder / "model.onnx", external=True, size_threshold=0)
    return {"norm": norm.name, "gamma": gamma}
