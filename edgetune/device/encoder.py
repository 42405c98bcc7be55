"""Encoder models (BERT-like classifiers) on the device: ORT session + `tokenizers`.

Device-only imports: onnxruntime, numpy, tokenizers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, MissingDependency
from .session import create_session, resolve_target


@dataclass
class Encoder:
    folder: Path
    session: Any
    tokenizer: Any
    labels: list[str]
    sequence_length: int | None  # static shape, or None (dynamic, truncate at max_length)
    max_length: int
    target: Any = None
    load_time_s: float = 0.0
    task: str = "classification"


def find_model_folder(path: str | Path) -> Path:
    p = Path(path)
    if (p / "model.onnx").is_file() and not (p / "genai_config.json").is_file():
        return p
    if (p / "manifest.json").is_file() and (p / "model" / "model.onnx").is_file():
        return p / "model"
    raise BadInput(f"{p} is not an encoder export (no model.onnx)", hint="give an `edgetune export` output or a bundle")


def load(folder: str | Path, target: Any = None) -> Encoder:
    """Load ``model.onnx`` with the target's providers/session options and its tokenizer.json."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency("tokenizers is not installed", hint="pip install tokenizers") from exc
    folder = find_model_folder(folder)
    t = resolve_target(target)
    if not (folder / "tokenizer.json").is_file():
        raise BadInput(f"{folder} has no tokenizer.json", hint="export with a fast tokenizer")
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    id2label = cfg.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))] if id2label else []
    record = {}
    if (folder / "edgetune.json").is_file():
        record = (json.loads((folder / "edgetune.json").read_text()).get("results") or {})
    seq = record.get("sequence_length")
    t0 = time.perf_counter()
    sess = create_session(folder / "model.onnx", t)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    max_length = int(seq or min(int(cfg.get("max_position_embeddings", 512)), 512))
    tok.enable_truncation(max_length)
    if seq:
        tok.enable_padding(length=int(seq), pad_id=int(cfg.get("pad_token_id", 0) or 0))
    else:
        tok.enable_padding(pad_id=int(cfg.get("pad_token_id", 0) or 0))
    return Encoder(folder=folder, session=sess, tokenizer=tok, labels=labels, sequence_length=seq, max_length=max_length,
                   target=t, load_time_s=time.perf_counter() - t0, task=record.get("task", "classification"))


def tokenize(enc: Encoder, texts: list[str]) -> dict[str, np.ndarray]:
    batch = enc.tokenizer.encode_batch(list(texts))
    feeds = {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
    }
    names = {i.name for i in enc.session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def logits(enc: Encoder, texts: list[str], *, batch_size: int = 16) -> np.ndarray:
    """Output logits for ``texts`` ([n, labels] for classifiers)."""
    out = []
    bs = 1 if enc.sequence_length else batch_size
    name = enc.session.get_outputs()[0].name
    for i in range(0, len(texts), bs):
        (lg,) = enc.session.run([name], tokenize(enc, texts[i : i + bs]))
        out.append(np.asarray(lg, dtype=np.float32))
    return np.concatenate(out, axis=0)


def token_classify(enc: Encoder, words: list[list[str]]) -> list[list[str]]:
    """One tag per word (the prediction at each word's first sub-token), for token classifiers."""
    name = enc.session.get_outputs()[0].name
    out: list[list[str]] = []
    names = {i.name for i in enc.session.get_inputs()}
    for ws in words:
        e = enc.tokenizer.encode(ws, is_pretokenized=True)
        feeds = {"input_ids": np.array([e.ids], np.int64), "attention_mask": np.array([e.attention_mask], np.int64),
                 "token_type_ids": np.array([e.type_ids], np.int64)}
        (lg,) = enc.session.run([name], {k: v for k, v in feeds.items() if k in names})
        pred = lg[0].argmax(-1)
        tags, seen = ["O"] * len(ws), set()
        for pos, w in enumerate(e.word_ids):
            if w is not None and w not in seen and e.attention_mask[pos]:
                seen.add(w)
                tags[w] = enc.labels[pred[pos]] if pred[pos] < len(enc.labels) else str(pred[pos])
        out.append(tags)
    return out


def classify(enc: Encoder, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) per text."""
    lg = logits(enc, texts)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = p.argmax(-1)
    return [(enc.labels[i] if i < len(enc.labels) else str(i), float(p[n, i])) for n, i in enumerate(idx)]
