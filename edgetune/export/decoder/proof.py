"""An export proves that its graph computes its model, past any sliding window.

``export`` used to prove that the folder *loads*; a graph that computes something else (the Gemma 2
builder slid the odd layers where transformers slides the even ones; the Gemma 3 builder ignored
``config.layer_types``) passed, and only ``validate`` could find out, late, and only when its window
happened to cross the sliding window. :func:`prove` runs one teacher-forced forward pass of the graph
(onnxruntime, the device runner's scorer) and of the PyTorch model it came from over the same tokens,
a context longer than the model's sliding window, and compares the logits position by position:

* an fp32 graph must match within fp32 noise (max |dlogit| <= ``FP32_TOLERANCE`` x max(1, max |logit|)),
  else :class:`CheckFailed` (exit 1) saying whether it diverges only past the sliding window (the
  sliding-window layers) or from the first token (every layer kind);
* a quantized graph is compared and recorded (max |dlogit|, KL, top-1 agreement); ``validate`` judges it.

The last ``DECODE_STEPS`` positions are then computed again the way the device generates (onnxruntime-genai's
generator: the rest appended at once, then one token at a time through the KV cache and, for a sliding
window, its ring buffer): a graph that scores a full pass but cannot take a cached step (the builder's fp16
graph on onnxruntime 1.32's CPU provider failed there, in an inserted Cast) is refused (exit 1), and an fp32
graph's cached logits must match PyTorch's like its full pass. For a quantized graph the cached-vs-full
difference is recorded.

The tokens are drawn from the vocabulary with a fixed seed (the comparison is about the arithmetic, not
the text); the reference runs in fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph
from ...errors import CheckFailed, require

FP32_TOLERANCE = 1e-3
MIN_TOKENS = 64  # without a sliding window
PAST_WINDOW = 48  # tokens scored past the window
DECODE_STEPS = 8  # positions recomputed through the KV cache, one token at a time


def check_runtime_shapes(config: dict[str, Any], where: str = "the model") -> None:
    """Refuse (exit 2) before any work a decoder whose attention onnxruntime cannot run.

    GroupQueryAttention applies the rotary embedding from a cos/sin cache of width rotary_dim / 2,
    which must be a multiple of 8 and at most head_dim / 2 (onnxruntime's own check, met at run time
    otherwise: a Phi-4-mini layout with head_dim 16 and partial_rotary_factor 0.75 has width 6).
    """
    from ...errors import BadInput

    cfg = config.get("text_config") or config
    heads = cfg.get("num_attention_heads")
    if not heads or not cfg.get("hidden_size"):
        return
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    rotary = int(head_dim * float(cfg.get("partial_rotary_factor") or 1.0))
    if (rotary // 2) % 8 or rotary // 2 > head_dim // 2:
        raise BadInput(f"{where}: head_dim {head_dim} with a rotary part of {rotary} gives onnxruntime's GroupQueryAttention a "
                       f"rotary cache of width {rotary // 2}, which must be a multiple of 8 and at most head_dim / 2",
                       hint="onnxruntime cannot run this attention shape; real checkpoints use head_dim 64 or 128")


def sliding_window(config: dict[str, Any]) -> int | None:
    """The attention window of a model that slides (None when it attends to the whole context)."""
    cfg = config.get("text_config") or config
    w = cfg.get("sliding_window")
    if not w or cfg.get("use_sliding_window") is False:
        return None
    types = cfg.get("layer_types")
    if types and "sliding_attention" not in types:
        return None
    return int(w)


def proof_tokens(config: dict[str, Any], context_length: int | None = None) -> int:
    """How many tokens the comparison covers: past the sliding window by PAST_WINDOW, within the model's length and
    the export's context (genai_config's ``context_length``: the device generates no further, and its generator refuses
    a longer sequence: Phi-3-mini's window of 2,047 + 48 is past cpu-x86's 2,048)."""
    cfg = config.get("text_config") or config
    w = sliding_window(config)
    n = max(MIN_TOKENS, w + PAST_WINDOW) if w else MIN_TOKENS
    return min(n, int(cfg.get("max_position_embeddings") or n), context_length or n)


def has_lora_branches(folder: Path) -> bool:
    """LoRA side branches in the graph, as inputs (runtime adapters) or nodes (a float adapter): the graph is then
    base + adapter, which the adapter exports check against PyTorch themselves (``float_adapter_check``, ...)."""

    m = onnx_graph.read(Path(folder) / "model.onnx")
    return any("lora" in i.name for i in m.graph.input) or any("lora_" in n.name for n in m.graph.node)


def prove(folder: Path, model_dir: Path, *, exact: bool, what: str = "graph") -> dict[str, Any]:
    """Compare the graph in ``folder`` with the PyTorch model in ``model_dir`` (see the module docstring)."""
    torch = require("torch", purpose="the export's graph check")
    from ...device import llm as dev
    from ...model_input import load_causal_lm

    config = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = config.get("text_config") or config
    n = proof_tokens(config, dev.context_length(folder))
    window = sliding_window(config)
    vocab = int(cfg["vocab_size"])
    ids = np.random.default_rng(0).integers(0, vocab, n)
    llm = dev.load(folder)
    got = dev.logits(llm, ids)
    # the last positions again, one token at a time through the KV cache; the graph is let go before the PyTorch
    # model loads (never both in memory: an fp32 3.8B graph is 15 GB), a failure reported after the full pass's
    steps = min(DECODE_STEPS, n - 1)
    try:
        cached, cached_error = dev.cached_logits(llm, ids, n - steps), None  # rows: positions n-steps-1 .. n-1
    except RuntimeError as exc:
        cached, cached_error = None, str(exc).splitlines()[0][:300]
    del llm
    model = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)[None]).logits[0].float().numpy()
    del model
    if got.shape != want.shape:  # e.g. a padded vocabulary in the graph
        raise CheckFailed(f"the {what} returns logits of shape {got.shape}, the model {want.shape}",
                          hint="the export does not match its model; report it with the model's config.json")
    diff = np.abs(got - want).max(-1)
    scale = float(np.abs(want).max())
    p = np.exp(want - want.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logq = got - got.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    kl = float(np.mean(np.sum(p * (np.log(np.clip(p, 1e-30, None)) - logq), -1)))
    within = float(diff[:window].max()) if window else float(diff.max())
    past = float(diff[window:].max()) if window and n > window else None
    result = {"reference": "PyTorch fp32 (transformers)", "tokens": n, "sliding_window": window,
              "max_abs_logit_diff": float(diff.max()), "max_abs_logit_diff_within_window": within,
              "max_abs_logit_diff_past_window": past, "logit_scale": scale, "kl_divergence": kl,
              "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
              "tolerance": FP32_TOLERANCE if exact else None}
    bound = FP32_TOLERANCE * max(1.0, scale)
    if exact and result["max_abs_logit_diff"] > bound:
        if window and within <= bound:
            where = (f"past its sliding window of {window} tokens only (from token {window + int(np.argmax(diff[window:] > bound))}): "
                     "the sliding-window attention layers")
        else:
            where = f"from token {int(np.argmax(diff > bound))}: every layer kind, not only the sliding window"
        raise CheckFailed(f"the fp32 {what} does not compute its model ({cfg.get('model_type')}): max |dlogit| "
                          f"{result['max_abs_logit_diff']:.3g} (limit {bound:.3g}), {where}",
                          hint="a builder bug for this configuration: report it with the model's config.json; "
                               "nothing was written")
    if cached is None:  # after the full pass's check: its failure says more
        raise CheckFailed(f"the {what} scores a full pass but fails at a cached decode step, as the device generates: "
                          f"{cached_error}",
                          hint="onnxruntime cannot run this graph on this execution provider; another precision or "
                               "target may (see docs/llm.md); nothing was written")
    result.update(decode_steps=steps, max_abs_logit_diff_cached_decode=float(np.abs(cached - want[n - steps - 1:]).max()),
                  max_abs_logit_diff_cached_vs_full_pass=float(np.abs(cached - got[n - steps - 1:]).max()))
    if exact and result["max_abs_logit_diff_cached_decode"] > bound:
        raise CheckFailed(f"the fp32 {what}'s cached decode (one token at a time through the KV cache) does not compute its "
                          f"model ({cfg.get('model_type')}): max |dlogit| {result['max_abs_logit_diff_cached_decode']:.3g} "
                          f"(limit {bound:.3g}) over its last {steps + 1} positions, where the full pass matches",
                          hint="a builder or runtime bug in the KV cache for this configuration: report it with the model's "
                               "config.json; nothing was written")
    return result
