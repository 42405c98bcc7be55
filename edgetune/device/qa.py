"""Extractive question answering on the device: windows over a long context, span decoding in numpy.

Device-only imports: onnxruntime (through the encoder session), numpy, tokenizers.

The recipe is the one of Hugging Face's SQuAD scripts, written here without transformers:

* **windows**: the question is kept whole and the context is cut into windows of ``max_length``
  tokens that share ``stride`` tokens (the ``tokenizers`` truncation strategy ``only_second`` with
  overflowing encodings: the same windows transformers' fast tokenizer returns for
  ``truncation="only_second", return_overflowing_tokens=True``, which fine-tuning uses);
* **spans**: in each window only context tokens (sequence id 1) may start or end an answer;
  start and end probabilities are softmaxes over them, a span's score is ``p_start * p_end`` with
  ``start <= end < start + max_answer_tokens``; the best span over all windows wins and its token
  offsets give the answer's characters in the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInput

TASK = "question-answering"
DEFAULT_MAX_LENGTH = 384  # tokens per window of a dynamic-shape graph (capped by the model's positions)
MAX_STRIDE = 128  # tokens shared by consecutive windows (HF's doc_stride for 384-token windows)
MAX_ANSWER_TOKENS = 30


@dataclass
class Window:
    ids: np.ndarray  # int64 [n]
    type_ids: np.ndarray
    mask: np.ndarray
    offsets: list[tuple[int, int]]  # character offsets of each token in its own sequence
    context: np.ndarray  # bool [n]: the token is part of the context


def window_sizes(max_length: int, stride: int | None = None) -> tuple[int, int]:
    """(max_length, stride) of the windows: the stride defaults to a third of the window, at most 128."""
    return int(max_length), int(min(MAX_STRIDE, max_length // 3) if stride is None else stride)


def windows(tok: Any, question: str, context: str, *, max_length: int, stride: int) -> list[Window]:
    """The windows of one (question, context) pair; ``tok`` is a ``tokenizers.Tokenizer`` (its settings are replaced)."""
    tok.no_padding()
    tok.no_truncation()
    q_len = len(tok.encode(question, add_special_tokens=False).ids)
    room = max_length - q_len - tok.num_special_tokens_to_add(True)
    if room < 2:
        raise BadInput(f"the question is {q_len} tokens: it leaves no room for the context in the model's {max_length}-token window",
                       hint="ask a shorter question")
    tok.enable_truncation(max_length, stride=min(stride, room - 1), strategy="only_second")
    first = tok.encode(question, context)
    out = []
    for e in [first, *first.overflowing]:
        seq = e.sequence_ids
        out.append(Window(ids=np.asarray(e.ids, np.int64), type_ids=np.asarray(e.type_ids, np.int64),
                          mask=np.asarray(e.attention_mask, np.int64), offsets=[tuple(o) for o in e.offsets],
                          context=np.array([s == 1 for s in seq], bool) & (np.asarray(e.attention_mask) == 1)))
    return out


def feeds(wins: list[Window], *, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` / ``attention_mask`` / ``token_type_ids`` [len(wins), length], padded on the right."""
    n = len(wins)
    ids = np.full((n, length), pad_id, np.int64)
    mask = np.zeros((n, length), np.int64)
    types = np.zeros((n, length), np.int64)
    for i, w in enumerate(wins):
        k = len(w.ids)
        ids[i, :k], mask[i, :k], types[i, :k] = w.ids, w.mask, w.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, wins: list[Window], context: str,
              *, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict[str, Any]:
    """The best answer over the windows: ``{"answer", "start", "end", "score"}`` (character offsets in ``context``)."""
    best: dict[str, Any] | None = None
    for i, w in enumerate(wins):
        n = len(w.ids)
        ctx = w.context[:n]
        if not ctx.any():
            continue
        s = np.where(ctx, np.asarray(start_logits[i][:n], np.float64), -np.inf)
        e = np.where(ctx, np.asarray(end_logits[i][:n], np.float64), -np.inf)
        ps, pe = _softmax(s), _softmax(e)
        scores = np.triu(np.outer(ps, pe))  # start <= end
        scores = np.tril(scores, max_answer_tokens - 1)  # end < start + max_answer_tokens
        a, b = np.unravel_index(int(np.argmax(scores)), scores.shape)
        score = float(scores[a, b])
        if best is None or score > best["score"]:
            cs, ce = int(w.offsets[a][0]), int(w.offsets[b][1])
            best = {"answer": context[cs:ce], "start": cs, "end": ce, "score": score, "window": i}
    if best is None:
        return {"answer": "", "start": 0, "end": 0, "score": 0.0, "window": None}
    return best


def max_length_of(enc: Any) -> int:
    """Window length of an encoder: its static sequence length, else min(384, its max length)."""
    return int(enc.sequence_length or min(DEFAULT_MAX_LENGTH, enc.max_length))


def answer(enc: Any, question: str, context: str, *, max_length: int | None = None, stride: int | None = None,
           max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict[str, Any]:
    """The answer span of ``question`` in ``context`` from a question-answering encoder (``device.encoder.load``).

    Windows of ``max_length`` tokens (default and maximum: the graph's static length; else 384 capped by
    the model's positions) sharing ``stride`` tokens (default ``window_sizes``)."""
    if enc.task != TASK:
        raise BadInput(f"this encoder is a {enc.task} model, not a question-answering one", hint="give a question-answering bundle")
    if max_length and enc.sequence_length and max_length > enc.sequence_length:
        raise BadInput(f"windows of {max_length} tokens do not fit the graph's static sequence length {enc.sequence_length}",
                       hint=f"use windows of at most {enc.sequence_length} tokens")
    length, stride = window_sizes(max_length or max_length_of(enc), stride)
    wins = windows(enc.tokenizer, question, context, max_length=length, stride=stride)
    names = [i.name for i in enc.session.get_inputs()]
    outs = ["start_logits", "end_logits"]
    static_batch = enc.session.get_inputs()[0].shape[0] if enc.sequence_length else None
    bs = static_batch if isinstance(static_batch, int) and static_batch > 0 else (1 if enc.sequence_length else len(wins))
    pad_len = enc.sequence_length or max(len(w.ids) for w in wins)
    starts, ends = [], []
    for i in range(0, len(wins), bs):
        chunk = wins[i : i + bs]
        f = feeds(chunk + [chunk[-1]] * (bs - len(chunk)), length=pad_len, pad_id=enc.pad_id)
        s, e = enc.session.run(outs, {k: f[k] for k in names})
        starts.extend(np.asarray(s, np.float32)[: len(chunk)])
        ends.extend(np.asarray(e, np.float32)[: len(chunk)])
    out = best_span(starts, ends, wins, context, max_answer_tokens=max_answer_tokens)
    out["windows"] = len(wins)
    return out
