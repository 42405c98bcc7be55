"""Helpers shared by the encoder/quantize/coverage tests (owned by the encoder area)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "Are we still on for lunch tomorrow?",
    "WINNER! Claim your free prize now, call 09061701461",
    "the quick brown fox jumps over the lazy dog",
    "turn on the kitchen lights please",
    "hello world numbers 0123456789",
    "what is the capital of france",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetune", *args], capture_output=True, text=True, cwd=ROOT)


def onnx_logits(folder: Path, texts: list[str], *, tokenizer_dir: Path | None = None) -> np.ndarray:
    """Run an export folder on the CPU provider, one text at a time (works for static shapes)."""
    import onnxruntime as ort

    from edgetune.export.encoder.quantize import encode_texts, model_input_spec

    model = folder / "model.onnx"
    names, batch, seq = model_input_spec(model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    batches = encode_texts(tokenizer_dir or folder, texts, input_names=names, sequence_length=seq, batch_size=batch or 1)
    return np.concatenate([sess.run(None, b)[0][: 1 if batch else None] for b in batches])


def torch_logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.concatenate([model(**tok([t], return_tensors="pt")).logits.numpy() for t in texts])


def torch_word_tags(model_dir: Path, words: list[str]) -> list[str]:
    """The PyTorch token classifier's BIO tag of each word: the prediction at the word's first sub-token
    (what `validate` and the device's `run` do with the graph)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits[0].argmax(-1).tolist()
    tags, seen = ["O"] * len(words), set()
    for pos, w in enumerate(enc.word_ids()):
        if w is not None and w not in seen:
            seen.add(w)
            tags[w] = model.config.id2label[pred[pos]]
    return tags


def record(folder: Path) -> dict:
    return json.loads((folder / "edgetune.json").read_text())
