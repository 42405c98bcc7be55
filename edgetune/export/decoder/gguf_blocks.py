"""GGUF quantized blocks -> :class:`~edgetune.export.decoder.blockform.BlockForm`, exactly (no re-quantization).

Each supported GGML type is unpacked into unsigned integers ``q``, a scale and (where the type has
a min) an offset per block, so that ``scale * (q - 2**(bits-1)) + offset`` is gguf's own dequantized
value (``gguf.quants.dequantize``) within fp32 rounding (the offsets fold ``8*d`` or a shift in):

=========  ===========================  ====  =====  ==========================================
GGUF type  GGUF formula                 bits  block  stored
=========  ===========================  ====  =====  ==========================================
Q4_0       d*(q-8)                      4     32     q, scale d (fp16)
Q4_1       d*q + m                      4     32     q, scale d (fp16), offset m+8d (correction)
Q4_K       d*sc*q - dmin*mn (sub 32)    4     32     q, scale d*sc, offset 8*d*sc - dmin*mn
Q5_0       d*(q-16)                     8     32     q+112, scale d (fp16)
Q5_1       d*q + m                      8     32     q+128, scale d, offset m (fp16, correction)
Q5_K       d*sc*q - dmin*mn (sub 32)    8     32     q+128, scale d*sc, offset -dmin*mn
Q6_K       d*sc*(q-32) (sub 16)         8     16     q+96, scale d*sc
Q8_0       d*q (q int8)                 8     32     q+128, scale d (fp16)
=========  ===========================  ====  =====  ==========================================

F32/F16/BF16 stay float. Every other type (Q2_K, Q3_K, IQ*, TQ*, MXFP4, ...) is refused by name:
it has no exact MatMulNBits form here and is never silently re-quantized.

The unpacking follows the block layouts of gguf-py's ``gguf/quants.py`` (the reference
dequantizers); the export checks every tensor against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np

from .blockform import BlockForm

QK_K = 256
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
SUPPORTED = QUANT_TYPES + FLOAT_TYPES


class UnsupportedType(ValueError):
    pass


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-element 4-bit layout: byte j holds element j (low nibble) and element j+16 (high nibble)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def to_blockform(raw: np.ndarray, type_name: str, n: int, k: int) -> BlockForm:
    """``raw``: the tensor's bytes as uint8 [N, bytes per row] (GGUF row = one output feature)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1)
    if type_name == "Q4_0":
        b = raw.reshape(-1, 18)
        d, qs = _f16(b[:, :2]), b[:, 2:]
        q = _nibbles(qs)
        return BlockForm(q.reshape(n, k), d.reshape(n, -1), None, 4, 32)
    if type_name == "Q4_1":
        b = raw.reshape(-1, 20)
        d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
        q = _nibbles(qs)
        return BlockForm(q.reshape(n, k), d.reshape(n, -1), (m + np.float32(8) * d).reshape(n, -1), 4, 32)
    if type_name in ("Q5_0", "Q5_1"):
        size = 22 if type_name == "Q5_0" else 24
        b = raw.reshape(-1, size)
        d = _f16(b[:, :2])
        m = _f16(b[:, 2:4]) if type_name == "Q5_1" else None
        qh, qs = b[:, size - 20:size - 16], b[:, size - 16:]
        bits_h = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")  # [nb, 32], element i = bit i
        q = _nibbles(qs) | (bits_h << np.uint8(4))
        if type_name == "Q5_0":  # d*(q-16) = d*((q+112) - 128)
            return BlockForm((q + np.uint8(112)).reshape(n, k), d.reshape(n, -1), None, 8, 32)
        return BlockForm((q + np.uint8(128)).reshape(n, k), d.reshape(n, -1), m.reshape(n, -1), 8, 32)
    if type_name == "Q8_0":
        b = raw.reshape(-1, 34)
        d = _f16(b[:, :2])
        q = (np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockForm(q.reshape(n, k), d.reshape(n, -1), None, 8, 32)
    if type_name in ("Q4_K", "Q5_K"):
        size = 144 if type_name == "Q4_K" else 176
        b = raw.reshape(-1, size)
        nb = b.shape[0]
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _scale_min_k4(b[:, 4:16])
        ds = d * sc  # [nb, 8] exact in fp32 (11-bit x 6-bit mantissas)
        dm = dmin * mn
        if type_name == "Q4_K":
            qs = b[:, 16:].reshape(nb, 4, 32)  # 4 chunks of 32 bytes: low nibbles = sub-block 2c, high = 2c+1
            q = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2).reshape(nb, QK_K)
            return BlockForm(q.reshape(n, k), ds.reshape(n, -1), (np.float32(8) * ds - dm).reshape(n, -1), 4, 32)
        qh = b[:, 16:48]  # [nb, 32]: bit j of byte i -> element i of sub-block j
        qs = b[:, 48:].reshape(nb, 4, 32)
        ql = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2).reshape(nb, 8, 32)
        hbits = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1))  # [nb, 8, 32]
        q = (ql | (hbits << np.uint8(4))).reshape(nb, QK_K)
        return BlockForm((q + np.uint8(128)).reshape(n, k), ds.reshape(n, -1), (-dm).reshape(n, -1), 8, 32)
    if type_name == "Q6_K":
        b = raw.reshape(-1, 210)
        nb = b.shape[0]
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        sc = np.ascontiguousarray(scales).view(np.int8).astype(np.float32)  # [nb, 16]
        lo = ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        lo = (lo & np.uint8(0x0F)).reshape(nb, 8, 32)
        hi = qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        hi = (hi & np.uint8(0x03)).reshape(nb, 8, 32)
        q = (lo | (hi << np.uint8(4))).reshape(nb, QK_K)  # d*sc*(q-32) = d*sc*((q+96) - 128)
        return BlockForm((q + np.uint8(96)).reshape(n, k), (d * sc).reshape(n, -1), None, 8, 16)
    raise UnsupportedType(type_name)
