"""Importance-weighted int4 rounding: a scale and zero-point search per block, weighted by how much each
input channel's activations carry (llama.cpp's k-quant search with an imatrix), on the fast kernel.

Round-to-nearest (the builder's RTN) gives every block the scale that maps its extreme values onto the
grid ends, whatever that costs the other 31 weights, and treats every input channel alike. What a
linear's int4 rounding costs is its output error ``E|x dW^T|^2``; with the cross terms dropped that is
``sum_k E[x_k^2] dw_k^2``: the rounding error of weight ``k`` weighted by the mean square of the
activation it multiplies (the "importance matrix" llama.cpp's ``llama-imatrix`` collects). Per block
this module searches the scale (and for an asymmetric export the integer zero point) that minimizes
that weighted error:

1. candidate scales around RTN's (``STEPS`` of them, +-``SPREAD`` of the 4-bit range, as llama.cpp's
   ``make_qkx2_quants`` / ``make_qx_quants`` step their inverse scale); for each, the weights are
   rounded, then the scale (and the offset, rounded back onto an integer zero point) is solved by
   weighted least squares for those integers, the weights rounded again and the error taken;
2. the candidate with the least weighted error wins, per block; RTN's own integers are one of the
   candidates that are compared, so no block ends up worse than RTN on this measure (a test checks it).

The result is stored exactly as the builder's RTN stores it: the same MatMulNBits node, uint4 weights,
fp32 scales, uint4 zero points (asymmetric) or none (symmetric). Nothing changes in the graph but the
values, so the node keeps the prepacked kernel, accuracy_level 4 included (no float zero points, no
block-sum correction: what made the exact GGUF form slower).

The importance comes from one fp32 PyTorch forward over the calibration texts (forward hooks on the
linears' inputs: q/k/v read one input, gate/up another). It plugs into :mod:`.stream_quant`, which
already quantizes the builder's MatMuls one weight at a time: the builder's quantizer writes RTN, then
:meth:`Requantizer.__call__` replaces the node's values from the same fp32 weight.

**With error feedback (``imatrix-gptq``).** The search above rounds every weight on its own. GPTQ (Frantar et
al., 2022) rounds the columns of a linear in order and moves each column's rounding error onto the columns not
yet rounded, weighted by the inverse of H = X^T X (the linear's input correlations on the calibration texts),
so the *output* error ``tr(dW H dW^T)`` is what is minimized, cross terms included. :func:`gptq` does that with
each block's scale and zero point taken from the importance-weighted search when the block's first column is
reached (on the weights as the earlier columns' errors left them), so the integers, scales and zero points have
the same layout as before and the graph is still RTN's node for node. Cost: H per distinct linear input
(K x K, accumulated in float64: 27 MB per SmolLM2 layer; kept in memory when they all fit half of what is free, else
the inputs are spilled to disk and each H computed when its linear is reached: :func:`collect_hessians`), one
Cholesky and triangular solve per H, and a K-step loop per linear whose per-block scale search is most of the time
(docs/llm.md, "Named recipes": what it costs on 0.1-4B models).

GPTQ fits H to the calibration texts, and off their domain it can do worse than the plain search (docs/llm.md:
calibrated on tinyshakespeare, GPTQ's usual 1 % dampening took the demo fine-tune from +11.0 % to +4.6 % perplexity
on Shakespeare but made a libpng manual, +10.0 % -> +11.9 %, worse). ``DAMP`` = 1.0 (H's mean diagonal added to
its diagonal: the correlations count, the diagonal, i.e. the importance, counts as much) measured best on that
manual (+8.5 %); calibrate on text like the deployment's.

Why own code: onnxruntime's quantizers have no importance-weighted RTN (HQQ fits float zero points,
which run MatMulNBits' slow path; GPTQ needs minutes per layer on 2 cores and updates later columns);
NNCF's ONNX weight compression with a data-aware scale search matches its own ONNX graphs, not the
builder's, and is not in the pinned set; llama.cpp's search lives in C on its own block formats.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ... import onnx_graph

STEPS = 20  # candidate scales per block (llama.cpp: nstep 20 for Q4_K)
SPREAD = 1.0  # +- this much of the grid's range around RTN's scale, in grid steps (llama.cpp: rmin -1, rdelta 0.1)
EPS = 1e-3  # importance floor, relative to a block's mean: a channel never seen active still counts a little


def collect(model_dir: Path, token_ids: list[list[int]]) -> dict[str, np.ndarray]:
    """Mean square of each linear's input per channel over the calibration tokens, by module name.

    One fp32 forward (a bf16/fp16 checkpoint computes in fp32 one module at a time). Keys: every
    ``nn.Linear`` of the model (q/k/v and gate/up get the same vector: they read the same input)."""
    from ...errors import require
    from ...model_input import load_causal_lm

    torch = require("torch", purpose="the importance matrix")
    model = load_causal_lm(model_dir).eval()
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, inp, _out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                s = (x * x).sum(0)
                sums[name] = s if name not in sums else sums[name] + s
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in token_ids:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    del model
    return {name: (s / max(counts[name], 1)).double().numpy().astype(np.float32) for name, s in sums.items()}


def collect_hessians(model_dir: Path, token_ids: list[list[int]], *, max_bytes: int | None = None,
                     spill_dir: Path | None = None) -> tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]:
    """H = X^T X / tokens of each linear's input over the calibration tokens, and the importance (its diagonal).

    Linears that read the same tensor (q/k/v, gate/up) share one H (the same array). The H matrices are accumulated in
    memory when they fit in ``max_bytes`` (default: half the memory available with the model loaded), counted as 12
    bytes per entry (the float64 sums, then the float32 H kept for the export). Llama-3.2-1B's need 14.3 GiB: held in
    memory on a 24 GiB machine, they took the export to 21.9 GB peak. A larger model's do not fit at all (one
    down_proj of 8,960 inputs alone is 0.6 GiB; Qwen2.5-1.5B's all 27.4 GiB): then, with ``spill_dir``, the inputs X
    themselves are written there (float32, tokens x K per distinct input: 4,096 x 8,960 is 147 MB) and each H is
    computed from them when the export reaches its linear (:class:`SpilledCorrelations`), so memory holds one input's X
    and H at a time. Without ``spill_dir``, or without the disk for it, refused (BadInput) before the calibration pass.
    The sizes come from a probe forward over a few tokens (which linears read one tensor, and its width)."""
    from ...errors import BadInput, require
    from ...host_memory import available_bytes
    from ...model_input import load_causal_lm

    torch = require("torch", purpose="GPTQ's input correlations")
    model = load_causal_lm(model_dir).eval()
    if max_bytes is None:  # what is left with the float model loaded
        max_bytes = available_bytes()[0] // 2
    alias: dict[str, str] = {}  # linear -> the first linear that read the same tensor (its H's owner)
    width: dict[str, int] = {}  # owner -> K
    counts: dict[str, int] = {}
    # the previous linear's input tensor and name: q/k/v (gate/up) are called in a row on one tensor; holding it keeps its
    # memory from being reused by another tensor meanwhile
    last: list = [None, None]
    sink: list = [None]  # what the calibration pass does with each input (the probe: nothing)

    def hook(_m, inp, _out, name):
        x = inp[0]
        if x is last[0]:
            alias[name] = last[1]
            return
        last[0], last[1] = x, name
        x = x.detach().reshape(-1, x.shape[-1])
        width[name] = x.shape[-1]
        if sink[0] is not None:
            counts[name] = counts.get(name, 0) + x.shape[0]
            sink[0](name, x)

    hooks = [mod.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
             for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]

    def forward(m, sequences):
        with torch.no_grad():
            for ids in sequences:
                m(torch.tensor([ids]))
                last[0] = None

    try:
        forward(model, [token_ids[0][:4]])  # the probe: no sink yet, only which linears share an input and its width
        in_memory = sum(12 * k * k for k in width.values())  # accumulated in float64, then kept in float32
        tokens = sum(len(ids) for ids in token_ids)
        spilled = sum(4 * tokens * k for k in width.values())
        if in_memory <= max_bytes:
            sums: dict[str, Any] = {}

            def accumulate(name, x):
                x = x.double()
                if name in sums:
                    sums[name].addmm_(x.T, x)
                else:
                    sums[name] = x.T @ x

            sink[0] = accumulate
            forward(model, token_ids)
            del model
            hess = {name: (sums.pop(name) / max(counts[name], 1)).float().numpy() for name in list(sums)}  # one float64 freed at a time
            for name, owner in alias.items():
                hess[name] = hess[owner]
            importance = {name: np.ascontiguousarray(np.diag(h)).astype(np.float32) for name, h in hess.items()}
            return hess, importance
        gib = 2 ** 30
        if spill_dir is None:
            raise BadInput(f"GPTQ's input correlations need more than {max_bytes / gib:.1f} GiB for this model "
                           f"({in_memory / gib:.1f} GiB)", hint="use --int4-algorithm imatrix (no correlations), or free memory")
        spill_dir = Path(spill_dir)
        spill_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(spill_dir).free
        if spilled + (1 << 30) > free:
            raise BadInput(f"GPTQ's input correlations need {in_memory / gib:.1f} GiB of memory ({max_bytes / gib:.1f} GiB "
                           f"may be used) or {spilled / gib:.1f} GiB of disk in {spill_dir.parent} ({free / gib:.1f} GiB free)",
                           hint="free disk there or point TMPDIR at a larger disk, or use --int4-algorithm imatrix")
        files = {name: open(spill_dir / f"{i}.f32", "wb") for i, name in enumerate(width)}
        squares: dict[str, Any] = {}

        def spill(name, x):
            x = x.float().contiguous()
            files[name].write(x.numpy().tobytes())
            s = (x.double() ** 2).sum(0)
            squares[name] = s if name not in squares else squares[name] + s

        sink[0] = spill
        try:
            forward(model, token_ids)
        finally:
            for f in files.values():
                f.close()
        del model
        paths = {name: Path(f.name) for name, f in files.items()}
        importance = {name: (squares[name] / max(counts[name], 1)).numpy().astype(np.float32) for name in width}
        for name, owner in alias.items():
            importance[name] = importance[owner]
        return SpilledCorrelations(paths, width, counts, alias, in_memory=in_memory, max_bytes=max_bytes), importance
    finally:
        for h in hooks:
            h.remove()


class SpilledCorrelations(Mapping):
    """The H of each linear, computed in float64 from its input X on disk when first asked for (the export asks for
    the linears in layer order: the last one is kept, so q/k/v and gate/up compute theirs once)."""

    def __init__(self, paths: dict[str, Path], width: dict[str, int], counts: dict[str, int], alias: dict[str, str], *,
                 in_memory: int, max_bytes: int):
        self.paths, self.width, self.counts, self.alias = paths, width, counts, alias
        self.record = {"kept": "disk", "memory_needed_bytes": in_memory, "memory_allowed_bytes": max_bytes,
                       "disk_bytes": sum(p.stat().st_size for p in paths.values())}
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        owner = self.alias.get(name, name)
        if owner not in self.paths:
            raise KeyError(name)
        if self._last is None or self._last[0] != owner:
            self._last = None  # free the previous H first
            x = np.fromfile(self.paths[owner], np.float32).reshape(-1, self.width[owner]).astype(np.float64)
            self._last = (owner, (x.T @ x / max(self.counts[owner], 1)).astype(np.float32))
        return self._last[1]

    def __iter__(self):
        return iter([*self.paths, *self.alias])

    def __len__(self) -> int:
        return len(self.paths) + len(self.alias)


DAMP = 1.0  # dampening: this times H's mean diagonal added to its diagonal (GPTQ: 0.01); see the module docstring
LAZY = 128  # columns per lazy batch update (GPTQ's block), a multiple of the int4 block


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), what GPTQ's column loop reads, without inverting H.

    With P the order-reversing permutation, cholesky(P H P) = M gives H = (P M P)(P M P)^T with P M P upper, so
    H^-1 = U^T U for U = P M^-1 P: one Cholesky and one triangular solve, 4n^3/3 flops where inverting H and then
    factoring the inverse (numpy has no triangular solve; torch's LAPACK does) takes 7n^3/3: 2.4x faster measured
    at K = 2,048 and 4,096 (2 cores)."""
    import torch

    ht = torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1]))
    m = torch.linalg.cholesky(ht)
    mi = torch.linalg.solve_triangular(m, torch.eye(len(h), dtype=m.dtype), upper=False)
    return np.ascontiguousarray(mi.numpy()[::-1, ::-1])


