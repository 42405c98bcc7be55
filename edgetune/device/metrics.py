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


# ---------------------------------------------------------------- task metrics (answers vs gold)
#
# Written here rather than taken from a library: the device side may import only numpy /
# onnxruntime / tokenizers, and the ones that would fit (``evaluate``'s squad metric,
# ``sacrebleu``'s chrF) are not in the pinned set and pull heavy dependencies. Token F1 is the
# SQuAD definition (bag of tokens, lower-cased), a dozen lines.

import json as _json
import re as _re

_WS = _re.compile(r"\s+")
_TOKEN = _re.compile(r"\w+|[^\w\s]", _re.UNICODE)
_MISSING = object()


def normalize_ws(text: str) -> str:
    """Whitespace runs -> one space, stripped."""
    return _WS.sub(" ", str(text)).strip()


def parse_json(text: str):
    """The JSON value of ``text`` (stripped), or the sentinel ``_MISSING`` when it does not parse."""
    try:
        return _json.loads(str(text).strip())
    except (ValueError, TypeError):
        return _MISSING


def is_json(text: str) -> bool:
    """True when ``text`` is a JSON object or array (bare numbers/strings count as free text)."""
    return isinstance(parse_json(text), (dict, list))


def json_equal(a, b) -> bool:
    """Structural equality: object key order ignored, numbers compared as numbers (45 == 45.0),
    booleans are not numbers, list order matters."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def exact_match(gold: str, answer: str) -> bool:
    """JSON-aware exact match: when ``gold`` is a JSON object/array the answer must parse and be
    structurally equal (:func:`json_equal`); otherwise whitespace-normalized string equality."""
    if is_json(gold):
        got = parse_json(answer)
        return got is not _MISSING and json_equal(parse_json(gold), got)
    return normalize_ws(gold) == normalize_ws(answer)


def valid_format(gold: str, answer: str) -> bool | None:
    """Whether the answer has the gold's format: valid JSON when the gold is JSON; None for free text."""
    if is_json(gold):
        return parse_json(answer) is not _MISSING
    return None


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(str(text).lower())


