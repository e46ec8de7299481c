"""The K-quant super-blocks with a scale and a min per sub-block (x ~ d*sc*l - dmin*m): Q2_K, Q4_K and Q5_K,
byte-identical to libggml; the sub-block searches run in lockstep (lockstep.make_qkx_lockstep), the impl
paths' 6-bit (4-bit for Q2_K) scales and mins by make_qp_quants. Conventions and quirks: kblocks.py.
"""

from __future__ import annotations

import numpy as np

from .kblocks import QK_K, _impl_weights, _inline, _kernel, _pack_2bit, _put_f16, _sum_sq
from .lockstep import make_qkx_lockstep
from .search import F32, f16_bits_to_f32, f32_to_f16_bits, make_qp_quants, nearest_int


@_kernel
def _scale_min_k4(j, q):
    """(sc, m) of sub-block j from the 12 packed scale bytes q of Q4_K/Q5_K (get_scale_min_k4)."""
    if j < 4:
        return np.int64(q[j]) & 63, np.int64(q[j + 4]) & 63
    sc = (np.int64(q[j + 4]) & 0xF) | ((np.int64(q[j - 4]) >> 6) << 4)
    m = (np.int64(q[j + 4]) >> 4) | ((np.int64(q[j]) >> 6) << 4)
    return sc, m


@_inline
def _max_scale_min(scales, mins, nsub):
    """The largest sub-block scale and min, from 0 (C's max_scale/max_min loop)."""
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(nsub):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    return max_scale, max_min


@_kernel
def _search_subblocks(x, wfull, sub, nmax, rmin, rdelta, nstep, use_mad, strict, L, scales, mins, sc):
    """The 256/sub make_qkx searches of one super-block (sub-blocks of `sub` elements, weights wfull in
    block order) in lockstep (lockstep.make_qkx_lockstep): columns of a [sub, 256/sub] transpose; the levels
    go back into L in block order, scale/the_min into scales/mins. sc: the scratch arrays."""
    xt_f, wt_f, lt_f, st, lev_f = sc
    nsub = QK_K // sub
    xt = xt_f.reshape((sub, nsub))
    wt = wt_f.reshape((sub, nsub))
    lt = lt_f.reshape((sub, nsub))
    for j in range(nsub):
        for i in range(sub):
            xt[i, j] = x[sub * j + i]
            wt[i, j] = wfull[sub * j + i]
    make_qkx_lockstep(
        xt,
        wt,
        nmax,
        rmin,
        rdelta,
        nstep,
        use_mad,
        strict,
        lt,
        scales[:nsub],
        mins[:nsub],
        st,
        lev_f.reshape((sub, nsub)),
    )
    for j in range(nsub):
        for i in range(sub):
            L[sub * j + i] = lt[i, j]


@_inline
def _search_impl(x, w, sub, nmax, L, scales, mins, sc):
    """The importance-weighted (_impl) paths' sub-block searches: make_qkx3_quants(sub, nmax, x, w, -0.9,
    0.05, 36), neither the MAD error nor the strict degenerate-group rule."""
    _search_subblocks(
        x, w, sub, nmax, -0.9, 0.05, np.int64(36), np.bool_(False), np.bool_(False), L, scales, mins, sc
    )


