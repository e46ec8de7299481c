"""K-quant dequantizers (Q2_K..Q6_K), vectorized numpy over super-blocks: no numba, so the quantize
pipeline and the engine can use them without a compiler. Element e of a super-block is computed with C's
float32 products in dequantize_row_q*_K's order (layouts in kblocks_min.py, kblocks_signed.py).

DEQUANTIZE[name](blocks uint8 [nb, type_size]) -> float32 [nb, 256].
"""

from __future__ import annotations

import numpy as np

from ..gguf.types import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][0]

_E = np.arange(QK_K)
_Q2_BYTE = 32 * (_E // 128) + _E % 32  # Q2_K/Q3_K qs: byte and shift of element e
_Q2_SHIFT = 2 * ((_E // 32) % 4)
_Q4_BYTE = 32 * (_E // 64) + _E % 32  # Q4_K/Q5_K qs: nibble of element e
_Q4_SHIFT = 4 * ((_E // 32) % 2)
_Q6_LBYTE = 64 * (_E // 128) + 32 * ((_E // 32) % 2) + _E % 32  # Q6_K ql nibble, qh 2-bit field
_Q6_LSHIFT = 4 * ((_E // 64) % 2)
_Q6_HBYTE = 32 * (_E // 128) + _E % 32
_Q6_HSHIFT = 2 * ((_E // 32) % 4)


DEQUANTIZE: dict = {}  # name -> function, filled by @_dequantizes


def _dequantizes(name: str):
    def put(fn):
        DEQUANTIZE[name] = fn
        return fn

    return put


def _f16(blocks, off):
    return blocks[:, off : off + 2].copy().view(np.float16).astype(np.float32)  # [nb, 1], exact


def _per_sub(v, n):
    """[nb, QK_K/n] per-sub-block values -> [nb, QK_K]."""
    return np.repeat(v, n, axis=1)


@_dequantizes("Q2_K")
def _dequantize_q2_k(blocks):
    sc = blocks[:, :16]
    dl = _f16(blocks, 80) * (sc & 0xF).astype(np.float32)
    ml = _f16(blocks, 82) * (sc >> 4).astype(np.float32)
    q = (blocks[:, 16 + _Q2_BYTE] >> _Q2_SHIFT) & 3
    return _per_sub(dl, 16) * q.astype(np.float32) - _per_sub(ml, 16)


@_dequantizes("Q3_K")
def _dequantize_q3_k(blocks):
    s = blocks[:, 96:108].astype(np.int32)
    j = np.arange(16)
    lo = np.where(j < 8, s[:, j % 8] & 0xF, s[:, j % 8] >> 4)
    sc = (lo | (((s[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
    dl = _f16(blocks, 108) * sc.astype(np.float32)
    q = ((blocks[:, 32 + _Q2_BYTE] >> _Q2_SHIFT) & 3).astype(np.int32)
    high = (blocks[:, _E % 32] >> (_E // 32)) & 1
    return _per_sub(dl, 16) * (q - 4 * (1 - high)).astype(np.float32)


def _scales_k4(blocks):
    q = blocks[:, 4:16].astype(np.int32)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


@_dequantizes("Q4_K")
def _dequantize_q4_k(blocks):
    sc, m = _scales_k4(blocks)
    d1 = _f16(blocks, 0) * sc
    m1 = _f16(blocks, 2) * m
    q = (blocks[:, 16 + _Q4_BYTE] >> _Q4_SHIFT) & 0xF
    return _per_sub(d1, 32) * q.astype(np.float32) - _per_sub(m1, 32)


@_dequantizes("Q5_K")
def _dequantize_q5_k(blocks):
    sc, m = _scales_k4(blocks)
    d1 = _f16(blocks, 0) * sc
    m1 = _f16(blocks, 2) * m
    q = ((blocks[:, 48 + _Q4_BYTE] >> _Q4_SHIFT) & 0xF) | (((blocks[:, 16 + _E % 32] >> (_E // 32)) & 1) << 4)
    return _per_sub(d1, 32) * q.astype(np.float32) - _per_sub(m1, 32)


@_dequantizes("Q6_K")
def _dequantize_q6_k(blocks):
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    q = ((blocks[:, _Q6_LBYTE] >> _Q6_LSHIFT) & 0xF) | (((blocks[:, 128 + _Q6_HBYTE] >> _Q6_HSHIFT) & 3) << 4)
    return _per_sub(_f16(blocks, 208) * sc, 16) * (q.astype(np.int32) - 32).astype(np.float32)
