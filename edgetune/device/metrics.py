"""Accuracy metrics, numpy only.

Perplexity windows (see docs/validation.md):

* ``sliding`` (default): windows of ``window`` tokens whose starts advance by ``stride``; each
  window scores only the tokens not already scored by the previous one (the last ``stride``
  tokens; the first window scores all but its first token). Every token is scored exactly once
  with at least ``window - stride`` tokens of context (except in the first window).
* ``chunked``: what llama.cpp's ``llama-perplexity`` does: non-overlapping chunks of ``window``
  tokens, scoring only the second half of each chunk (tokens ``window//2 .. window-1``).
  With the same tokens and ``window`` = llama.cpp's ``-c``, the figures are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def windows(n_tokens: int, window: int, stride: int | None = None, method: str = "sliding") -> list[tuple[int, int, int]]:
    """(start, end, score_from) triples; positions ``start+score_from .. end-1`` are scored (predicted from the left)."""
    if window < 2:
        raise ValueError("window must be >= 2")
    if n_tokens < 2:
        return []
    if method == "chunked":
        out = []
        for start in range(0, n_tokens - window + 1, window):
            out.append((start, start + window, window // 2))
        if not out:  # text shorter than one chunk: one chunk, second half
            out.append((0, n_tokens, max(1, n_tokens // 2)))
        return out
    if method != "sliding":
        raise ValueError(f"unknown perplexity method {method!r}")
    stride = stride or window // 2
    if not 1 <= stride <= window:
        raise ValueError("stride must be in 1..window")
    out = [(0, min(window, n_tokens), 1)]
    scored_to = min(window, n_tokens)  # exclusive end of scored positions
    while scored_to < n_tokens:
        end = min(scored_to + stride, n_tokens)
        start = max(0, end - window)
        out.append((start, end, scored_to - start))
        scored_to = end
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def window_targets(ids: np.ndarray, w: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the window's logits that predict scored tokens, the scored token ids)."""
    start, end, score_from = w
    rows = np.arange(score_from - 1, end - start - 1)
    return rows, np.asarray(ids[start + score_from : end])


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits (natural log)."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]


def perplexity(nlls: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(nlls, dtype=np.float64)
    return float(math.exp(a.mean())) if a.size else float("nan")


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (descending) and their log-probabilities, per row."""
    lp = log_softmax(logits)
    k = min(k, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, idx, -1)
    order = np.argsort(-vals, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)


def kl_topk(ref_ids: np.ndarray, ref_logp: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_model) per row over the reference's top-k tokens plus one 'rest' bucket.

    Exact when the reference's top-k holds all its mass, otherwise a lower bound of the full
    KL (merging outcomes never increases KL). k = all of the vocabulary gives the exact KL.
    """
    lq = log_softmax(logits)
    q = np.exp(np.take_along_axis(lq, ref_ids, -1))
    p = np.exp(ref_logp)
    lq_k = np.take_along_axis(lq, ref_ids, -1)
    kl = (p * (ref_logp - lq_k)).sum(-1)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(-1), 1e-12, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0)


def prefix_agreement(golden: Sequence[int], got: Sequence[int]) -> float:
    """Fraction of the golden tokens reproduced before the first difference (1.0 = identical)."""
    if not golden:
        return 1.0 if not got else 0.0
    n = 0
    for a, b in zip(golden, got):
        if a != b:
            break
        n += 1
    return n / len(golden)


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    y_true, y_pred = list(y_true), list(y_pred)
    return sum(a == b for a, b in zip(y_true, y_pred)) / len(y_true) if y_true else float("nan")


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    labels = sorted(set(map(str, y_true)) | set(map(str, y_pred)))
    f1s = []
    for lab in labels:
        tp = sum(str(a) == lab and str(b) == lab for a, b in zip(y_true, y_pred))
        fp = sum(str(a) != lab and str(b) == lab for a, b in zip(y_true, y_pred))
        fn = sum(str(a) == lab and str(b) != lab for a, b in zip(y_true, y_pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(f1s)) if f1s else float("nan")


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """BIO/IOB2 spans as (type, start, end)."""
    spans, cur = set(), None
    for i, t in enumerate(list(tags) + ["O"]):
        if t == "O" or t.startswith("B-") or (t.startswith("I-") and (cur is None or cur[0] != t[2:])):
            if cur is not None:
                spans.add((cur[0], cur[1], i))
                cur = None
            if t != "O":
                cur = (t[2:] if "-" in t else t, i)
    return spans


def entity_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> float:
    """Micro entity-level F1 (exact span and type), as seqeval computes it."""
    tp = fp = fn = 0
    for t, p in zip(true_tags, pred_tags):
        a, b = entities(t), entities(p)
        tp += len(a & b)
        fp += len(b - a)
        fn += len(a - b)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