@_inline
def _q45k_block(x, qw, is_q5, y, L, w, sc, scales, mins, sw, Ls, Lm):
    """Q4_K (144 bytes: d, dmin, scales[12], qs[128]) or Q5_K (176: d, dmin, scales[12], qh[32], qs[128]).
    8 sub-blocks of 32, 6-bit scale and min each, levels 0..15 / 0..31. w: f32[256] scratch."""
    nsub = QK_K // 32
    nmax = np.int64(31 if is_q5 else 15)
    if qw.shape[0] == 0:  # quantize_row_q{4,5}_K_ref: make_qkx2_quants(32, nmax, x, av_x + |x|, ...)
        for j in range(nsub):
            av_x = np.sqrt(_sum_sq(x, 32 * j, np.int64(32)) / F32(32.0))
            for l in range(32):
                w[32 * j + l] = av_x + abs(x[32 * j + l])
        _search_subblocks(
            x,
            w,
            np.int64(32),
            nmax,
            -0.5 if is_q5 else -1.0,
            0.1,
            np.int64(15 if is_q5 else 20),
            np.bool_(False),
            np.bool_(True),
            L,
            scales,
            mins,
            sc,
        )
        max_scale, max_min = _max_scale_min(scales, mins, nsub)
        inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
        inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
        for j in range(nsub):
            Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t ls = ...; MIN(63, ls)
            Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        dbits = f32_to_f16_bits(max_scale / F32(63.0))
        mbits = f32_to_f16_bits(max_min / F32(63.0))
    else:  # quantize_row_q{4,5}_K_impl: make_qkx3_quants(32, nmax, x, qw*sqrt(sigma2 + x^2), -0.9, 0.05, 36)
        sigma2 = F32(2.0) * _sum_sq(x, np.int64(0), np.int64(QK_K)) / F32(QK_K)
        for j in range(nsub):
            sw[j] = _impl_weights(x, qw, 32 * j, np.int64(32), sigma2, w[32 * j : 32 * j + 32])
        _search_impl(x, w, np.int64(32), nmax, L, scales, mins, sc)
        dbits = f32_to_f16_bits(make_qp_quants(scales[:nsub], np.int64(63), Ls, sw[:nsub]))
        mbits = f32_to_f16_bits(make_qp_quants(mins[:nsub], np.int64(63), Lm, sw[:nsub]))
        if is_q5:  # Q5_K clamps here, Q4_K packs the raw uint8
            for j in range(nsub):
                Ls[j] = min(np.uint8(63), Ls[j])
                Lm[j] = min(np.uint8(63), Lm[j])
    _put_f16(y, np.int64(0), dbits)
    _put_f16(y, np.int64(2), mbits)
    q = y[4:16]
    for j in range(nsub):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if j < 4:
            q[j] = ls
            q[j + 4] = lm
        else:
            q[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            q[j - 4] = (np.int64(q[j - 4]) | ((ls >> 4) << 6)) & 0xFF
            q[j] = (np.int64(q[j]) | ((lm >> 4) << 6)) & 0xFF
    d_all = f16_bits_to_f32(dbits)
    m_all = f16_bits_to_f32(mbits)
    for j in range(nsub):
        sc, m = _scale_min_k4(j, q)
        d = d_all * F32(sc)
        if d == 0:
            continue
        dm = m_all * F32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))
    if is_q5:  # qh @16: bit j of byte l = bit 4 of L[32j+l]; ql @48: nibbles as Q4_K's qs
        for l in range(32):
            h = 0
            for j in range(nsub):
                h |= (np.int64(L[32 * j + l]) >> 4) << j
            y[16 + l] = h
        off = 48
    else:
        off = 16
    for c in range(QK_K // 64):  # byte 32c+l = L[64c+l] & 15 | (L[64c+32+l] & 15) << 4
        for l in range(32):
            y[off + 32 * c + l] = (L[64 * c + l] & 0xF) | ((L[64 * c + 32 + l] & 0xF) << 4)


@_inline
def _q2k_block(x, qw, y, L, w, sc, scales, mins, sw, Ls, Lm):
    """Q2_K (84 bytes: scales[16] (scale | min << 4), qs[64], d, dmin): 16 sub-blocks of 16, levels 0..3.
    w: f32[256] scratch."""
    nsub = QK_K // 16
    if qw.shape[0] == 0:  # quantize_row_q2_K_ref: make_qkx2_quants(16, 3, x, |x|, -0.5, 0.1, 15, mad)
        for i in range(QK_K):
            w[i] = abs(x[i])
        _search_subblocks(
            x,
            w,
            np.int64(16),
            np.int64(3),
            -0.5,
            0.1,
            np.int64(15),
            np.bool_(True),
            np.bool_(True),
            L,
            scales,
            mins,
            sc,
        )
        max_scale, max_min = _max_scale_min(scales, mins, nsub)
        dbits = 0
        mbits = 0
        for j in range(nsub):
            y[j] = 0
        if max_scale > 0:
            iscale = F32(15.0) / max_scale
            for j in range(nsub):
                y[j] = nearest_int(iscale * scales[j]) & 0xFF
            dbits = f32_to_f16_bits(max_scale / F32(15.0))
        if max_min > 0:
            iscale = F32(15.0) / max_min
            for j in range(nsub):
                y[j] = (np.int64(y[j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
            mbits = f32_to_f16_bits(max_min / F32(15.0))
    else:  # quantize_row_q2_K_impl: make_qkx3_quants(16, 3, x, qw*sqrt(sigma2 + x^2), -0.9, 0.05, 36)
        sigma2 = _sum_sq(x, np.int64(0), np.int64(QK_K)) / F32(QK_K)
        for j in range(nsub):
            sw[j] = _impl_weights(x, qw, 16 * j, np.int64(16), sigma2, w[16 * j : 16 * j + 16])
        _search_impl(x, w, np.int64(16), np.int64(3), L, scales, mins, sc)
        dbits = f32_to_f16_bits(make_qp_quants(scales[:nsub], np.int64(15), Ls, sw[:nsub]))
        mbits = f32_to_f16_bits(make_qp_quants(mins[:nsub], np.int64(15), Lm, sw[:nsub]))
        for j in range(nsub):
            y[j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    d_all = f16_bits_to_f32(dbits)
    m_all = f16_bits_to_f32(mbits)
    for j in range(nsub):
        d = d_all * F32(y[j] & 0xF)
        if d == 0:
            continue
        dm = m_all * F32(y[j] >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + dm) / d)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, y, np.int64(16))
    _put_f16(y, np.int64(80), dbits)
    _put_f16(y, np.int64(82), mbits)
