"""Will this fine-tune fit in memory? Answered in the first seconds, before any weight is loaded.

A fine-tune that cannot fit used to find out by an OOM kill, an hour in. ``check_fits`` estimates the
peak host memory of a CPU fine-tune from the checkpoint's own parameter count (read from the
safetensors headers: exact, no torch) and the options, compares it with what the machine can give
(``available_bytes``: the cgroup's limit, the free memory, or ``EDGETUNE_MEMORY_LIMIT``), and refuses
with exit 2 naming both figures and what would fit (QLoRA, gradient checkpointing, a smaller batch or
sequence, DeepSpeed ZeRO-3 offload, a smaller model).

The estimate, per part (fp32 on a CPU; bf16/fp16 halve the float parts):
  weights      parameters x bytes per weight (QLoRA: 4-bit linears, ~0.56 byte with double quant
               and scales, embeddings and head in the compute dtype; a LoRA with gradient checkpointing
               of a bf16/fp16 checkpoint: its 2 bytes plus one layer in fp32, ``keeps_stored_weights``)
  trainable    adapter parameters x 16 bytes (fp32 weight, gradient, two AdamW moments)
  activations  per layer, what the backward pass keeps: s*b*h*34 + 5*a*s^2*b bytes at 16 bits
               (sequence s, batch b, hidden h, heads a; Korthikanti et al. 2022), twice that in
               fp32; with gradient checkpointing the layer inputs plus one layer's worth
  logits       batch x sequence x vocabulary x 3 fp32 values (logits, their softmax, the gradient)
  runtime      1 GiB for torch, transformers and the data
It is meant to be on the safe side by a margin, not exact: ``tests/test_finetune_memory.py`` compares
it with the measured peak of a tiny fine-tune.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..host_memory import available_bytes

GIB = 1 << 30
RUNTIME_BYTES = 1 * GIB
# bytes per token and hidden unit one layer keeps at 16 bits (Korthikanti et al., "Reducing Activation Recomputation", 2022)
ACTIVATION_BYTES_16BIT = 34
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def parameter_count(folder: Path) -> int:
    """Parameters of the checkpoint in ``folder``, from its safetensors headers (nothing else is read)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise BadInput(f"{f} is truncated (no safetensors header)", hint="copy or save the model again")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise BadInput(f"{f}: safetensors header of {n} bytes is not plausible", hint="copy or save the model again")
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                raise BadInput(f"{f}: the safetensors header is not valid JSON", hint="copy or save the model again") from None
        for name, t in header.items():
            if name != "__metadata__" and isinstance(t, dict):
                count = 1
                for d in t.get("shape", []):
                    count *= int(d)
                total += count
    return total


@dataclass(frozen=True)
class Estimate:
    parameters: int
    weights: int
    trainable: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits + RUNTIME_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "weights": self.weights, "trainable": self.trainable,
                "activations": self.activations, "logits": self.logits, "runtime": RUNTIME_BYTES, "total": self.total}


def keeps_stored_weights(folder: Path, task: str, opts, **over: Any) -> bool:
    """Whether the fine-tune keeps a bf16/fp16 checkpoint's frozen weights as stored, computing in fp32 one module at a
    time (:func:`edgetune.model_input.compute_in_fp32`) instead of loading an fp32 copy (Phi-3-mini: 15.7 GB).

    Only a plain LoRA of a causal LM in fp32 with gradient checkpointing: autograd keeps the fp32 weight each linear's
    backward needs, and only recomputation frees them layer by layer (without it, every widened weight would be held
    until the backward: more than the fp32 copy); DoRA reads the base weight outside its layer's forward, quant-aware
    training and DeepSpeed handle the weights themselves. The gradients are the fp32 fine-tune's (widening is exact)."""
    from ..model_input import stored_dtype

    o = {k: getattr(opts, k, None) for k in ("method", "precision", "gradient_checkpointing", "quant_aware", "deepspeed")}
    o.update((k, v) for k, v in over.items() if k in o)
    prec = "fp32" if o["precision"] in ("auto", None) else o["precision"]
    return (task == "causal-lm" and o["method"] == "lora" and prec == "fp32" and bool(o["gradient_checkpointing"])
            and not o["quant_aware"] and not o["deepspeed"] and stored_dtype(folder) in ("bfloat16", "float16"))


