"""fp32 ONNX export of an HF encoder with ``torch.onnx.export``, and its parity check vs PyTorch.

Replaces optimum-onnx's ``main_export`` (whose only release, 0.1.0, breaks on transformers 5)
with the same contract: inputs ``input_ids``, ``attention_mask`` and ``token_type_ids`` (the
latter only where the model uses token types), all int64; one output, ``logits`` (sequence /
token classification), ``start_logits`` + ``end_logits`` (question answering) or
``last_hidden_state`` (feature extraction), float32; dynamic axes
``batch_size`` / ``sequence_length``, or fixed (batch, sequence) shapes for static profiles.
The tokenizer and ``config.json`` are saved next to ``model.onnx`` as optimum did.

Exporter: the TorchScript one (``dynamo=False``), chosen by measurement on torch 2.13 with
transformers 4.57, onnxruntime 1.32 (docs/encoders.md, "Exporter"):

* onnxruntime's transformer optimizer does not fuse attention on the dynamo exporter's graph
  (``fuse_attention: failed to match mask path`` for every layer: the dynamo graph's
  constant-folded mask subgraph is not one of the patterns ``FusionAttention`` knows), so
  CPU/GPU profiles would lose the fused ``Attention`` (and ``EmbedLayerNormalization``) that
  the optimum export had. The TorchScript graph fuses exactly like optimum's (which used the
  TorchScript exporter too): all-MiniLM-L6-v2 gives Attention 6, EmbedLayerNormalization 1,
  SkipLayerNormalization 12, BiasGelu 6.
* dynamo exports opset 18 and reaches 17 (the Vitis AI profile's opset) only through the
  ``onnx`` C API version-converter fallback; and it takes 35-47 s on MiniLM vs 6 s.
Both match PyTorch to ~5e-8 on fp32 logits.

The model is loaded with ``attn_implementation="eager"``: the explicit MatMul/Softmax attention
the optimizer's patterns were written for, whatever a torch/transformers version does with SDPA
(on 4.57 + torch 2.13 the SDPA path fuses too, but that is a lowering detail we do not rely on).
It is wrapped in a small ``nn.Module`` that returns the one tensor exported, so no
``return_dict`` / tuple-output behaviour of a transformers version is relied on (measured on
4.57.6 and 5.25.0).
"""

from __future__ import annotations

import inspect as _inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BadInput, require

