"""Layer-wise mixed precision by measurement: which MatMuls to keep at 8 bits.

Sensitivity of a graph MatMul j (``/model/layers.N/attn/qkv_proj/MatMul`` ...) on calibration texts:

1. **Proxy, every MatMul** (one PyTorch fp32 forward over the calibration tokens): the
   activation-weighted int4 error of exactly the weights the export wrote. Forward hooks
   accumulate H_j = X_j^T X_j of each MatMul's input; the int4 weights are read back from the
   int4 graph and dequantized (so the figure is that of *this* algorithm, block and symmetry),
   and ``score_j = tr(dW_j H_j dW_j^T) / tr(W_j H_j W_j^T)``: the relative output error that
   layer alone adds, E||x dW^T||^2 / E||x W^T||^2. Cost: one forward plus one [N,K]x[K,K]
   product per MatMul, seconds for SmolLM2 on 2 cores.
2. **Confirmation, the top few** (``confirm``): the KL divergence of the model's next-token
   distribution when only that MatMul is replaced by its int4 weights (one forward each on a
   subset of the texts). A full KL scan of every MatMul would be one forward per MatMul (211
   for SmolLM2): minutes on 2 cores, which is why the proxy ranks and KL confirms.

Why own code: onnxruntime's quantizer and the builder choose 8-bit layers by rule
(``k_quant_mixed``: fixed layer groups); NNCF's mixed ``ratio`` ranks by weight statistics,
not activations, and needs its own ONNX pipeline. Neither measures on the user's data.

The 8-bit nodes are then made with onnxruntime's ``MatMulNBitsQuantizer`` (bits=8) on the nodes
the builder was told to leave float (``nodes_to_exclude``), at accuracy_level 4 on CPU (see
:mod:`edgetune.export.decoder.kernels`: 8-bit at level 0 dequantizes every call).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ... import onnx_graph
from ...errors import BadInput, require
from ...quant import algorithms
from .packed import HEAD, LINEARS, PACKED, SIBLINGS, builder_linear, builder_node, hf_linears

# ``mixed={"modules": [...]}``: a projection kept at 8 bits in every decoder layer (a rule, as llama.cpp's Q4_K_M keeps
# attn_v / ffn_down wider), -> its builder block. q/k/v named one by one need the builder's unpacked attention.
MODULES = {name: block for name, block in LINEARS.items() if name not in SIBLINGS}
QKV = PACKED["qkv_proj"]


def base_name(node_name: str) -> str:
    """'/model/layers.0/attn/qkv_proj/MatMul_Q4' -> '/model/layers.0/attn/qkv_proj/MatMul' (the builder's name)."""
    return re.sub(r"_Q\d+$", "", node_name)


def graph_weights(folder: Path) -> dict[str, Any]:
    """Dequantized [N, K] weights of every MatMulNBits node of an export, keyed by builder node name."""
    from onnx import numpy_helper

    from .quantize import dequantize_matmulnbits

    model = onnx_graph.load(Path(folder) / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = onnx_graph.attributes(node)
        arr = [numpy_helper.to_array(inits[i]) if i in inits else None for i in list(node.input)[1:4]] + [None] * 3
        out[base_name(node.name)] = dequantize_matmulnbits(arr[0], arr[1], arr[2], k=a["K"], n=a["N"], bits=a["bits"],
                                                           block_size=a["block_size"])
    return out


def sensitivity(model_dir: Path, int4_dir: Path, token_ids: list[list[int]], *, confirm: int = 6,
                confirm_samples: int = 8) -> dict[str, Any]:
    """Rank the int4 graph's MatMuls by how much their int4 rounding costs (see the module docstring).

    Returns {"method", "ranking": [{"node", "score", "kl"?}...] most sensitive first, "samples", "tokens"}.
    """
    import numpy as np

    torch = require("torch", purpose="mixed-precision sensitivity")
    transformers = require("transformers", purpose="mixed-precision sensitivity")
    if not token_ids:
        raise BadInput("mixed precision needs calibration texts", hint="pass --calibration with texts like yours")
    qweights = graph_weights(int4_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    mods = dict(model.named_modules())
    nodes = {n: hf_linears(n) for n in qweights}
    nodes = {n: p for n, p in nodes.items() if p and all(x in mods for x in p)}
    # H = X^T X per distinct input module (gate/up and fused q/k/v read the same input): float32, [K, K]
    first = {n: parts[0] for n, parts in nodes.items()}
    key = {n: re.sub(r"mlp\.(gate|up)_proj$", "mlp.gate_proj", m) for n, m in first.items()}
    hess: dict[str, Any] = {}
    hooks = []
    for mod in sorted(set(key.values())):
        def hook(_m, inp, _out, mod=mod):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            h = x.T @ x
            hess[mod] = h if mod not in hess else hess[mod] + h
        hooks.append(mods[mod].register_forward_hook(hook))
    sub = list(range(min(confirm_samples, len(token_ids))))
    ref_logp = {}
    with torch.no_grad():
        for i, ids in enumerate(token_ids):
            logits = model(torch.tensor([ids])).logits[0]
            if i in sub:  # kept for the KL confirmation only (vocab-sized rows)
                ref_logp[i] = torch.log_softmax(logits.double(), -1).float()
    for h in hooks:
        h.remove()
    ranking = []
    with torch.no_grad():
        for n, parts in nodes.items():
            w = torch.cat([mods[p].weight.detach() for p in parts], 0)
            wq = torch.from_numpy(np.asarray(qweights[n], dtype=np.float32))
            if wq.shape != w.shape:
                continue
            hm = hess[key[n]].double()
            num = den = 0.0
            for r0 in range(0, w.shape[0], 4096):  # row chunks: the head is [vocab, hidden]
                wc = w[r0:r0 + 4096].double()
                dw = wq[r0:r0 + 4096].double() - wc
                num += float(((dw @ hm) * dw).sum())
                den += float(((wc @ hm) * wc).sum())
            ranking.append({"node": n, "score": num / (den or 1.0)})
    ranking.sort(key=lambda r: -r["score"])
    # KL confirmation of the top few: only that MatMul at int4, the rest fp32
    with torch.no_grad():
        for r in ranking[:confirm]:
            parts = nodes[r["node"]]
            wq = torch.from_numpy(np.asarray(qweights[r["node"]], dtype=np.float32))
            saved = [mods[p].weight.data.clone() for p in parts]
            off = 0
            for p in parts:
                rows = mods[p].weight.shape[0]
                mods[p].weight.data.copy_(wq[off:off + rows])
                off += rows
            kls = []
            for i in sub:
                lp = torch.log_softmax(model(torch.tensor([token_ids[i]])).logits[0].double(), -1)
                ref = ref_logp[i].double()
                kls.append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
            for p, s in zip(parts, saved):
                mods[p].weight.data.copy_(s)
            r["kl"] = float(np.mean(kls))
    # confirmed layers ordered by their measured KL, ahead of the rest (ordered by the proxy)
    top = sorted(ranking[:confirm], key=lambda r: -r["kl"])
    ranking = top + ranking[confirm:]
    for i, r in enumerate(ranking):
        r["rank"] = i + 1
    del model
    return {"method": "activation-weighted int4 error of the graph's weights (tr(dW H dW^T)/tr(W H W^T)); top "
                      f"{min(confirm, len(ranking))} confirmed by KL with only that MatMul at int4",
            "ranking": ranking, "samples": len(token_ids), "tokens": sum(len(t) for t in token_ids),
            "confirm_samples": len(sub)}


def choose(ranking: list[dict[str, Any]], *, count: int | None = None, fraction: float | None = None,
           include_head: bool = False) -> list[str]:
    """The most sensitive body MatMuls to keep at 8 bits: ``count`` of them, or ``fraction`` of the body MatMuls."""
    body = [r["node"] for r in ranking if r["node"] != HEAD]
    if count is None:
        count = int(round((fraction or 0.0) * len(body)))
    chosen = body[:max(0, count)]
    if include_head and any(r["node"] == HEAD for r in ranking):
        chosen.append(HEAD)
    return chosen


def module_layers(model_dir: Path, modules) -> list[str]:
    """``mixed={"modules": ["v_proj", "down_proj"]}`` -> those projections' builder node names in every decoder layer."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    layers = int(cfg.get("text_config", cfg).get("num_hidden_layers") or 0)
    return [builder_node(i, m) for i in range(layers) for m in modules]


def unpacks_qkv(mixed: dict | None) -> bool:
    """True when the rule or the given layers name q, k or v alone: the builder must then write three MatMuls, not its
    packed qkv_proj (given layers unpacked only theirs, and a packed layer after one did not load)."""
    if not mixed:
        return False
    given = [p[2] for p in map(builder_linear, mixed.get("layers") or ()) if p]
    return any(m in QKV for m in [*(mixed.get("modules") or ()), *given])


def forms(folder: Path) -> dict[str, tuple[int, int | None]]:
    """Builder node name -> (bits, block) of the decoder's weight MatMuls, read from the graph ((32, None): float)."""

    model = onnx_graph.read(Path(folder) / "model.onnx")
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        name = base_name(n.name)
        if hf_linears(name) is None:
            continue
        if n.op_type == "MatMulNBits":
            a = onnx_graph.attributes(n)
            out[name] = (int(a["bits"]), int(a["block_size"]))
        elif n.op_type == "MatMul" and n.input[1] in inits:
            out[name] = (32, None)
    return out


def widths(folder: Path) -> dict[str, int]:
    """Builder node name -> bits (32 for a float MatMul) of the decoder's weight MatMuls, read from the graph."""
    return {name: bits for name, (bits, _) in forms(folder).items()}


MIXED_ALGORITHMS = algorithms(mixed=True)  # the builder's own int4 paths (nodes_to_exclude is honoured)


def check_mixed_request(mixed: dict | None, *, precision: str, algorithm: str | None) -> bool:
    """Validate a ``mixed`` option before any work; True when the layers must be measured (calibration needed)."""
    if not mixed:
        return False
    unknown = set(mixed) - {"layers", "modules", "fraction", "count", "sensitivity", "confirm"}
    if unknown:
        raise BadInput(f"unknown mixed-precision option(s): {', '.join(sorted(unknown))}", hint="use layers, modules, fraction or count")
    if precision != "int4":
        raise BadInput(f"mixed precision applies to int4 exports, not {precision}", hint="use --precision int4")
    if algorithm not in MIXED_ALGORITHMS:
        raise BadInput(f"mixed precision works with the builder's int4 algorithms ({', '.join(MIXED_ALGORITHMS)}), not '{algorithm}'",
                       hint=f"use --int4-algorithm {' or '.join(MIXED_ALGORITHMS)}")
    if "layers" in mixed:
        bad = [n for n in mixed["layers"] if n == HEAD or hf_linears(n) is None]
        if bad:
            raise BadInput(f"mixed precision: '{bad[0]}' is not a decoder-layer MatMul name",
                           hint="use names like /model/layers.0/mlp/down_proj/MatMul (the head: --int4-lm-head int8)")
        return False
    if "modules" in mixed:
        mods = list(mixed["modules"] or ())
        bad = [m for m in mods if m not in MODULES]
        if not mods or bad or len(set(mods)) != len(mods) or len(mixed) > 1:
            raise BadInput(f"mixed precision: modules must be distinct names of {', '.join(MODULES)}, alone"
                           + (f" ('{bad[0]}' is not one)" if bad else ""), hint="e.g. --mixed-8bit v_proj,down_proj")
        return False
    f, c = mixed.get("fraction"), mixed.get("count")
    if (f is None) == (c is None) or (f is not None and not 0 < float(f) <= 1) or (c is not None and int(c) < 1):
        raise BadInput("mixed precision needs one of fraction (0 < f <= 1) or count (>= 1)", hint="e.g. --mixed-8bit 0.1")
    return True


def plan_mixed(mixed: dict, *, src: Path, model_dir: Path, cache: Path, token_ids, build) -> dict[str, Any]:
    """Which MatMuls get 8 bits: given, or measured on an int4 probe build (``build(folder)``)."""
    from ... import console

    if "layers" in mixed:
        return {"layers": list(mixed["layers"]), "how": "given", "sensitivity": mixed.get("sensitivity")}
    if "modules" in mixed:
        return {"layers": module_layers(model_dir, mixed["modules"]), "how": f"rule: {', '.join(mixed['modules'])} in every layer",
                "sensitivity": None}
    probe = cache / "mixed-probe"
    build(probe)
    with console.step("mixed precision: sensitivity on the calibration texts"):
        sens = sensitivity(model_dir, probe, token_ids or [], confirm=int(mixed.get("confirm", 6)))
    layers = choose(sens["ranking"], count=mixed.get("count"), fraction=mixed.get("fraction"))
    return {"layers": layers, "how": f"top {len(layers)} by measured sensitivity", "sensitivity": sens}


def finish_mixed(folder: Path, plan: dict, *, q: dict, execution_provider: str) -> dict[str, Any]:
    """Quantize the planned MatMuls the build left float to 8 bits and prove every planned one is 8-bit on the graph.

    Where the builder's pass is streamed (:mod:`.stream_quant`) they were quantized there, one weight at a time, with
    these settings; otherwise the whole graph is loaded here and onnxruntime's quantizer runs over it."""
    from ...errors import CheckFailed
    from ...quant import int8_block_size
    from .kernels import eight_bit_level
    from .quantize import quantize_matmuls_in

    level = eight_bit_level(q["accuracy_level"], execution_provider)
    block = int8_block_size(q)
    done = quantize_matmuls_in(folder, set(plan["layers"]).__contains__, bits=8, block_size=block, symmetric=q["symmetric"],
                               accuracy_level=level)
    f = forms(folder)
    w = {name: bits for name, (bits, _) in f.items()}
    wrong = [n for n in plan["layers"] if f.get(n) != (8, block)]
    if wrong:
        raise CheckFailed(f"mixed precision: {len(wrong)} planned MatMuls are not 8-bit blocks of {block} in the graph (first: {wrong[:1]})",
                          hint="the builder ignored nodes_to_exclude; check the onnxruntime-genai version")
    scores = {r["node"]: r for r in ((plan.get("sensitivity") or {}).get("ranking") or [])}
    layers = [{"node": n, "bits": w[n], "why": "8-bit: " + (f"sensitivity rank {scores[n]['rank']}, score {scores[n]['score']:.3g}"
                                                           + (f", KL {scores[n]['kl']:.3g}" if "kl" in scores[n] else "")
                                                           if n in scores else "given")} for n in sorted(w)]
    for r in layers:
        if r["bits"] != 8:
            s = scores.get(r["node"])
            r["why"] = f"{r['bits']}-bit: " + (f"sensitivity rank {s['rank']}, score {s['score']:.3g}" if s else "not ranked")
    sens = plan.get("sensitivity") or {}
    # quantized_after_build: how many this pass quantized (0 where the build's streamed pass did them all)
    return {"layers": plan["layers"], "how": plan["how"], "quantized_after_build": len(done), "accuracy_level_8bit": level,
            "block_size_8bit": block, "widths": layers,
            "sensitivity": {k: v for k, v in sens.items() if k != "ranking"} | {"ranking": sens.get("ranking")} if sens else None}