def gptq(weight: np.ndarray, hessian: np.ndarray, importance: np.ndarray, *, block: int, symmetric: bool, bits: int = 4
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of ``weight`` [N, K] with H [K, K]; each block's scale/zero point from :func:`search` when it is reached.

    Returns ``(q [N, K] uint8, scales [N, K/block], zero_points [N, K/block] uint8 or None)`` as :func:`search`."""
    n, k = weight.shape
    assert k % block == 0, (k, block)
    nmax = 2 ** bits - 1
    # columns are rounded one at a time: the weight is held transposed ([K, N]) so a column is one contiguous row
    wt = np.array(weight.T, np.float32, order="C")
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    wt[dead, :] = 0.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    hinv = _inverse_cholesky(h).astype(np.float32)
    qt = np.zeros((k, n), np.uint8)
    scales = np.zeros((k // block, n), np.float32)
    zeros = np.full((k // block, n), 2 ** (bits - 1), np.uint8)
    lazy = block * max(1, LAZY // block)
    sc = zc = None
    for b0 in range(0, k, lazy):
        b1 = min(b0 + lazy, k)
        w1 = wt[b0:b1]  # a view: the lazy batch is updated in place
        err = np.zeros_like(w1)
        hi = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % block == 0:
                g = col // block
                _, gs, gz, _ = _search_t(w1[j:j + block][None], importance[col:col + block].reshape(1, block, 1),
                                         symmetric=symmetric, bits=bits, rtn=None)
                scales[g] = gs[0]
                if gz is not None:
                    zeros[g] = gz[0]
                sc = np.where(gs[0] == 0, np.float32(1), gs[0])
                zc = zeros[g].astype(np.float32)
            x = w1[j]
            qq = np.clip(np.rint(x / sc) + zc, 0, nmax)
            qt[col] = qq
            e = (x - (qq - zc) * sc) / hi[j, j]
            w1[j + 1:] -= np.outer(hi[j, j + 1:], e)
            err[j] = e
        wt[b1:] -= hinv[b0:b1, b1:].T @ err
    return np.ascontiguousarray(qt.T), np.ascontiguousarray(scales.T), (None if symmetric else np.ascontiguousarray(zeros.T))


def output_error(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW H dW^T)``: the linear's mean squared output error on the calibration inputs."""
    d = (dequantized - weight).astype(np.float32)
    return float(((d @ hessian) * d).sum())


def _fit(w: np.ndarray, wx: np.ndarray, sxx: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares scale for fixed integers ``d = q - z`` per block; returns (scale, error).

    Arrays are laid out ``[blocks, block, rows]`` (see :func:`_search_t`): sums run over axis 1. The error
    ``sum w (s d - x)^2`` is expanded into ``sxx - 2 s sum(w x d) + s^2 sum(w d^2)`` (float64), which needs no pass
    over the block beyond the two sums the scale needs; it ranks candidates, the winner's is taken again exactly."""
    wd = w * d
    num = _sum(wx * d)
    den = _sum(wd * d)
    s = np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)
    s64 = s.astype(np.float64)
    return s, sxx - 2 * s64 * num + s64 * s64 * den


def _sum(a: np.ndarray) -> np.ndarray:
    """``a.sum(1)`` as a fixed tree of pairwise adds over the block axis, so a block's sum is the same bits however
    many rows are searched at once (NumPy's own reduction picks its order by the array's shape)."""
    while a.shape[1] > 1:
        half = a.shape[1] // 2
        b = a[:, :half] + a[:, half:2 * half]
        if a.shape[1] % 2:
            b[:, :1] += a[:, 2 * half:]
        a = b
    return a[:, 0]


def _round(v: np.ndarray, lo, hi) -> np.ndarray:
    """``clip(rint(v), lo, hi)`` in place on ``v`` (a temporary): np.clip with array bounds is several times slower."""
    np.rint(v, out=v)
    np.maximum(v, lo, out=v)
    return np.minimum(v, hi, out=v)


def _error(x: np.ndarray, w: np.ndarray, s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``sum w (s d - x)^2`` per block, taken directly (layout as :func:`_fit`)."""
    r = s[:, None] * d
    r -= x
    r *= r
    r *= w
    return _sum(r)


ROWS = 2048  # output rows searched at a time (a 262k-vocabulary head would need GBs of temporaries at once)


def search(weight: np.ndarray, importance: np.ndarray, *, block: int, symmetric: bool, bits: int = 4,
           rtn: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, float]]:
    """Integers, scales and zero points of ``weight`` [N, K] per block of ``block`` along K.

    ``importance``: [K] (one weight per input channel, the imatrix) or [N, K] (one per weight element).

    Returns ``(q [N, K] uint8, scales [N, K/block] float32, zero_points [N, K/block] uint8 or None, info)``
    with ``w ~ scales * (q - zero_points)`` (symmetric: zero point ``2**(bits-1)``). ``rtn``: RTN's own
    ``(q, scales, zero_points)`` of the same weight, kept wherever no candidate beats it. ``info``: the
    importance-weighted squared error summed over the weight, RTN's and this result's.
    """
    parts = []
    for r in range(0, weight.shape[0], ROWS):
        sl = slice(r, r + ROWS)
        part_rtn = None if rtn is None else (rtn[0][sl], rtn[1][sl], None if rtn[2] is None else rtn[2][sl])
        imp = importance[sl] if np.ndim(importance) == 2 else importance
        parts.append(_search(weight[sl], imp, block=block, symmetric=symmetric, bits=bits, rtn=part_rtn))
    q = np.concatenate([p[0] for p in parts])
    s = np.concatenate([p[1] for p in parts])
    z = None if symmetric else np.concatenate([p[2] for p in parts])
    err_rtn = None if rtn is None else sum(p[3]["err_rtn"] for p in parts)
    return q, s, z, {"err_rtn": err_rtn, "err": sum(p[3]["err"] for p in parts)}


def _search(weight, importance, *, block, symmetric, bits, rtn):
    n, k = weight.shape
    assert k % block == 0, (k, block)
    nb = k // block
    t = (1, 2, 0)  # [N, K/block, block] -> [K/block, block, N]
    x = weight.astype(np.float32).reshape(n, nb, block).transpose(t)
    imp = np.asarray(importance, np.float32).reshape(-1, nb, block).transpose(t)
    if rtn is not None:
        rq, rs, rz = rtn
        rtn = (rq.reshape(n, nb, block).transpose(t), rs.reshape(n, nb).T, None if rz is None else rz.reshape(n, nb).T)
    q, s, z, info = _search_t(np.ascontiguousarray(x), np.ascontiguousarray(imp), symmetric=symmetric, bits=bits, rtn=rtn)
    return q.transpose(2, 0, 1).reshape(n, k), np.ascontiguousarray(s.T), None if z is None else np.ascontiguousarray(z.T), info


def _search_t(x, importance, *, symmetric, bits, rtn):
    """:func:`search` on blocks laid out ``[K/block, block, N]``: the sums over a block run across rows of N
    contiguous values, and per-row scales broadcast along them (NumPy is several times faster this way than
    reducing 32 contiguous values at a time). ``importance``: [K/block, block, 1 or N]. Returns ``(q [K/block,
    block, N] uint8, scales [K/block, N], zero points [K/block, N] uint8 or None, info)``."""
    nmax = 2 ** bits - 1
    w = importance + EPS * (_sum(importance) / np.float32(importance.shape[1]))[:, None] + np.float32(1e-12)
    wx = w * x
    sxx = _sum(wx * x).astype(np.float64)
    shape = x.shape[:1] + x.shape[2:]
    best_err = np.full(shape, np.inf)
    best_s = np.zeros(shape, np.float32)
    best_z = np.full(shape, 2 ** (bits - 1), np.float32)
    # the winner's integers are those of its last rounding: kept as the scale it rounded with and recomputed once
    # at the end (the same arithmetic)
    best_r = np.ones(shape, np.float32)

    def keep(r, s, z, err):
        better = err < best_err
        np.copyto(best_err, err, where=better)
        np.copyto(best_s, s, where=better)
        np.copyto(best_z, z, where=better)
        np.copyto(best_r, r, where=better)

    if symmetric:
        zc = np.float32(2 ** (bits - 1))
        # RTN's scale maps the largest-magnitude weight onto -2**(bits-1) (onnxruntime's and llama.cpp's Q4_0 rule)
        idx = np.abs(x).argmax(1)[:, None]
        vmax = np.take_along_axis(x, idx, 1)[:, 0]
        vmax = np.where(vmax == 0, np.float32(1e-30), vmax)
        for i in range(STEPS + 1):
            iscale = -(zc + SPREAD * (2 * i / STEPS - 1)) / vmax
            d = _round(x * iscale[:, None], -zc, nmax - zc)
            s, _ = _fit(w, wx, sxx, d)
            for _ in range(2):  # round again with the fitted scale, refit
                r = np.where(s == 0, 1, s)
                d = _round(x / r[:, None], -zc, nmax - zc)
                s, err = _fit(w, wx, sxx, d)
            keep(r, s, zc, err)
    else:
        mn = np.minimum(x.min(1), 0)
        mx = np.maximum(x.max(1), 0)
        rng = np.where(mx - mn > 0, mx - mn, np.float32(1e-30))
        sw, sx = _sum(w), _sum(wx)
        for i in range(STEPS + 1):
            iscale = (nmax + SPREAD * (2 * i / STEPS - 1)) / rng
            lq = x - mn[:, None]
            lq *= iscale[:, None]
            lq = _round(lq, 0, nmax)
            # weighted least squares for x ~ s * L + m, then m onto an integer zero point: m = -s * z
            wl = w * lq
            sl, sll, slx = _sum(wl), _sum(wl * lq), _sum(wx * lq)
            det = sw * sll - sl * sl
            ok = det > 0
            s = np.where(ok, (sw * slx - sl * sx) / np.where(ok, det, 1), 1 / iscale)
            m = np.where(ok, (sll * sx - sl * slx) / np.where(ok, det, 1), mn)
            s = np.where(s > 0, s, 1 / iscale).astype(np.float32)
            z = np.clip(np.rint(-m / s), 0, nmax).astype(np.float32)
            lo, hi = -z[:, None], nmax - z[:, None]
            for _ in range(2):
                r = s
                d = _round(x / r[:, None], lo, hi)
                s, err = _fit(w, wx, sxx, d)
                s = np.where(s > 0, s, 1 / iscale).astype(np.float32)
            keep(r, s, z, err)
    zz = best_z[:, None]
    q = np.clip(np.rint(x / best_r[:, None]) + zz, 0, nmax)
    err = _error(x, w, best_s, q - zz)
    rtn_err = None
    if rtn is not None:  # RTN's own integers wherever no candidate beats them (on the exact error)
        rq, rs, rz = rtn
        rq = rq.astype(np.float32)
        rs = rs.astype(np.float32)
        rz = np.full(shape, 2 ** (bits - 1), np.float32) if rz is None else rz.astype(np.float32)
        e_rtn = _error(x, w, rs, rq - rz[:, None])
        take = e_rtn <= err
        np.copyto(q, rq, where=take[:, None])
        np.copyto(best_s, rs, where=take)
        np.copyto(best_z, rz, where=take)
        err = np.where(take, e_rtn, err)
        rtn_err = float(e_rtn.sum())
    zp = None if symmetric else best_z.astype(np.uint8)
    return q.astype(np.uint8), best_s, zp, {"err_rtn": rtn_err, "err": float(err.sum())}


def _pad(importance: np.ndarray, kp: int) -> np.ndarray:
    """The importance [K] or [N, K] with zeros up to ``kp`` columns (the padding of a last partial block)."""
    k = importance.shape[-1]
    if k == kp:
        return importance
    return np.concatenate([importance, np.zeros(importance.shape[:-1] + (kp - k,), importance.dtype)], -1)


def _pack_zero_points(z: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero_points: per row, ``bits``-bit values packed low first, each row padded to whole bytes."""
    from .blockform import pack

    n, nb = z.shape
    per_byte = 8 // bits
    padded = -(-nb // per_byte) * per_byte
    z = np.concatenate([z, np.zeros((n, padded - nb), np.uint8)], 1)
    return pack(z, bits, padded).reshape(-1)


class Requantizer:
    """Replaces the values of the builder's RTN MatMulNBits nodes with the importance-weighted search.

    Called by :func:`edgetune.export.decoder.stream_quant.prequantize` with each node's name, its fp32 weight [K, N]
    and the one-node model the builder's quantizer wrote (an onnx ModelProto, changed in place).
    """

    def __init__(self, importance: dict[str, np.ndarray], hessians: dict[str, np.ndarray] | None = None):
        self.importance = importance
        self.hessians = hessians  # given: GPTQ error feedback (imatrix-gptq), the error measured on the outputs
        self.done: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    def module_of(self, node_name: str) -> str | None:
        """The HF linear whose input the builder node reads (the first part of a packed node: they share it), as the
        calibration pass named it: a part the builder split off a checkpoint's packed linear (Phi-3 / Phi-4-mini's
        q/k/v of ``qkv_proj``, gate/up of ``gate_up_proj``) reads the packed one's input."""
        from .mixed import base_name
        from .packed import PART_OF, hf_linears

        parts = hf_linears(base_name(node_name))
        if not parts:
            return None
        if parts[0] in self.importance:
            return parts[0]
        prefix, _, proj = parts[0].rpartition(".")
        packed = f"{prefix}.{PART_OF[proj]}" if proj in PART_OF else None
        return packed if packed in self.importance else None

    def __call__(self, node_name: str, weight_kn: np.ndarray, proto: Any) -> bool:
        from onnx import numpy_helper

        from .blockform import pack, unpack

        mod = self.module_of(node_name)
        nodes = [nd for nd in proto.graph.node if nd.op_type == "MatMulNBits"]
        if mod is None or len(nodes) != 1:
            self.skipped.append(node_name)
            return False
        node = nodes[0]
        a = onnx_graph.attributes(node)
        bits, block, k, n = a["bits"], a["block_size"], a["K"], a["N"]
        if weight_kn.shape != (k, n):
            self.skipped.append(node_name)
            return False
        # K not a multiple of the block (SmolLM2's 576 in blocks of 128): MatMulNBits pads the last block, and so does
        # this search: zero weights of no importance (and a dead row/column of H), whose integers are dropped by the
        # kernel (the activations it pads with are zeros)
        nb = -(-k // block)
        kp = nb * block
        inits = {i.name: i for i in proto.graph.initializer}
        names = list(node.input)[1:4]
        b_init, s_init = inits[names[0]], inits[names[1]]
        z_init = inits.get(names[2]) if len(names) > 2 and names[2] else None
        rq = unpack(numpy_helper.to_array(b_init).reshape(n, -1), bits, kp)
        rs = numpy_helper.to_array(s_init).reshape(n, nb)
        rz = None
        if z_init is not None:
            zp = numpy_helper.to_array(z_init).reshape(n, -1)
            rz = unpack(zp, bits, zp.shape[1] * 8 // bits)[:, :nb]
        w = np.zeros((n, kp), np.float32)
        w[:, :k] = weight_kn.T
        imp = _pad(np.asarray(self.importance[mod], np.float32), kp)
        if self.hessians is not None:
            hess = self.hessians[mod]
            if kp != k:
                hp = np.zeros((kp, kp), hess.dtype)
                hp[:k, :k] = hess
                hess = hp
            q, s, z = gptq(w, hess, imp, block=block, symmetric=z_init is None, bits=bits)

            def deq(q_, s_, z_):
                zz = np.float32(2 ** (bits - 1)) if z_ is None else z_.astype(np.float32).reshape(n, nb, 1)
                return ((q_.astype(np.float32).reshape(n, nb, block) - zz) * s_.reshape(n, nb, 1)).reshape(n, kp)

            info = {"err_rtn": output_error(w, deq(rq, rs, rz), hess), "err": output_error(w, deq(q, s, z), hess)}
        else:
            q, s, z, info = search(w, imp, block=block, symmetric=z_init is None, bits=bits, rtn=(rq, rs, rz))
        b_init.CopyFrom(numpy_helper.from_array(pack(q, bits, block).reshape(numpy_helper.to_array(b_init).shape), b_init.name))
        s_init.CopyFrom(numpy_helper.from_array(s.astype(np.float32).reshape(numpy_helper.to_array(s_init).shape), s_init.name))
        if z_init is not None:
            z_init.CopyFrom(numpy_helper.from_array(_pack_zero_points(z, bits).reshape(numpy_helper.to_array(z_init).shape),
                                                    z_init.name))
        self.done.append({"node": node_name, "module": mod, **info})
        return True

    def summary(self) -> dict[str, Any]:
        rtn = sum(d["err_rtn"] or 0.0 for d in self.done)
        err = sum(d["err"] for d in self.done)
        out = {"nodes": len(self.done), "skipped": self.skipped,
               "weighted_error_vs_rtn": round(err / rtn, 4) if rtn else None}
        if self.hessians is not None:  # GPTQ: the outputs' error tr(dW H dW^T), summed over the nodes, vs RTN's
            out = {"nodes": len(self.done), "skipped": self.skipped, "method": "gptq", "output_error_vs_rtn": out.pop("weighted_error_vs_rtn"),
                   "correlations": getattr(self.hessians, "record", None) or {"kept": "memory"}}
        return out
