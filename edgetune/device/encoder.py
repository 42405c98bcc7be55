"""Encoder models (BERT-like classifiers) on the device: ORT session + `tokenizers`.

Device-only imports: onnxruntime, numpy, tokenizers.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput
from .files import load_tokenizer, read_json
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
    pad_id: int = 0


def find_model_folder(path: str | Path) -> Path:
    p = Path(path)
    if (p / "model.onnx").is_file() and not (p / "genai_config.json").is_file():
        return p
    if (p / "manifest.json").is_file() and (p / "model" / "model.onnx").is_file():
        return p / "model"
    raise BadInput(f"{p} is not an encoder export (no model.onnx)", hint="give an `edgetune export` output or a bundle")


def load(folder: str | Path, target: Any = None) -> Encoder:
    """Load ``model.onnx`` with the target's providers/session options and its tokenizer.json."""
    folder = find_model_folder(folder)
    t = resolve_target(target)
    if not (folder / "tokenizer.json").is_file():
        raise BadInput(f"{folder} has no tokenizer.json", hint="export with a fast tokenizer")
    cfg = read_json(folder / "config.json", kind="config") if (folder / "config.json").is_file() else {}
    id2label = cfg.get("id2label") or {}
    if not isinstance(id2label, dict) or not all(str(k).lstrip("-").isdigit() for k in id2label):
        raise BadInput(f"{folder / 'config.json'}: id2label is not a mapping of label ids to names",
                       hint="the file is damaged or was modified; re-export the model (or copy the bundle again)")
    labels = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))] if id2label else []
    record = _model_facts(folder)
    t0 = time.perf_counter()
    tok = load_tokenizer(folder / "tokenizer.json")  # before native code: a damaged file is exit 2 naming it
    sess = create_session(folder / "model.onnx", t)
    # a bundle keeps no stage record: the graph itself says whether its shapes are static
    seq = record.get("sequence_length") or _static_length(sess)
    max_length = int(seq or min(int(cfg.get("max_position_embeddings", 512)), 512))
    pad_id = int(cfg.get("pad_token_id", 0) or 0)
    tok.enable_truncation(max_length)
    if seq:
        tok.enable_padding(length=int(seq), pad_id=pad_id)
    else:
        tok.enable_padding(pad_id=pad_id)
    return Encoder(folder=folder, session=sess, tokenizer=tok, labels=labels, sequence_length=seq, max_length=max_length,
                   target=t, load_time_s=time.perf_counter() - t0, task=record.get("task") or _task_from_graph(sess), pad_id=pad_id)


def _model_facts(folder: Path) -> dict[str, Any]:
    """Task and static length from the export record, or from the bundle manifest beside a bundle's model."""
    for path, key, kind in ((folder / "edgetune.json", "results", "stage record"), (folder.parent / "manifest.json", None, "manifest")):
        if path.is_file():
            data = read_json(path, kind=kind)  # a damaged file is exit 2 naming it
            facts = data.get(key) if key else data
            if isinstance(facts, dict) and facts.get("task"):
                return facts
    return {}


def _static_length(sess: Any) -> int | None:
    dims = sess.get_inputs()[0].shape
    return dims[1] if len(dims) == 2 and isinstance(dims[1], int) else None


def _task_from_graph(sess: Any) -> str:
    out = sess.get_outputs()[0]
    if {o.name for o in sess.get_outputs()} == {"start_logits", "end_logits"}:
        return "question-answering"
    if out.name == "last_hidden_state":
        return "feature-extraction"
    return "token-classification" if len(out.shape) == 3 else "sequence-classification"


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


def _word_tags(enc: Encoder, words: list[str]) -> tuple[list[str], list[float]]:
    """The tag and its probability per word: the prediction at each word's first sub-token."""
    name = enc.session.get_outputs()[0].name
    names = {i.name for i in enc.session.get_inputs()}
    e = enc.tokenizer.encode(words, is_pretokenized=True)
    feeds = {"input_ids": np.array([e.ids], np.int64), "attention_mask": np.array([e.attention_mask], np.int64),
             "token_type_ids": np.array([e.type_ids], np.int64)}
    (lg,) = enc.session.run([name], {k: v for k, v in feeds.items() if k in names})
    lg = np.asarray(lg[0], dtype=np.float32)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pred = p.argmax(-1)
    tags, probs, seen = ["O"] * len(words), [0.0] * len(words), set()
    for pos, w in enumerate(e.word_ids):
        if w is not None and w not in seen and e.attention_mask[pos]:
            seen.add(w)
            tags[w] = enc.labels[pred[pos]] if pred[pos] < len(enc.labels) else str(pred[pos])
            probs[w] = float(p[pos, pred[pos]])
    return tags, probs


def token_classify(enc: Encoder, words: list[list[str]]) -> list[list[str]]:
    """One tag per word (the prediction at each word's first sub-token), for token classifiers."""
    return [_word_tags(enc, ws)[0] for ws in words]


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def tag_entities(enc: Encoder, texts: list[str]) -> list[list[dict[str, Any]]]:
    """Named entities per text: ``{"text", "label", "start", "end", "score"}`` (character offsets).

    The text is split into words (runs of word characters, and each punctuation mark) as the
    token-classification data is; BIO/IOB2 tags are joined into spans (``metrics.entities``) and a
    span's score is the mean probability of its words' tags. Words past the model's length are
    untagged (O).
    """
    from .metrics import entities

    out = []
    for text in texts:
        words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
        if not words:
            out.append([])
            continue
        tags, probs = _word_tags(enc, [w for w, _, _ in words])
        spans = sorted(entities(tags), key=lambda s: s[1])
        out.append([{"text": text[words[a][1]:words[b - 1][2]], "label": label, "start": words[a][1], "end": words[b - 1][2],
                     "score": round(float(np.mean(probs[a:b])), 4)} for label, a, b in spans])
    return out


def classify(enc: Encoder, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) per text."""
    lg = logits(enc, texts)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = p.argmax(-1)
    return [(enc.labels[i] if i < len(enc.labels) else str(i), float(p[n, i])) for n, i in enumerate(idx)]