def estimate(parameters: int, config: dict[str, Any], *, method: str, precision: str, batch_size: int, max_seq_len: int,
             rank: int, gradient_checkpointing: bool, stored_half: bool = False) -> Estimate:
    """Peak host memory of a CPU fine-tune (see the module docstring for each part); ``stored_half``: the frozen
    weights stay in a 16-bit checkpoint's dtype, one layer at a time widened (:func:`keeps_stored_weights`)."""
    cfg = config.get("text_config") or config  # multimodal configs nest the decoder's
    hidden = int(cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("dim") or 1024)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 1)
    vocab = int(cfg.get("vocab_size") or 32000)
    fbytes = 2 if precision in ("bf16", "fp16") else 4
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    if method == "qlora":
        weights = int(max(parameters - embed, 0) * 0.5625) + embed * fbytes
    elif stored_half:
        weights = parameters * 2 + (parameters - embed) // layers * 4
    else:
        weights = parameters * fbytes
    # LoRA-like adapters: rank x (in + out) per adapted linear; ~7 linears of width ~hidden per layer
    trainable = layers * 7 * rank * 2 * hidden * 16 if method != "ia3" else layers * 3 * hidden * 16
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or max(hidden // 64, 1))
    tokens = batch_size * max_seq_len
    per_layer = (tokens * hidden * ACTIVATION_BYTES_16BIT + 5 * heads * max_seq_len * tokens) * fbytes // 2
    activations = per_layer + tokens * hidden * fbytes * layers if gradient_checkpointing else per_layer * layers
    logits = tokens * vocab * 3 * 4
    return Estimate(parameters, weights, trainable, activations, logits)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits(folder: Path, config: dict[str, Any], opts, model_name: str | None = None, task: str = "causal-lm"
               ) -> dict[str, Any] | None:
    """Refuse (exit 2) a CPU fine-tune whose estimated peak exceeds the memory available; the estimate otherwise.

    Skipped (None) with DeepSpeed (offloaded and sharded states are its business) and on a GPU
    (the limit is the GPU's memory, which this estimate does not model).
    """
    if opts.deepspeed:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    params = parameter_count(folder)
    prec = "fp32" if opts.precision == "auto" else opts.precision

    def est(**over) -> Estimate:
        kw = dict(method=opts.method, precision=prec, batch_size=opts.batch_size, max_seq_len=opts.max_seq_len,
                  rank=opts.rank, gradient_checkpointing=opts.gradient_checkpointing)
        kw.update(over)
        return estimate(params, config, **kw, stored_half=keeps_stored_weights(folder, task, opts, **kw))

    need = est()
    have, source = available_bytes()
    if need.total <= have:
        return {**need.to_dict(), "available": have, "available_source": source}
    options = []
    if opts.method != "qlora":
        options.append(f"--method qlora (~{_gib(est(method='qlora').total)})")
    if not opts.gradient_checkpointing:
        options.append(f"--gradient-checkpointing (~{_gib(est(gradient_checkpointing=True).total)})")
    if opts.batch_size > 1:
        options.append(f"--batch-size 1 (~{_gib(est(batch_size=1).total)})")
    options.append("--deepspeed offload (ZeRO-3, states in CPU memory)")
    options.append("a smaller model")
    name = model_name or folder.name
    raise BadInput(
        f"fine-tuning {name} ({params / 1e9:.2f}B parameters) with {opts.method} in {prec} needs about {_gib(need.total)} "
        f"(weights {_gib(need.weights)}, activations {_gib(need.activations)}, logits {_gib(need.logits)}); "
        f"{source} is {_gib(have)}",
        hint="fits in less: " + ", ".join(options))