def token_f1(gold: str, answer: str) -> float:
    """SQuAD-style token F1 (bag of lower-cased word/punctuation tokens), in 0..1."""
    from collections import Counter

    g, a = _tokens(gold), _tokens(answer)
    if not g or not a:
        return float(g == a)
    common = sum((Counter(g) & Counter(a)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(g)
    return 2 * p * r / (p + r)


def task_scores(golds: Sequence[str], answers: Sequence[str]) -> dict:
    """Exact match (%), valid-format rate (%, JSON golds only, else None), token F1 (%) and the
    primary ``task_accuracy``: exact match when every gold is JSON, token F1 otherwise."""
    golds, answers = list(golds), list(answers)
    n = len(golds)
    if not n:
        return {"examples": 0}
    em = [exact_match(g, a) for g, a in zip(golds, answers)]
    vf = [v for v in (valid_format(g, a) for g, a in zip(golds, answers)) if v is not None]
    f1 = [token_f1(g, a) for g, a in zip(golds, answers)]
    all_json = len(vf) == n
    out = {
        "examples": n,
        "exact_match": 100.0 * sum(em) / n,
        "valid_format": 100.0 * sum(vf) / len(vf) if vf else None,
        "token_f1": 100.0 * sum(f1) / n,
        "metric": "exact_match" if all_json else "token_f1",
        "correct": em,
    }
    out["task_accuracy"] = out["exact_match"] if all_json else out["token_f1"]
    return out


# ---------------------------------------------------------------- extractive QA (SQuAD v1.1 evaluation)

_ARTICLES = _re.compile(r"\b(a|an|the)\b", _re.UNICODE)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles (a/an/the), single spaces."""
    import string

    punct = set(string.punctuation)
    text = "".join(ch for ch in str(text).lower() if ch not in punct)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(golds: Sequence[str], answer: str) -> float:
    """1.0 when the normalized answer equals one of the normalized golds."""
    a = squad_normalize(answer)
    return float(any(squad_normalize(g) == a for g in golds))


def squad_f1(golds: Sequence[str], answer: str) -> float:
    """The best token F1 (normalized words) of the answer against any gold, in 0..1."""
    from collections import Counter

    a = squad_normalize(answer).split()
    best = 0.0
    for g in golds:
        gt = squad_normalize(g).split()
        if not gt or not a:
            best = max(best, float(gt == a))
            continue
        common = sum((Counter(gt) & Counter(a)).values())
        if common:
            p, r = common / len(a), common / len(gt)
            best = max(best, 2 * p * r / (p + r))
    return best


def qa_scores(golds: Sequence[Sequence[str]], answers: Sequence[str]) -> dict:
    """SQuAD exact match and F1 in % over examples (each example: its gold answers, one predicted answer)."""
    n = len(answers)
    if not n:
        return {"examples": 0, "exact_match": None, "f1": None}
    return {"examples": n, "exact_match": 100.0 * sum(squad_exact(g, a) for g, a in zip(golds, answers)) / n,
            "f1": 100.0 * sum(squad_f1(g, a) for g, a in zip(golds, answers)) / n}


def score_windows(ids: np.ndarray, windows_: Sequence[tuple[int, int, int]], logits_fn, top_ids: np.ndarray,
                  top_logp: np.ndarray, reference_nll: np.ndarray, wrap=None) -> tuple[dict, dict]:
    """Score a model against a reference pack on the pack's own token ids and windows (the one window scorer).

    ``logits_fn(ids)`` returns the model's logits [len(ids), vocab] for one window; ``top_ids`` / ``top_logp`` /
    ``reference_nll`` are the pack's arrays (the reference's top-k per scored token and its NLL). ``wrap``: an
    optional iterable wrapper for the windows (a progress bar). Used by ``edgetune validate`` and by the
    benchmarks for every engine (onnxruntime-genai, llama.cpp), so they score alike.

    Returns (figures, series): perplexity of both, the increase in % and its standard error (``perplexity_increase_se_pct``,
    see :func:`increase_se_pct`), mean and p99 KL over the top-k, top-1 agreement, tokens scored; and the per-token
    ``nll_model`` / ``kl`` arrays and ``window_nll_delta``, each window's mean NLL minus the reference's (what a
    paired comparison of two models on the same pack needs).
    """
    nll_, kl, top1, off, deltas = [], [], [], 0, []
    for w in (wrap(windows_) if wrap else windows_):
        lg = logits_fn(ids[w[0]:w[1]])
        rows, tg = window_targets(ids, w)
        lg = lg[rows]
        k = len(tg)
        nll_.append(nll(lg, tg))
        kl.append(kl_topk(top_ids[off:off + k].astype(np.int64), top_logp[off:off + k].astype(np.float64), lg))
        top1.append(lg.argmax(-1) == top_ids[off:off + k, 0])
        if k:
            deltas.append(float(np.mean(nll_[-1] - reference_nll[off:off + k])))
        off += k
    nll_m, kl_a, top1_a = np.concatenate(nll_), np.concatenate(kl), np.concatenate(top1)
    ppl_m, ppl_r = perplexity(nll_m), perplexity(reference_nll)
    figures = {"perplexity": ppl_m, "reference_perplexity": ppl_r, "perplexity_increase_pct": 100.0 * (ppl_m / ppl_r - 1.0),
               "kl_divergence": float(kl_a.mean()), "kl_divergence_p99": float(np.percentile(kl_a, 99)),
               "top1_agreement": float(top1_a.mean()), "tokens_scored": int(len(nll_m)),
               "perplexity_increase_se_pct": increase_se_pct(deltas, float(np.log(ppl_m / ppl_r)))}
    return figures, {"nll_model": nll_m, "kl": kl_a, "window_nll_delta": np.asarray(deltas)}


def increase_se_pct(window_deltas: Sequence[float], mean_delta: float) -> float | None:
    """Standard error, in percentage points, of a perplexity increase ``100 * (exp(mean_delta) - 1)`` measured over
    scoring windows whose mean NLL differences are ``window_deltas`` (one model minus the reference, or one model minus
    another on the same windows: a paired comparison). Windows, not tokens, are the samples: the tokens of a window
    share its context, so their errors are not independent. None with fewer than two windows.

    The delta method: SE(exp(m)) ~ exp(m) * SE(m), SE(m) = std(window means) / sqrt(windows). On SmolLM2 and 4,096
    scored tokens (16 windows) one ΔPPL's standard error was 0.5-0.8 points (docs/benchmarks.md)."""
    d = np.asarray(window_deltas, dtype=np.float64)
    if len(d) < 2:
        return None
    return float(100.0 * np.exp(mean_delta) * d.std(ddof=1) / np.sqrt(len(d)))
