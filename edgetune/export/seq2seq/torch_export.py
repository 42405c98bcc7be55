"""fp32 ONNX export of an HF encoder-decoder (Marian, T5 family) as two graphs, and the proof against PyTorch.

Graphs (TorchScript exporter, ``dynamo=False``, like ``edgetune.export.encoder.torch_export``; the model is
loaded with ``attn_implementation="eager"``):

``encoder.onnx``
    ``input_ids``, ``attention_mask`` [batch, source] (int64) -> ``last_hidden_state`` [batch, source, d_model]
    and, per decoder layer ``i``, ``present.{i}.encoder.key`` / ``.value`` [batch, heads, source, head_dim]:
    the cross-attention keys and values, computed **once** per sentence here and fed back to every
    decoder step (recomputing them would cost two [source x d_model x d_model] matmuls per layer per
    generated token for nothing: they depend on the source only).
``decoder.onnx``
    ``input_ids`` [batch, new] (int64, the last generated token), ``encoder_attention_mask`` [batch, source],
    ``past_key_values.{i}.decoder.key`` / ``.value`` [batch, heads, past, head_dim] (self-attention cache,
    ``past`` = 0 on the first step), ``past_key_values.{i}.encoder.key`` / ``.value`` (from the encoder
    graph) -> ``logits`` [batch, new, vocab] and ``present.{i}.decoder.key`` / ``.value`` [batch, heads,
    past + new, head_dim]. One step costs one token, not a re-run of the prefix.

transformers 5 keeps the caches in an ``EncoderDecoderCache`` of two ``DynamicCache``; the wrappers
below build one from the flat tensors (the cross-attention half already filled, so the model reuses it
instead of projecting the encoder states again) and return flat tensors, so no cache class crosses the
export boundary. The decoder is traced with a non-empty past (3 tokens) so the cache-length arithmetic
(Marian's sinusoidal positions, T5's relative position buckets) is recorded from tensor shapes, and is
then proven on an empty past and on several steps (:func:`prove`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BadInput, require

ARCHITECTURES = ("MarianMTModel", "T5ForConditionalGeneration", "MT5ForConditionalGeneration")
_TRACE_SOURCE, _TRACE_PAST = 7, 3


@dataclass
class Layout:
    layers: int
    heads: int
    head_dim: int
    d_model: int
    vocab: int


def layout(config) -> Layout:
    """Decoder cache shapes from a Marian or T5 config."""
    if config.model_type == "marian":
        heads, d = int(config.decoder_attention_heads), int(config.d_model)
        return Layout(int(config.decoder_layers), heads, d // heads, d, int(config.vocab_size))
    layers = int(getattr(config, "num_decoder_layers", None) or config.num_layers)
    return Layout(layers, int(config.num_heads), int(config.d_kv), int(config.d_model), int(config.vocab_size))


def io_names(n_layers: int) -> dict[str, list[str]]:
    """Input/output names of both graphs (optimum's naming of past/present tensors)."""
    cross = [f"{p}.{i}.encoder.{kv}" for i in range(n_layers) for kv in ("key", "value") for p in ("present",)]
    past_self = [f"past_key_values.{i}.decoder.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    past_cross = [f"past_key_values.{i}.encoder.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present_self = [f"present.{i}.decoder.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return {"encoder_in": ["input_ids", "attention_mask"], "encoder_out": ["last_hidden_state", *cross],
            "decoder_in": ["input_ids", "encoder_attention_mask", *past_self, *past_cross],
            "decoder_out": ["logits", *present_self]}


def load(model_dir: Path):
    """The PyTorch model in fp32 with eager attention (what is exported and what the graphs are proven against)."""
    torch = require("torch", purpose="translation export")
    transformers = require("transformers", purpose="translation export")
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32, local_files_only=True).eval()


def wrappers(model):
    """(encoder module, decoder-step module) taking and returning flat tensors."""
    torch = require("torch")
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    lay = layout(model.config)
    start = int(model.config.decoder_start_token_id if model.config.decoder_start_token_id is not None else model.config.pad_token_id)

    class EncoderGraph(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            hidden = self.inner.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            first = torch.full((input_ids.shape[0], 1), start, dtype=torch.long)
            # one decoder step fills the cross-attention cache (the model's own projection code); the rest of
            # the step does not reach an output and is dropped from the graph by the exporter
            self.inner(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
                       decoder_input_ids=first, cache=cache, use_cache=True)
            cross = cache.cross_attention_cache
            return (hidden, *[t for i in range(lay.layers) for t in (cross.layers[i].keys, cross.layers[i].values)])

    class DecoderGraph(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, encoder_attention_mask, *kv):
            n = lay.layers
            past_self, past_cross = kv[: 2 * n], kv[2 * n:]
            cache = EncoderDecoderCache([(past_self[2 * i], past_self[2 * i + 1], past_cross[2 * i], past_cross[2 * i + 1])
                                         for i in range(n)])
            for i in range(n):
                cache.is_updated[i] = True  # cross-attention keys/values are given: never recomputed here
            # the encoder states are not read (cross K/V come from the cache), only their shape
            hidden = torch.zeros(encoder_attention_mask.shape[0], encoder_attention_mask.shape[1], lay.d_model)
            out = self.inner(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=encoder_attention_mask,
                             decoder_input_ids=input_ids, cache=cache, use_cache=True)
            selfc = cache.self_attention_cache
            return (out.logits, *[t for i in range(n) for t in (selfc.layers[i].keys, selfc.layers[i].values)])

    return EncoderGraph(model).eval(), DecoderGraph(model).eval()


def export_graphs(model, out_dir: Path, *, opset: int) -> dict[str, Any]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` (fp32) into ``out_dir``; returns the exporter facts."""
    torch = require("torch")
    transformers = require("transformers")
    lay = layout(model.config)
    names = io_names(lay.layers)
    enc, dec = wrappers(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, lay.vocab, (2, _TRACE_SOURCE), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the trace, so no all-ones shortcut is baked in
    with torch.no_grad():
        enc_out = enc(ids, mask)
    past = [torch.randn(2, lay.heads, _TRACE_PAST, lay.head_dim, generator=g) for _ in range(2 * lay.layers)]
    step = torch.randint(3, lay.vocab, (2, 1), generator=g)
    dec_args = (step, mask, *past, *enc_out[1:])
    enc_axes = {"input_ids": {0: "batch", 1: "source"}, "attention_mask": {0: "batch", 1: "source"},
                "last_hidden_state": {0: "batch", 1: "source"}}
    enc_axes.update({n: {0: "batch", 2: "source"} for n in names["encoder_out"][1:]})
    dec_axes = {"input_ids": {0: "batch", 1: "new"}, "encoder_attention_mask": {0: "batch", 1: "source"},
                "logits": {0: "batch", 1: "new"}}
    dec_axes.update({n: {0: "batch", 2: "past"} for n in names["decoder_in"] if ".decoder." in n})
    dec_axes.update({n: {0: "batch", 2: "source"} for n in names["decoder_in"] if ".encoder." in n})
    dec_axes.update({n: {0: "batch", 2: "past_new"} for n in names["decoder_out"][1:]})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        # dynamo=False: the TorchScript exporter (docs/translation.md, "Exporter")
        torch.onnx.export(enc, (ids, mask), str(out_dir / "encoder.onnx"), input_names=names["encoder_in"],
                          output_names=names["encoder_out"], dynamic_axes=enc_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
        torch.onnx.export(dec, dec_args, str(out_dir / "decoder.onnx"), input_names=names["decoder_in"],
                          output_names=names["decoder_out"], dynamic_axes=dec_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return {"exporter": "torch.onnx (TorchScript)", "torch": torch.__version__, "transformers": transformers.__version__,
            "layers": lay.layers, "heads": lay.heads, "head_dim": lay.head_dim, "cross_attention": "computed once by encoder.onnx"}


def torch_greedy(model, ids_list: list[list[int]], *, max_new_tokens: int, suppress: list[int]) -> list[list[int]]:
    """PyTorch's greedy ``generate`` per source (batch 1, no beam, no sampling), without the start token.

    The model's own generation defaults are not merged in (its ``generation_config`` is swapped for the
    plain greedy one during the call; transformers fills unset values from it otherwise): Marian's
    ``forced_eos_token_id`` and ``num_beams`` would make it another decoding than the device's greedy one;
    single-token ``bad_words_ids`` (Marian's pad) are applied on both sides as ``suppress``."""
    torch = require("torch")
    transformers = require("transformers")
    cfg = model.config
    gen = transformers.GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, decoder_start_token_id=cfg.decoder_start_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        bad_words_ids=[[s] for s in suppress] or None)
    out = []
    saved, model.generation_config = model.generation_config, gen
    try:
        with torch.no_grad():
            for ids in ids_list:
                t = torch.tensor([ids])
                seq = model.generate(input_ids=t, attention_mask=torch.ones_like(t), generation_config=gen)[0].tolist()
                out.append(seq[1:])
    finally:
        model.generation_config = saved
    return out


def torch_step_logits(model, ids: list[int], decoded: list[int], start: int):
    """PyTorch's teacher-forced logits [len(decoded)+1, vocab] for ``decoded`` after the start token."""
    torch = require("torch")
    with torch.no_grad():
        t = torch.tensor([ids])
        dec = torch.tensor([[start, *decoded]])
        return model(input_ids=t, attention_mask=torch.ones_like(t), decoder_input_ids=dec).logits[0].float().numpy()


def prove(model, folder: Path, sources: list[list[int]], *, max_new_tokens: int, suppress: list[int],
          tolerance: float) -> dict[str, Any]:
    """The graphs in ``folder`` compute ``model``: greedy tokens equal PyTorch's ``generate`` on every source, and
    every step's logits (through the past-key-value cache) match PyTorch's teacher-forced logits within
    ``tolerance`` x max(1, |logit|). Returns the figures (``passed`` False when either fails)."""
    import numpy as np

    from ...device import seq2seq as S

    tr = S.load(folder)
    ref = torch_greedy(model, sources, max_new_tokens=max_new_tokens, suppress=suppress)
    worst, same, first_bad = 0.0, 0, None
    steps = 0
    for i, ids in enumerate(sources):
        got, logits = tr.greedy_ids(ids, max_new_tokens=max_new_tokens, keep_logits=True)
        if got == ref[i]:
            same += 1
        elif first_bad is None:
            first_bad = {"index": i, "onnx": got[:12], "torch": ref[i][:12]}
        expected = torch_step_logits(model, ids, got[:-1] if len(got) == len(logits) else got, tr.start_id)[: len(logits)]
        diff = np.abs(np.asarray(logits, np.float64) - expected.astype(np.float64)).max(initial=0.0)
        worst = max(worst, float(diff / max(1.0, float(np.abs(expected).max()))))
        steps += len(logits)
    return {"sources": len(sources), "same_tokens": same, "token_agreement": same / max(1, len(sources)),
            "steps_checked": steps, "max_rel_logit_diff": worst, "tolerance": tolerance,
            "first_mismatch": first_bad, "passed": same == len(sources) and worst <= tolerance}


def check_architecture(config: dict[str, Any], folder: Path) -> None:
    archs = config.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise BadInput(f"{folder}: the translation export needs a {' or '.join(ARCHITECTURES[:2])} head, "
                       f"the model has {', '.join(archs) or 'no architectures entry'}",
                       hint="fine-tune and merge a Marian or T5 translation model (its config names the head)")
