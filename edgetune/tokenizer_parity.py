"""Does the device read a tokenizer exactly as transformers does? Checked in seconds, before any weight work.

onnxruntime-genai (the device) and transformers (training, validation's reference) must turn the same text
into the same ids: a vocabulary genai cannot read, or one it encodes differently (a missing BOS, another
merge order), would feed the model ids it was never trained on. Used by the GGUF import (:mod:`.models`) and
the decoder export (:mod:`.llm`); a module of its own so that neither imports the other for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .cleanup import temp_dir
from .errors import BadInput, CheckFailed, UnloadableGraph, require

TOKENIZER_PROBES = (
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines",
    "naïve café — ünïcödé 日本語 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "def f(x):\n    return x**2  # code",
)

# what a tokenizer-only onnxruntime-genai folder needs (og.Tokenizer(path) reads genai_config.json first)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja")


def _compare_tokenizers(tok, ref, probes: Iterable[str]) -> list[dict[str, Any]]:
    """Where onnxruntime-genai's ids differ from transformers' (``encode`` with and without special tokens:
    plain text and chat-template text), each as {text, special, genai, reference} (first 16 ids)."""
    from .device.llm import tokenize

    mismatches = []
    for s in probes:
        for special in (True, False):
            got = [int(i) for i in tokenize(tok, s, special=special)]
            want = ref.encode(s, add_special_tokens=special)
            if got != want:
                k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                mismatches.append({"text": s, "special_tokens": special, "first_difference": k,
                                   "genai": got[max(0, k - 2):k + 6], "reference": want[max(0, k - 2):k + 6],
                                   "reference_tokens": ref.convert_ids_to_tokens(want[max(0, k - 2):k + 6])})
    return mismatches


def _mismatch_message(mismatches: list[dict[str, Any]], n: int) -> str:
    m = mismatches[0]
    return (f"onnxruntime-genai tokenizes {len({x['text'] for x in mismatches})}/{n} probe strings differently from transformers "
            f"(first: {m['text']!r}{'' if m['special_tokens'] else ' without special tokens'}, from token {m['first_difference']}: "
            f"genai {m['genai']} vs transformers {m['reference']} {m['reference_tokens']})")


def check_tokenizer_files(model_dir: Path, probes: Iterable[str] = TOKENIZER_PROBES) -> dict[str, Any]:
    """Before any weight work: onnxruntime-genai reads ``model_dir``'s tokenizer and encodes the probes exactly
    like transformers (seconds). BadInput (exit 2) with the true reason otherwise: the tokenizer.json it cannot
    read (e.g. a Unigram model: genai 0.18 reads only a vocab object), or the first string it encodes differently.

    og.Tokenizer(path) reads genai_config.json, so the tokenizer files go into a scratch folder with a minimal one.
    """
    import time

    og = require("onnxruntime_genai", purpose="tokenizer check")
    transformers = require("transformers", purpose="tokenizer check")
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise BadInput(f"{model_dir} has no tokenizer.json, which onnxruntime-genai needs",
                       hint="save the tokenizer with a fast (tokenizers) backend, or re-import the .gguf")
    t0 = time.perf_counter()
    cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}  # none yet at import
    cfg = cfg.get("text_config", cfg)
    eos = cfg.get("eos_token_id")
    genai = {"model": {"type": cfg.get("model_type", "llama"), "vocab_size": int(cfg.get("vocab_size") or 1),
                       "context_length": 512, "bos_token_id": cfg.get("bos_token_id") or 0,
                       "eos_token_id": eos if eos is not None else 0, "pad_token_id": cfg.get("pad_token_id") or 0,
                       "decoder": {"filename": "model.onnx", "session_options": {}, "inputs": {}, "outputs": {}}},
             "search": {"max_length": 512}}
    with temp_dir("tokcheck") as scratch:
        folder = Path(scratch)
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                (folder / name).symlink_to((model_dir / name).resolve())
        (folder / "genai_config.json").write_text(json.dumps(genai))
        try:
            tok = og.Tokenizer(str(folder))
        except RuntimeError as e:
            kind = (json.loads((model_dir / "tokenizer.json").read_text()).get("model") or {}).get("type")
            raise BadInput(f"onnxruntime-genai cannot read the {kind or 'unknown'} tokenizer.json of {model_dir}: "
                           f"{str(e).splitlines()[0][:200]}",
                           hint="onnxruntime-genai 0.18 reads BPE/WordPiece tokenizer.json; a Unigram (SentencePiece) one must be "
                                "converted to BPE first (transformers 5 imports Gemma/Llama GGUF vocabularies as BPE)") from None
        ref = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        probes = list(probes)
        mismatches = _compare_tokenizers(tok, ref, probes)
    if mismatches:
        raise BadInput(_mismatch_message(mismatches, len(probes)) + ": the device would feed the model other ids than it was trained on",
                       hint="re-import the model (edgetune normalizes GGUF tokenizers), or report the tokenizer.json")
    return {"probes": len(probes), "forms": ["with special tokens", "without (chat-template text)"], "mismatches": 0,
            "seconds": round(time.perf_counter() - t0, 2)}


def check_tokenizer(folder: Path, model_dir: Path, probes: Iterable[str] = TOKENIZER_PROBES) -> dict[str, Any]:
    """onnxruntime-genai must encode exactly like the reference HF tokenizer (the export folder itself: it loads)."""
    og = require("onnxruntime_genai", purpose="tokenizer check")
    transformers = require("transformers", purpose="tokenizer check")
    ref = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    try:
        cfg = og.Config(str(folder))
        cfg.clear_providers()  # on this machine's CPU: an export for an NPU names a provider this host lacks
        tok = og.Tokenizer(og.Model(cfg))
    except RuntimeError as e:
        # a graph edgetune (or the builder it drives) wrote and onnxruntime rejects is their bug, not a missed budget
        # (exit 1 read as one in build scripts); the one known builder case, tied embeddings shared by asymmetric int4
        # or int8, is worked around before the builder runs (docs/llm.md)
        raise UnloadableGraph(f"the export does not load in onnxruntime-genai: {str(e).splitlines()[0][:300]}",
                              hint="edgetune wrote a graph onnxruntime rejects (the error names the node): a bug in edgetune or "
                                   "the builder; please report it with the export's log") from None
    probes = list(probes)
    mismatches = _compare_tokenizers(tok, ref, probes)
    if mismatches:
        raise CheckFailed(_mismatch_message(mismatches, len(probes)), hint="re-materialize the model so its tokenizer is normalized")
    return {"probes": len(probes), "mismatches": 0}
