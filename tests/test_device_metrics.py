"""Metric math checked against direct numpy computations (no models)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetune.device import metrics as M


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 16, 5), (7, 16, 8), (33, 8, 8), (50, 10, 1)])
def test_sliding_windows_score_every_token_once_with_context(n, window, stride):
    scored = []
    for i, (start, end, frm) in enumerate(M.windows(n, window, stride)):
        assert 0 <= start < end <= n and end - start <= window
        if i > 0:  # every later window gives each scored token at least window-stride tokens of context
            assert frm >= min(window - stride, start + frm)
        scored += list(range(start + frm, end))
    assert scored == list(range(1, n))


def test_chunked_windows_match_llama_cpp_layout():
    # llama-perplexity -c 8: chunks [0,8),[8,16), scores the second half of each, drops the remainder
    assert M.windows(20, 8, method="chunked") == [(0, 8, 4), (8, 16, 4)]


def test_perplexity_of_windows_equals_direct_numpy():
    rng = np.random.default_rng(0)
    vocab, n, window, stride = 50, 64, 16, 4
    ids = rng.integers(0, vocab, n)
    # a "model" whose logits depend only on the previous token: context size does not matter,
    # so the windowed perplexity must equal the full-sequence one exactly
    table = rng.normal(size=(vocab, vocab)) * 2

    def model(x):
        return table[x]

    nll = []
    for w in M.windows(n, window, stride):
        lg = model(ids[w[0] : w[1]])
        rows, tg = M.window_targets(ids, w)
        nll.append(M.nll(lg[rows], tg))
    got = M.perplexity(np.concatenate(nll))
    lg = table[ids[:-1]]
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    direct = math.exp(-np.mean(np.log(p[np.arange(n - 1), ids[1:]])))
    assert got == pytest.approx(direct, rel=1e-12)


def test_score_windows_gives_the_per_window_differences_and_the_standard_error():
    rng = np.random.default_rng(1)
    vocab, n = 40, 8 * 32
    ids = rng.integers(0, vocab, n)
    ref_table, noise = rng.normal(size=(vocab, vocab)), rng.normal(size=(vocab, vocab)) * 0.3
    ws = M.windows(n, 32, method="chunked")

    def ref_model(x):
        return ref_table[x]

    ref_nll, top_ids, top_logp = [], [], []
    for w in ws:
        lg = ref_model(ids[w[0]:w[1]])
        rows, tg = M.window_targets(ids, w)
        ref_nll.append(M.nll(lg[rows], tg))
        i, lp = M.topk(lg[rows], 8)
        top_ids.append(i)
        top_logp.append(lp)
    ref_nll, top_ids, top_logp = np.concatenate(ref_nll), np.concatenate(top_ids), np.concatenate(top_logp)

    same, series = M.score_windows(ids, ws, ref_model, top_ids, top_logp, ref_nll)
    assert same["perplexity_increase_pct"] == pytest.approx(0, abs=1e-9) and same["perplexity_increase_se_pct"] == pytest.approx(0, abs=1e-9)
    figures, series = M.score_windows(ids, ws, lambda x: ref_table[x] + noise[x], top_ids, top_logp, ref_nll)
    d = series["window_nll_delta"]
    assert len(d) == len(ws) == 8
    # each window's mean NLL difference, and their mean is the log of the perplexity ratio (equal windows)
    k = len(ref_nll) // len(ws)
    assert d == pytest.approx((series["nll_model"] - ref_nll).reshape(len(ws), k).mean(1), rel=1e-12)
    ratio = figures["perplexity"] / figures["reference_perplexity"]
    assert np.mean(d) == pytest.approx(math.log(ratio), rel=1e-9)
    # the delta method over windows: 100 * ratio * std(window means) / sqrt(windows)
    assert figures["perplexity_increase_se_pct"] == pytest.approx(100 * ratio * np.std(d, ddof=1) / math.sqrt(8), rel=1e-9)
    assert figures["perplexity_increase_se_pct"] > 0
    assert M.increase_se_pct([0.1], 0.1) is None  # one window: no spread to measure


def test_kl_topk_exact_with_full_vocab_and_lower_bound_otherwise():
    rng = np.random.default_rng(1)
    ref, mod = rng.normal(size=(5, 30)) * 3, rng.normal(size=(5, 30)) * 3
    lp, lq = M.log_softmax(ref), M.log_softmax(mod)
    exact = (np.exp(lp) * (lp - lq)).sum(-1)
    ids, vals = M.topk(ref, 30)
    assert np.allclose(M.kl_topk(ids, vals, mod), exact, atol=1e-10)
    ids, vals = M.topk(ref, 4)
    approx = M.kl_topk(ids, vals, mod)
    assert np.all(approx <= exact + 1e-12) and np.all(approx > 0)
    ids, vals = M.topk(ref, 4)
    assert np.allclose(M.kl_topk(ids, vals, ref), 0, atol=1e-12)


def test_agreement_and_classification_metrics():
    assert M.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert M.prefix_agreement([1, 2], [1, 2]) == 1.0
    assert M.accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    # macro F1: a: tp2 fp1 fn0 -> 0.8 ; b: tp0 fp0 fn1 -> 0
    assert M.macro_f1(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(0.4)
    true = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert M.entity_f1(true, true) == 1.0
    # one of two entities right, one wrong span predicted: P=1/2, R=1/2
    assert M.entity_f1(true, [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)
