"""One K-quant super-block, byte-identical to libggml (kquants.py runs them): the conventions, the quirks and
the pieces the five types share. The blocks themselves: kblocks_min.py (a scale and a min per sub-block:
Q2_K, Q4_K, Q5_K) and kblocks_signed.py (signed levels, no min: Q3_K, Q6_K).

Each function takes one super-block x of QK_K = 256 float32 weights and writes its bytes y; without
importance weights it follows the type's quantize_row_*_ref in ggml-quants.c, with them (qw: the 256
weights of the block's columns) quantize_row_*_impl; the other arguments are scratch owned by the caller.

Quirks kept on purpose:
  - super-scales d/dmin are stored as IEEE fp16 (round-to-nearest-even) and requantization uses the
    fp16-rounded value times the integer sub-scale, dividing: l = nearest_int((x + dm)/d);
  - sub-blocks whose requantization scale is 0 keep the levels the search produced;
  - integer sub-scales are stored through C's uint8/int8 conversions (wrap mod 256), including Q4_K's
    impl path that does not clamp to 63 before packing, and Q2_K's nibble OR that truncates;
  - sigma2: Q2_K impl sum(x^2)/256, Q3_K/Q4_K/Q5_K impl 2*sum(x^2)/256, Q6_K impl uses the raw weights.

Non-finite input is not rejected here (the file quantizer does that), and nothing raises on it: NaN and
inf flow through the same float32 arithmetic as in C, and every level is rounded by C's nearest_int (its
bit trick for NaN, inf and |v| > 2**22, which also decides levels of finite spikes far from a fitted min,
and of sub-blocks whose max - min is subnormal). Tested byte-equal to libggml with numpy's default NaN;
a NaN with another payload could round differently (C's trick reads the payload).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .registry import FORMATS
from .search import F32

QK_K = FORMATS["Q4_K"].block_size
_kernel = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


@_kernel
def _put_f16(y, off, bits):
    y[off] = bits & 0xFF
    y[off + 1] = bits >> 8


@_kernel
def _pack_2bit(L, y, off):
    """qs of Q2_K/Q3_K: byte 32h+l holds L[128h+32k+l] in bits 2k..2k+1."""
    for h in range(QK_K // 128):
        for l in range(32):
            b = 128 * h + l
            y[off + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@_kernel
def _sum_sq(x, start, n):
    s = F32(0.0)
    for i in range(start, start + n):
        s += x[i] * x[i]
    return s


@_kernel
def _impl_weights(x, qw, start, n, sigma2, w):
    """w = qw * sqrt(sigma2 + x^2) for x[start:start+n] (the imatrix paths); returns sum(w) in order."""
    sumw = F32(0.0)
    for l in range(n):
        xv = x[start + l]
        w[l] = qw[start + l] * np.sqrt(sigma2 + xv * xv)
        sumw += w[l]
    return sumw
