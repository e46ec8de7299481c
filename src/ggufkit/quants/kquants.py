"""K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: quantize and dequantize, byte-identical to libggml.

A super-block is QK_K = 256 weights. Without importance weights each follows the type's
quantize_row_*_ref in ggml-quants.c; with them, quantize_row_*_impl (the imatrix algorithm). Both are
per super-block (the impl paths' sigma2 is taken over the super-block, and importance[k] weights column
k of every row), so the kernels run one prange over all super-blocks of the tensor.

Quirks kept on purpose (see the facts digest §2.0/§2.3):
  - super-scales d/dmin are stored as IEEE fp16 (round-to-nearest-even) and requantization uses the
    fp16-rounded value times the integer sub-scale, dividing: l = nearest_int((x + dm)/d);
  - sub-blocks whose requantization scale is 0 keep the levels the search produced;
  - integer sub-scales are stored through C's uint8/int8 conversions (wrap mod 256), including Q4_K's
    impl path that does not clamp to 63 before packing, and Q2_K's nibble OR that truncates;
  - sigma2: Q2_K impl sum(x^2)/256, Q3_K/Q4_K/Q5_K impl 2*sum(x^2)/256, Q6_K impl uses the raw weights.

Non-finite input is not rejected here (the file quantizer does that). It never raises or crashes: NaN
and inf flow through the same float32 arithmetic, and levels are clamped in float before any integer
conversion; the bytes then need not match libggml's (C's nearest_int of a non-finite value is a bit
trick whose result the clamps here do not reproduce in every case).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from .registry import register
from .search import (
    F32,
    GROUP_MAX_EPS,
    MAX_LANES,
    f16_bits_to_f32,
    f32_to_f16_bits,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
)

QK_K = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][0]
_SIZE = {
    name: GGML_QUANT_SIZES[GGMLQuantizationType[name]][1] for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
}
_CHUNK = 16  # super-blocks per parallel work item (scratch is allocated once per item)


# ---------------------------------------------------------------------------------------------------
# small shared pieces


@njit(cache=True, error_model="numpy")
def _put_f16(y, off, bits):
    y[off] = bits & 0xFF
    y[off + 1] = bits >> 8


@njit(cache=True, error_model="numpy")
def _get_f16(y, off):
    return f16_bits_to_f32(np.int64(y[off]) | (np.int64(y[off + 1]) << 8))


@njit(cache=True, error_model="numpy")
def _i8(b):
    """A stored byte read as C int8_t, as float32."""
    v = np.int64(b)
    return F32(v - 256 if v > 127 else v)


@njit(cache=True, error_model="numpy")
def _scale_min_k4(j, q):
    """(sc, m) of sub-block j from the 12 packed scale bytes q of Q4_K/Q5_K (get_scale_min_k4)."""
    if j < 4:
        return np.int64(q[j]) & 63, np.int64(q[j + 4]) & 63
    sc = (np.int64(q[j + 4]) & 0xF) | ((np.int64(q[j - 4]) >> 6) << 4)
    m = (np.int64(q[j + 4]) >> 4) | ((np.int64(q[j]) >> 6) << 4)
    return sc, m


@njit(cache=True, error_model="numpy")
def _q3k_scale(j, q):
    """Signed 6-bit sub-scale j (-32..31) from Q3_K's 12 packed scale bytes q."""
    lo = (np.int64(q[j]) & 0xF) if j < 8 else (np.int64(q[j - 8]) >> 4)
    return (lo | (((np.int64(q[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(cache=True, error_model="numpy")
def _pack_2bit(L, y, off):
    """qs for Q2_K/Q3_K: byte 32h+l holds L[128h+l+32k] in bits 2k..2k+1."""
    for h in range(QK_K // 128):
        for l in range(32):
            b = 128 * h + l
            y[off + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@njit(cache=True, error_model="numpy")
def _sum_sq(x, start, n):
    s = F32(0.0)
    for i in range(start, start + n):
        s += x[i] * x[i]
    return s


# ---------------------------------------------------------------------------------------------------
# Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales and mins, fp16 d and dmin


@njit(cache=True, error_model="numpy")
def _q45k_block(x, qw, nmax, rmin, nstep, clamp63_impl, y, L, w, work, scales, mins, sw, Ls, Lm):
    """Scales/mins/d/dmin into y[0:16] and levels (0..nmax) into L for one super-block."""
    nsub = QK_K // 32
    if qw.shape[0] == 0:  # quantize_row_q{4,5}_K_ref
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(nsub):
            av_x = np.sqrt(_sum_sq(x, 32 * j, 32) / F32(32.0))
            for l in range(32):
                w[l] = av_x + abs(x[32 * j + l])
            sc, mn = make_qkx2_quants(
                x[32 * j : 32 * j + 32], w, nmax, L[32 * j : 32 * j + 32], rmin, 0.1, nstep, False, work
            )
            scales[j] = sc
            mins[j] = mn
            if sc > max_scale:
                max_scale = sc
            if mn > max_min:
                max_min = mn
        inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
        inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
        for j in range(nsub):
            Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t ls = ...; MIN(63, ls)
            Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        dbits = f32_to_f16_bits(max_scale / F32(63.0))
        mbits = f32_to_f16_bits(max_min / F32(63.0))
    else:  # quantize_row_q{4,5}_K_impl
        sigma2 = F32(2.0) * _sum_sq(x, 0, QK_K) / F32(QK_K)
        for j in range(nsub):
            sumw = F32(0.0)
            for l in range(32):
                xv = x[32 * j + l]
                w[l] = qw[32 * j + l] * np.sqrt(sigma2 + xv * xv)
                sumw += w[l]
            sw[j] = sumw
            sc, mn = make_qkx3_quants(
                x[32 * j : 32 * j + 32], w, nmax, L[32 * j : 32 * j + 32], -0.9, 0.05, 36, False, work
            )
            scales[j] = sc
            mins[j] = mn
        dbits = f32_to_f16_bits(make_qp_quants(scales, 63, Ls, sw))
        mbits = f32_to_f16_bits(make_qp_quants(mins, 63, Lm, sw))
        if clamp63_impl:  # Q5_K clamps here, Q4_K packs the raw uint8
            for j in range(nsub):
                Ls[j] = min(np.uint8(63), Ls[j])
                Lm[j] = min(np.uint8(63), Lm[j])
    _put_f16(y, 0, dbits)
    _put_f16(y, 2, mbits)
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


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q4_k(xb, qw, out):
    nb = xb.shape[0]
    nbr = qw.shape[0]
    for ch in prange((nb + _CHUNK - 1) // _CHUNK):
        work = np.empty((8, MAX_LANES), np.float32)
        L = np.empty(QK_K, np.uint8)
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        noq = np.empty(0, np.float32)
        for b in range(ch * _CHUNK, min(nb, (ch + 1) * _CHUNK)):
            y = out[b]
            q = qw[b % nbr] if nbr > 0 else noq
            _q45k_block(xb[b], q, 15, -1.0, 20, False, y, L, w, work, scales, mins, sw, Ls, Lm)
            for c in range(QK_K // 64):  # qs @16: byte 32c+l = L[64c+l] | L[64c+32+l] << 4
                for l in range(32):
                    y[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q5_k(xb, qw, out):
    nb = xb.shape[0]
    nbr = qw.shape[0]
    for ch in prange((nb + _CHUNK - 1) // _CHUNK):
        work = np.empty((8, MAX_LANES), np.float32)
        L = np.empty(QK_K, np.uint8)
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        noq = np.empty(0, np.float32)
        for b in range(ch * _CHUNK, min(nb, (ch + 1) * _CHUNK)):
            y = out[b]
            q = qw[b % nbr] if nbr > 0 else noq
            _q45k_block(xb[b], q, 31, -0.5, 15, True, y, L, w, work, scales, mins, sw, Ls, Lm)
            # qh[32] @16: bit 2c / 2c+1 = bit 4 of L[64c+l] / L[64c+32+l]; ql[128] @48 like Q4_K's qs
            for l in range(32):
                y[16 + l] = 0
            for c in range(QK_K // 64):
                for l in range(32):
                    l1 = L[64 * c + l]
                    l2 = L[64 * c + 32 + l]
                    y[16 + l] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1))
                    y[48 + 32 * c + l] = (l1 & 0xF) | ((l2 & 0xF) << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q4_k(data, out):
    for b in prange(data.shape[0]):
        y = data[b]
        o = out[b]
        d = _get_f16(y, 0)
        dmin = _get_f16(y, 2)
        q = y[4:16]
        for c in range(QK_K // 64):
            sc, m = _scale_min_k4(2 * c, q)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _scale_min_k4(2 * c + 1, q)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            for l in range(32):
                v = y[16 + 32 * c + l]
                o[64 * c + l] = d1 * F32(v & 0xF) - m1
                o[64 * c + 32 + l] = d2 * F32(v >> 4) - m2


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q5_k(data, out):
    for b in prange(data.shape[0]):
        y = data[b]
        o = out[b]
        d = _get_f16(y, 0)
        dmin = _get_f16(y, 2)
        q = y[4:16]
        for c in range(QK_K // 64):
            sc, m = _scale_min_k4(2 * c, q)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _scale_min_k4(2 * c + 1, q)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            for l in range(32):
                v = np.int64(y[48 + 32 * c + l])
                h = np.int64(y[16 + l])
                o[64 * c + l] = d1 * F32((v & 0xF) + (16 if h & (1 << (2 * c)) else 0)) - m1
                o[64 * c + 32 + l] = d2 * F32((v >> 4) + (16 if h & (2 << (2 * c)) else 0)) - m2


# ---------------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16, int8 scales, one fp16 d; levels -32..31 stored +32


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q6_k(xb, qw, out):
    nb = xb.shape[0]
    nbr = qw.shape[0]
    nsub = QK_K // 16
    for ch in prange((nb + _CHUNK - 1) // _CHUNK):
        work = np.empty((8, MAX_LANES), np.float32)
        L = np.empty(QK_K, np.uint8)
        scales = np.empty(nsub, np.float32)
        noq = np.empty(0, np.float32)
        for b in range(ch * _CHUNK, min(nb, (ch + 1) * _CHUNK)):
            x = xb[b]
            y = out[b]
            max_scale = F32(0.0)
            max_abs = F32(0.0)
            for j in range(nsub):
                if nbr > 0:  # quantize_row_q6_K_impl: the raw importance as weights
                    s = make_qx_quants(
                        x[16 * j : 16 * j + 16],
                        32,
                        L[16 * j : 16 * j + 16],
                        qw[b % nbr, 16 * j : 16 * j + 16],
                        work,
                    )
                else:  # ref: w = x*x
                    s = make_qx_quants(x[16 * j : 16 * j + 16], 32, L[16 * j : 16 * j + 16], noq, work)
                scales[j] = s
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < GROUP_MAX_EPS:
                y[:] = 0
                continue
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
            _put_f16(y, 208, dbits)
            # ql[128] @0, qh[64] @128: per 128-half h, 4 quarter-rows of 32
            for h in range(QK_K // 128):
                for l in range(32):
                    b0 = 128 * h + l
                    q1 = L[b0]
                    q2 = L[b0 + 32]
                    q3 = L[b0 + 64]
                    q4 = L[b0 + 96]
                    y[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                    y[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                    y[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q6_k(data, out):
    for b in prange(data.shape[0]):
        y = data[b]
        o = out[b]
        d = _get_f16(y, 208)
        for h in range(QK_K // 128):
            for l in range(32):
                s = 192 + 8 * h + l // 16
                lo = np.int64(y[64 * h + l])
                lo2 = np.int64(y[64 * h + l + 32])
                hi = np.int64(y[128 + 32 * h + l])
                q1 = ((lo & 0xF) | ((hi & 3) << 4)) - 32
                q2 = ((lo2 & 0xF) | (((hi >> 2) & 3) << 4)) - 32
                q3 = ((lo >> 4) | (((hi >> 4) & 3) << 4)) - 32
                q4 = ((lo2 >> 4) | (((hi >> 6) & 3) << 4)) - 32
                o[128 * h + l] = d * _i8(y[s]) * F32(q1)
                o[128 * h + l + 32] = d * _i8(y[s + 2]) * F32(q2)
                o[128 * h + l + 64] = d * _i8(y[s + 4]) * F32(q3)
                o[128 * h + l + 96] = d * _i8(y[s + 6]) * F32(q4)


# ---------------------------------------------------------------------------------------------------
# Q3_K: 16 sub-blocks of 16, 6-bit signed scales packed in 12 bytes, one fp16 d; levels -4..3


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q3_k(xb, qw, out):
    nb = xb.shape[0]
    nbr = qw.shape[0]
    nsub = QK_K // 16
    for ch in prange((nb + _CHUNK - 1) // _CHUNK):
        work = np.empty((8, MAX_LANES), np.float32)
        L = np.empty(QK_K, np.uint8)
        scales = np.empty(nsub, np.float32)
        w = np.empty(16, np.float32)
        sw = np.empty(nsub, np.float32)
        Ls = np.empty(nsub, np.uint8)
        for b in range(ch * _CHUNK, min(nb, (ch + 1) * _CHUNK)):
            x = xb[b]
            y = out[b]
            q = y[96:108]
            q[:] = 0
            if nbr == 0:  # quantize_row_q3_K_ref
                max_scale = F32(0.0)
                amax = F32(0.0)
                for j in range(nsub):
                    s = make_q3_quants(x[16 * j : 16 * j + 16], 4, L[16 * j : 16 * j + 16])
                    scales[j] = s
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
                    pack = True
                else:  # scales stay all-zero bytes
                    dbits = 0
                    pack = False
            else:  # quantize_row_q3_K_impl
                qwr = qw[b % nbr]
                sigma2 = F32(2.0) * _sum_sq(x, 0, QK_K) / F32(QK_K)
                for j in range(nsub):
                    sumw = F32(0.0)
                    for l in range(16):
                        xv = x[16 * j + l]
                        w[l] = qwr[16 * j + l] * np.sqrt(sigma2 + xv * xv)
                        sumw += w[l]
                    sw[j] = sumw
                    scales[j] = make_qx_quants(x[16 * j : 16 * j + 16], 4, L[16 * j : 16 * j + 16], w, work)
                dbits = f32_to_f16_bits(make_qx_quants(scales, 32, Ls, sw, work))
                pack = True
            if pack:
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
            # hmask[32] @0: bit j//32 of byte j%32 = bit 2 of L[j]; qs[64] @32: the low 2 bits
            for i in range(32):
                y[i] = 0
            for j in range(QK_K):
                if L[j] > 3:
                    y[j % 32] |= 1 << (j // 32)
                    L[j] -= 4
            _pack_2bit(L, y, 32)
            _put_f16(y, 108, dbits)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q3_k(data, out):
    for b in prange(data.shape[0]):
        y = data[b]
        o = out[b]
        d_all = _get_f16(y, 108)
        q = y[96:108]
        for h in range(QK_K // 128):
            for j in range(4):
                m = 1 << (4 * h + j)
                for half in range(2):
                    s = 8 * h + 2 * j + half
                    dl = d_all * F32(_q3k_scale(s, q))
                    for l in range(16):
                        k = 16 * half + l
                        v = (np.int64(y[32 + 32 * h + k]) >> (2 * j)) & 3
                        v -= 0 if np.int64(y[k]) & m else 4
                        o[128 * h + 32 * j + k] = dl * F32(v)


# ---------------------------------------------------------------------------------------------------
# Q2_K: 16 sub-blocks of 16, 4-bit scale and min per sub-block, fp16 d and dmin; levels 0..3


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q2_k(xb, qw, out):
    nb = xb.shape[0]
    nbr = qw.shape[0]
    nsub = QK_K // 16
    for ch in prange((nb + _CHUNK - 1) // _CHUNK):
        work = np.empty((8, MAX_LANES), np.float32)
        L = np.empty(QK_K, np.uint8)
        scales = np.empty(nsub, np.float32)
        mins = np.empty(nsub, np.float32)
        w = np.empty(16, np.float32)
        sw = np.empty(nsub, np.float32)
        Ls = np.empty(nsub, np.uint8)
        Lm = np.empty(nsub, np.uint8)
        for b in range(ch * _CHUNK, min(nb, (ch + 1) * _CHUNK)):
            x = xb[b]
            y = out[b]
            if nbr == 0:  # quantize_row_q2_K_ref
                max_scale = F32(0.0)
                max_min = F32(0.0)
                for j in range(nsub):
                    for l in range(16):
                        w[l] = abs(x[16 * j + l])
                    s, m = make_qkx2_quants(
                        x[16 * j : 16 * j + 16], w, 3, L[16 * j : 16 * j + 16], -0.5, 0.1, 15, True, work
                    )
                    scales[j] = s
                    mins[j] = m
                    if s > max_scale:
                        max_scale = s
                    if m > max_min:
                        max_min = m
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
            else:  # quantize_row_q2_K_impl
                qwr = qw[b % nbr]
                sigma2 = _sum_sq(x, 0, QK_K) / F32(QK_K)
                for j in range(nsub):
                    sumw = F32(0.0)
                    for l in range(16):
                        xv = x[16 * j + l]
                        w[l] = qwr[16 * j + l] * np.sqrt(sigma2 + xv * xv)
                        sumw += w[l]
                    sw[j] = sumw
                    s, m = make_qkx3_quants(
                        x[16 * j : 16 * j + 16], w, 3, L[16 * j : 16 * j + 16], -0.9, 0.05, 36, False, work
                    )
                    scales[j] = s
                    mins[j] = m
                dbits = f32_to_f16_bits(make_qp_quants(scales, 15, Ls, sw))
                mbits = f32_to_f16_bits(make_qp_quants(mins, 15, Lm, sw))
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
            _pack_2bit(L, y, 16)
            _put_f16(y, 80, dbits)
            _put_f16(y, 82, mbits)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q2_k(data, out):
    for b in prange(data.shape[0]):
        y = data[b]
        o = out[b]
        d = _get_f16(y, 80)
        dmin = _get_f16(y, 82)
        for h in range(QK_K // 128):
            for j in range(4):
                for half in range(2):
                    sc = np.int64(y[8 * h + 2 * j + half])
                    dl = d * F32(sc & 0xF)
                    ml = dmin * F32(sc >> 4)
                    for l in range(16):
                        k = 16 * half + l
                        v = (np.int64(y[16 + 32 * h + k]) >> (2 * j)) & 3
                        o[128 * h + 32 * j + k] = dl * F32(v) - ml


# ---------------------------------------------------------------------------------------------------
# registration


def _rows(quantize_kernel, dequantize_kernel, type_size):
    def quantize_rows(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        n_rows = x.shape[0]
        xb = x.reshape(-1, QK_K)
        qw = np.empty((0, QK_K), np.float32) if importance is None else importance.reshape(-1, QK_K)
        out = np.empty((xb.shape[0], type_size), dtype=np.uint8)
        quantize_kernel(xb, qw, out)
        return out.reshape(n_rows, -1)

    def dequantize_rows(data: np.ndarray, n_per_row: int) -> np.ndarray:
        n_rows = data.shape[0]
        blocks = data.reshape(-1, type_size)
        out = np.empty((blocks.shape[0], QK_K), dtype=np.float32)
        dequantize_kernel(blocks, out)
        return out.reshape(n_rows, n_per_row)

    return quantize_rows, dequantize_rows


for _name, _q, _dq in (
    ("Q2_K", _quantize_q2_k, _dequantize_q2_k),
    ("Q3_K", _quantize_q3_k, _dequantize_q3_k),
    ("Q4_K", _quantize_q4_k, _dequantize_q4_k),
    ("Q5_K", _quantize_q5_k, _dequantize_q5_k),
    ("Q6_K", _quantize_q6_k, _dequantize_q6_k),
):
    _qr, _dqr = _rows(_q, _dq, _SIZE[_name])
    register(_name, quantize_rows=_qr, dequantize_rows=_dqr, uses_importance=True)