# edgetune task -> (transformers Auto class, output names)
TASK_HEADS = {
    "sequence-classification": ("AutoModelForSequenceClassification", ("logits",)),
    "token-classification": ("AutoModelForTokenClassification", ("logits",)),
    "question-answering": ("AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
    "feature-extraction": ("AutoModel", ("last_hidden_state",)),
}
# A tokenizer folder has one of these (or a SentencePiece *.model).
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
# The fp32 export must agree with PyTorch this closely (|diff| / max(1, |logit|)): TorchScript
# exports agree to ~1e-7; anything near this bound is an exporter bug, not rounding.
PARITY_TOLERANCE = 1e-3
# Trace with padding in the mask so no "mask is all ones" shortcut of a transformers version
# is baked into the graph; check on another (batch, sequence) so dynamic axes are proven.
_TRACE_SHAPE = (2, 16)
_CHECK_SHAPE = (3, 23)


@dataclass
class Reference:
    """Inputs the exported graph is checked on and PyTorch's output for them."""

    feeds: dict[str, Any]  # name -> int64 numpy array
    expected: Any  # numpy float32 array (several outputs: stacked on a new first axis)
    shape: tuple[int, int]


def _inputs(model, config) -> list[str]:
    """Graph inputs: token_type_ids only where forward takes them and there are >= 2 types.

    As optimum's configs: BERT/ALBERT/ELECTRA have them, DistilBERT/MPNet (no such argument),
    RoBERTa/XLM-R (type_vocab_size 1: a single type carries nothing) and DeBERTa-v2 with
    type_vocab_size 0 do not.
    """
    params = _inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 1:
        names.append("token_type_ids")
    return names


def _feeds(names: list[str], batch: int, seq: int, vocab: int, seed: int):
    """Deterministic random token ids with a padded tail on every row but the first."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(min(5, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for r in range(1, batch):
        mask[r, max(1, seq - (seq * r) // (batch + 1)) :] = 0
    if batch == 1 and seq > 2:
        mask[0, (seq * 2) // 3 :] = 0
    types = np.zeros((batch, seq), dtype=np.int64)
    types[:, seq // 2 :] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {n: feeds[n] for n in names}


def export_fp32(model_dir: Path, out_dir: Path, *, task: str, opset: int,
                static_shape: tuple[int, int] | None = None) -> tuple[Reference, dict[str, Any]]:
    """Write ``out_dir/model.onnx`` (+ tokenizer, config.json); returns (parity reference, record)."""
    torch = require("torch", purpose="encoder export")
    transformers = require("transformers", purpose="encoder export")

    auto_name, outputs = TASK_HEADS[task]
    out_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer first: the device needs it, and a folder without one must fail before the
    # export. transformers 5 builds an *empty* BertTokenizer (5 special tokens) from a folder with
    # no vocabulary at all, so the vocabulary file is looked for explicitly.
    hint = "save the tokenizer next to the model (tokenizer.save_pretrained(folder))"
    if not any((Path(model_dir) / n).is_file() for n in VOCAB_FILES) and not any(Path(model_dir).glob("*.model")):
        raise BadInput(f"no tokenizer in {model_dir} (none of {', '.join(VOCAB_FILES)}, *.model)", hint=hint)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise BadInput(f"no usable tokenizer in {model_dir} ({str(exc).splitlines()[0][:160]})", hint=hint) from None
    # dtype: transformers 5 loads in the checkpoint's dtype by default; the export is fp32.
    model = getattr(transformers, auto_name).from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32, local_files_only=True,
    ).eval()
    config = model.config
    names = _inputs(model, config)
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    if static_shape and max_pos and static_shape[1] > max_pos:
        raise BadInput(f"the profile's sequence_length {static_shape[1]} exceeds the model's max_position_embeddings {max_pos}",
                       hint="use a target profile with a shorter graph.sequence_length")

    class Exported(torch.nn.Module):
        """The model with keyword inputs in graph order, returning the one exported tensor."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(**dict(zip(names, args)))
            return tuple(getattr(out, o) for o in outputs) if len(outputs) > 1 else getattr(out, outputs[0])

    # eval() on the wrapper too: the TorchScript exporter restores the *wrapper's* training flag
    # recursively after export, which would leave the model's dropout on (measured: 1e-2 drift).
    wrapped = Exported(model).eval()
    vocab = int(config.vocab_size)
    trace = _feeds(names, *(static_shape or _TRACE_SHAPE), vocab, seed=0)
    check_shape = static_shape or _CHECK_SHAPE
    check = _feeds(names, *check_shape, vocab, seed=1)
    with torch.no_grad():
        got = wrapped(*(torch.from_numpy(check[n]) for n in names))
        expected = _stack([t.float().numpy() for t in (got if isinstance(got, tuple) else (got,))])
    axes: dict[str, dict[int, str]] = {}
    if not static_shape:
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
        for o in outputs:
            axes[o] = {0: "batch_size"} if task == "sequence-classification" else {0: "batch_size", 1: "sequence_length"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # dynamo=False: the TorchScript exporter, see the module docstring for why.
        torch.onnx.export(
            wrapped, tuple(torch.from_numpy(trace[n]) for n in names), str(out_dir / "model.onnx"),
            input_names=names, output_names=list(outputs), dynamic_axes=axes or None,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    tokenizer.save_pretrained(str(out_dir))
    config.save_pretrained(str(out_dir))
    record = {"exporter": "torch.onnx (TorchScript)", "torch": torch.__version__,
              "transformers": transformers.__version__, "output": ", ".join(outputs)}
    return Reference(feeds=check, expected=expected, shape=check_shape), record


def _stack(arrays: list) -> Any:
    """One output as is; several (question answering's start and end logits) stacked on a new first axis."""
    import numpy as np

    return arrays[0] if len(arrays) == 1 else np.stack(arrays)


def max_abs_diff(model_path: Path, ref: Reference) -> float:
    """Largest |ONNX - PyTorch| over the reference inputs, run on the CPU provider."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = _stack(sess.run(None, {i.name: ref.feeds[i.name] for i in sess.get_inputs()}))
    return float(np.abs(got.astype(np.float64) - ref.expected.astype(np.float64)).max())


def relative(diff: float, ref: Reference) -> float:
    """``diff`` scaled by the output's magnitude (at least 1)."""
    import numpy as np

    return diff / max(1.0, float(np.abs(ref.expected).max()))
