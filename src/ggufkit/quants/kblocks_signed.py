"""The K-quant super-blocks with signed levels and a signed scale per sub-block, no min (x ~ d*sc*l): Q3_K
and Q6_K, byte-identical to libggml; the sub-block searches are make_qx_quants (Q6_K, the Q3_K impl path)
and make_q3_quants run in lockstep (lockstep.make_q3_lockstep, the Q3_K ref path). Conventions and quirks:
kblocks.py.
"""

from __future__ import annotations

import numpy as np

from .kblocks import QK_K, _impl_weights, _inline, _kernel, _put_f16, _sum_sq
from .lockstep import make_q3_lockstep
from .search import F32, GROUP_MAX_EPS, f16_bits_to_f32, f32_to_f16_bits, make_qx_quants, nearest_int


@_kernel
def _q3k_scale(j, q):
    """Signed 6-bit sub-scale j (-32..31) from Q3_K's 12 packed scale bytes q."""
    lo = (np.int64(q[j]) & 0xF) if j < 8 else (np.int64(q[j - 8]) >> 4)
    return (lo | (((np.int64(q[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@_inline
def _q6k_block(x, qw, y, L, work, scales):
    """Q6_K (210 bytes: ql[128], qh[64], int8 scales[16], d): 16 sub-blocks of 16, levels -32..31 + 32."""
    nsub = QK_K // 16
    max_scale = F32(0.0)
    max_abs = F32(0.0)
    for j in range(nsub):
        # ref: w = x*x (qw empty); impl: the raw importance as weights (no sigma2 term)
        qws = qw[16 * j : 16 * j + 16] if qw.shape[0] else qw
        s = make_qx_quants(x[16 * j : 16 * j + 16], np.int64(32), L[16 * j : 16 * j + 16], qws, work)
        scales[j] = s
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < GROUP_MAX_EPS:
        y[:] = 0
        return
    iscale = F32(-128.0) / max_scale
    dbits = f32_to_f16_bits(F32(1.0) / iscale)
    d_all = f16_bits_to_f32(dbits)
    for j in range(nsub):
        sc = min(127, nearest_int(iscale * scales[j])) & 0xFF  # stored as int8
        y[192 + j] = sc
        d = d_all * F32(sc - 256 if sc > 127 else sc)
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    _put_f16(y, np.int64(208), dbits)
    for h in range(QK_K // 128):  # per 128-half: ql 64 bytes (two nibble planes), qh 32 bytes (2 bits x4)
        for l in range(32):
            b = 128 * h + l
            y[64 * h + l] = (L[b] & 0xF) | ((L[b + 64] & 0xF) << 4)
            y[64 * h + l + 32] = (L[b + 32] & 0xF) | ((L[b + 96] & 0xF) << 4)
            y[128 + 32 * h + l] = (
                (L[b] >> 4) | ((L[b + 32] >> 4) << 2) | ((L[b + 64] >> 4) << 4) | ((L[b + 96] >> 4) << 6)
            )


@_inline
def _q3k_block(x, qw, y, L, w, work, scales, sw, Ls, sc):
    """Q3_K (110 bytes: hmask[32], qs[64], scales[12], d): 16 sub-blocks of 16, signed 6-bit scales,
    levels -4..3 + 4 (bit 2 in hmask, bits 0-1 in qs)."""
    nsub = QK_K // 16
    q = y[96:108]
    q[:] = 0
    pack = True
    if qw.shape[0] == 0:  # quantize_row_q3_K_ref: make_q3_quants(16, 4, x, L, true) per sub-block
        xt_f, lf_f, lt_f, st, _ = sc
        xt = xt_f.reshape((16, nsub))
        lt = lt_f.reshape((16, nsub))
        for j in range(nsub):
            for i in range(16):
                xt[i, j] = x[16 * j + i]
        make_q3_lockstep(xt, np.int64(4), lt, scales[:nsub], st, lf_f.reshape((16, nsub)))
        for j in range(nsub):
            for i in range(16):
                L[16 * j + i] = lt[i, j]
        max_scale = F32(0.0)
        amax = F32(0.0)
        for j in range(nsub):
            s = scales[j]
            if abs(s) > amax:
                amax = abs(s)
                max_scale = s
        if max_scale != 0:
            iscale = F32(-32.0) / max_scale
            for j in range(nsub):
                l = nearest_int(iscale * scales[j]) & 0xFF  # int8_t l = nearest_int(...)
                l = l - 256 if l > 127 else l
                Ls[j] = max(-32, min(31, l)) + 32
            dbits = f32_to_f16_bits(F32(1.0) / iscale)
        else:  # the scale bytes stay zero
            dbits = 0
            pack = False
    else:  # quantize_row_q3_K_impl
        sigma2 = F32(2.0) * _sum_sq(x, np.int64(0), np.int64(QK_K)) / F32(QK_K)
        for j in range(nsub):
            sw[j] = _impl_weights(x, qw, 16 * j, np.int64(16), sigma2, w)
            scales[j] = make_qx_quants(
                x[16 * j : 16 * j + 16], np.int64(4), L[16 * j : 16 * j + 16], w[:16], work
            )
        dbits = f32_to_f16_bits(make_qx_quants(scales[:nsub], np.int64(32), Ls, sw[:nsub], work))
    if pack:  # low nibble of scale j in byte j%8 (j<8: low, else high nibble), top 2 bits in byte 8+j%4
        for j in range(nsub):
            l = np.int64(Ls[j])
            if j < 8:
                q[j] = l & 0xF
            else:
                q[j - 8] |= (l & 0xF) << 4
            q[8 + j % 4] |= (l >> 4) << (2 * (j // 4))
    d_all = f16_bits_to_f32(dbits)
    for j in range(nsub):
        d = d_all * F32(_q3k_scale(j, q))
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for l in range(32):  # hmask: bit k of byte l = bit 2 of L[32k+l] (L > 3); qs: the low 2 bits
        hm = 0
        for k in range(QK_K // 32):
            hm |= (np.int64(L[32 * k + l]) >> 2) << k
        y[l] = hm
    for h in range(QK_K // 128):
        for l in range(32):
            b = 128 * h + l
            y[32 + 32 * h + l] = (
                (L[b] & 3) | ((L[b + 32] & 3) << 2) | ((L[b + 64] & 3) << 4) | ((L[b + 96] & 3) << 6)
            )
    _put_f16(y, np.int64(108), dbits)
