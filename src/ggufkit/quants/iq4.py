"""Non-linear 4-bit formats IQ4_NL and IQ4_XS (ggml-quants.c quantize_row_iq4_nl_impl, dequantize_row_iq4_*).

Both map 4-bit indices through the 16-entry table KVALUES (ggml-common.h kvalues_iq4nl):
  IQ4_NL (32 elements, 18 bytes):  d f16 | qs[16]                     x = d * KVALUES[q]
  IQ4_XS (256 elements, 136 bytes): d f16 | scales_h u16 | scales_l[4] | qs[128]
      eight 32-element sub-blocks with 6-bit scales ls (stored l+32: low nibble in scales_l[ib/2] at
      4*(ib%2), high 2 bits in scales_h at 2*ib);  x = d * (ls-32) * KVALUES[q]
  qs: byte j of a 32-element group = q[j] | q[j+16] << 4.

Algorithm, as ggml_quantize_chunk runs it (quantize_iq4_nl / quantize_iq4_xs, always ntry = 7, with or
without importance; never the ntry = -1 variant of quantize_row_iq4_nl_ref):
- per 32-element sub-block, weights w = qw*sqrt(sigma2 + x^2) with an importance row qw (sigma2 =
  2*mean(x^2) over the block, 32 or 256 elements), else w = x^2;
- start from d = max/127 (max = signed value of largest |x|), then try the 15 inverse scales
  (t-127)/max, t = -7..7, keeping the weighted least-squares d with the largest sumqx^2/sumq2 (strict >);
- IQ4_NL stores fp16(d) and re-picks every index with 1/d of the float32 d;
- IQ4_XS quantizes the eight sub-block scales to 6 bits against d = -max_scale/32 (max_scale = the
  signed scale of largest magnitude), stores fp16(d), and re-picks indices with 1/(d*l) in float32.
Index choice is ggml's best_index_int8: binary search, a tie picks the upper index, x <= -127 -> 0,
x >= 113 -> 15. A block with max |x| < 1e-15 gets scale 0 (IQ4_NL: d = 0x0000, all indices 8; IQ4_XS:
d = -0.0 when the whole superblock is zero).

Non-finite input (compared with libggml in tests/test_quants_iq4.py): nothing is rejected; the float32
operations are libggml's, so the bytes are deterministic and equal to libggml's. What happens:
- a NaN or inf element makes its sub-block's sums non-finite (its weight x^2, or qw*sqrt(sigma2 + x^2),
  is), so no candidate passes the strict `>` test and the first scale stays: 0 when sumq2 is NaN (a NaN
  element), NaN when it is inf/inf (an inf element, which is also the block max: all inverse scales 0);
- with importance, sigma2 carries a non-finite value into every weight of the block (IQ4_NL) or of the
  whole superblock (IQ4_XS), so all its sub-block scales end 0 or NaN;
- best_index_int8(NaN) is 15 (all its comparisons are false), so non-finite elements get index 15;
  IQ4_NL stores a NaN scale as fp16 NaN and then every index is 15 (x/NaN is NaN);
- IQ4_XS never picks a NaN scale as the max scale (strict >) and ggml's nearest_int bit trick maps
  it to l = 0, so that sub-block gets ls = 32 (scale 0) and indices 8 (15 for the non-finite ones).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fp import fp16_bits_to_fp32, fp32_to_fp16_bits
from .registry import FORMATS, register

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KV = KVALUES.astype(np.float32)  # the kernels compare and multiply in float32, as C promotes int8 there
_SUB = 32  # elements per sub-block (and per IQ4_NL block)
_NTRY = 7
_LANES = 2 * _NTRY + 2  # the first guess plus the 15 tries
_GROUP_MAX_EPS = np.float32(1e-15)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_CHUNK = 64  # superblocks per parallel work item (scratch buffers are allocated per item)


@njit(inline="always")
def _nearest_int(f):
    """ggml nearest_int: the mantissa bits of f + 1.5*2^23 (round half to even for |f| < 2^22)."""
    v = np.float32(np.float32(f) + np.float32(12582912.0)).view(np.int32)
    return np.int64(v & np.int32(0x007FFFFF)) - 0x00400000


@njit(inline="always")
def _best_index(kv, x):
    """best_index_int8: index of the table value nearest to x; a tie picks the upper index.

    Branch-free form of ggml's binary search with the same answers: lo = the number of table values
    kv[1..14] that x is not below (so NaN counts as above all of them, as in C, and ends at 15), then C's
    own float32 comparison `x - kv[lo] < kv[lo+1] - x` decides between lo and lo+1. x <= kv[0] gives 0
    and x >= kv[15] gives 15 through the same formula.
    """
    lo = 0
    for k in range(1, 15):
        lo += not (x < kv[k])
    return lo + (not (x - kv[lo] < kv[lo + 1] - x))


@njit(inline="always")
def _search_lanes(kv, xs, base, w, lanes):
    """The 16 candidate inverse scales of one sub-block, evaluated together (one lane each).

    lanes[0] holds the inverse scales; lanes[1]/lanes[2] receive sumqx/sumq2. Every lane sums over the
    32 elements strictly in order, so each candidate's sums are the float32 values C computes one
    candidate after another; only the order in which candidates are visited changes.
    """
    inv = lanes[0]
    sqx = lanes[1]
    sq2 = lanes[2]
    for c in range(_LANES):
        sqx[c] = _F0
        sq2[c] = _F0
    for j in range(_SUB):
        xj = xs[base + j]
        wj = w[j]
        for c in range(_LANES):
            q = kv[_best_index(kv, inv[c] * xj)]
            sqx[c] += wj * q * xj
            sq2[c] += wj * q * q


@njit(inline="always")
def _superblock(x, qw, has_qw, qw_base, kv, sbs, out, s, w, L, scales, lanes):
    """Quantize superblock s (x[s, :sbs]) into out[s]; w, L, scales, lanes are scratch."""
    xs = x[s]
    sigma2 = _F0
    for j in range(sbs):
        sigma2 += xs[j] * xs[j]
    sigma2 *= np.float32(2.0) / np.float32(sbs)
    nsub = sbs // _SUB
    max_scale = _F0
    amax_scale = _F0
    for ib in range(nsub):
        base = ib * _SUB
        if has_qw:
            for j in range(_SUB):
                xj = xs[base + j]
                w[j] = qw[qw_base + base + j] * np.float32(np.sqrt(sigma2 + xj * xj))
        else:
            for j in range(_SUB):
                w[j] = xs[base + j] * xs[base + j]
        amax = _F0
        mx = _F0
        for j in range(_SUB):
            ax = np.abs(xs[base + j])
            if ax > amax:
                amax = ax
                mx = xs[base + j]
        if amax < _GROUP_MAX_EPS:
            scales[ib] = _F0
            continue
        # lane 0: d = max/127; lanes 1..15: inverse scales (t-127)/max. (C also stores lane 0's indices,
        # but both formats re-pick every index from the final scale below, so they are never used.)
        inv = lanes[0]
        inv[0] = _F1 / (-mx / kv[0])
        for t in range(-_NTRY, _NTRY + 1):
            inv[t + _NTRY + 1] = np.float32(t - 127) / mx
        _search_lanes(kv, xs, base, w, lanes)
        sumqx = lanes[1]
        sumq2 = lanes[2]
        d = sumqx[0] / sumq2[0] if sumq2[0] > 0 else _F0
        best = d * sumqx[0]
        for c in range(1, _LANES):
            if sumq2[c] > 0 and sumqx[c] * sumqx[c] > best * sumq2[c]:
                d = sumqx[c] / sumq2[c]
                best = d * sumqx[c]
        scales[ib] = d
        if np.abs(d) > amax_scale:
            amax_scale = np.abs(d)
            max_scale = d

    if nsub > 1:  # IQ4_XS: 6-bit sub-block scales against the float32 super-scale
        d = -max_scale / np.float32(32.0)
        h = fp32_to_fp16_bits(d)
        out[s, 0] = np.uint8(h & np.uint16(0xFF))
        out[s, 1] = np.uint8(h >> np.uint16(8))
        inv = _F1 / d if d != 0 else _F0
        scales_h = 0
        for k in range(4):
            out[s, 4 + k] = 0
        for ib in range(nsub):
            li = _nearest_int(inv * scales[ib])
            li = max(-32, min(31, li))
            dl = d * np.float32(li)
            idl = _F1 / dl if dl != 0 else _F0
            base = ib * _SUB
            for j in range(_SUB):
                L[base + j] = _best_index(kv, idl * xs[base + j])
            li += 32
            out[s, 4 + ib // 2] |= np.uint8((li & 0xF) << (4 * (ib % 2)))
            scales_h |= (li >> 4) << (2 * ib)
        out[s, 2] = np.uint8(scales_h & 0xFF)
        out[s, 3] = np.uint8(scales_h >> 8)
        qs = 8
    else:  # IQ4_NL: re-pick the indices with the float32 scale
        h = fp32_to_fp16_bits(scales[0])
        out[s, 0] = np.uint8(h & np.uint16(0xFF))
        out[s, 1] = np.uint8(h >> np.uint16(8))
        inv = _F1 / scales[0] if scales[0] != 0 else _F0
        for j in range(_SUB):
            L[j] = _best_index(kv, inv * xs[j])
        qs = 2
    for i in range(nsub):
        for j in range(16):
            out[s, qs + 16 * i + j] = np.uint8(L[32 * i + j] | (L[32 * i + 16 + j] << 4))


@njit(parallel=True, cache=True)
def _quantize_kernel(x, qw, has_qw, per_row, kv, out):
    """x: [n_super, sbs] float32 (superblocks of all rows in order), qw: importance row (or dummy)."""
    n_super, sbs = x.shape
    n_chunks = (n_super + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        w = np.empty(_SUB, dtype=np.float32)
        L = np.empty(sbs, dtype=np.int64)
        scales = np.empty(sbs // _SUB, dtype=np.float32)
        lanes = np.empty((3, _LANES), dtype=np.float32)
        for s in range(c * _CHUNK, min(n_super, (c + 1) * _CHUNK)):
            _superblock(x, qw, has_qw, (s % per_row) * sbs, kv, sbs, out, s, w, L, scales, lanes)


@njit(parallel=True, cache=True)
def _iq4_nl_deq(data, kv, y):
    for b in prange(data.shape[0]):
        d = fp16_bits_to_fp32(np.uint16(data[b, 0]) | (np.uint16(data[b, 1]) << np.uint16(8)))
        for j in range(16):
            q = data[b, 2 + j]
            y[b, j] = d * kv[q & 0x0F]
            y[b, j + 16] = d * kv[q >> 4]


@njit(parallel=True, cache=True)
def _iq4_xs_deq(data, kv, y):
    for b in prange(data.shape[0]):
        d = fp16_bits_to_fp32(np.uint16(data[b, 0]) | (np.uint16(data[b, 1]) << np.uint16(8)))
        scales_h = np.int32(data[b, 2]) | (np.int32(data[b, 3]) << 8)
        for ib in range(8):
            lo = (np.int32(data[b, 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF
            ls = lo | (((scales_h >> (2 * ib)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            for j in range(16):
                q = data[b, 8 + 16 * ib + j]
                y[b, 32 * ib + j] = dl * kv[q & 0x0F]
                y[b, 32 * ib + j + 16] = dl * kv[q >> 4]


def _register(name: str, deq_kernel) -> None:
    block, type_size = FORMATS[name].block_size, FORMATS[name].type_size

    def quantize_rows(x: np.ndarray, importance) -> np.ndarray:
        n_rows, n_per_row = x.shape
        out = np.zeros((n_rows * (n_per_row // block), type_size), dtype=np.uint8)
        if out.shape[0]:
            has_qw = importance is not None
            qw = importance if has_qw else np.zeros(1, dtype=np.float32)
            _quantize_kernel(x.reshape(-1, block), qw, has_qw, n_per_row // block, _KV, out)
        return out.reshape(n_rows, n_per_row // block * type_size)

    def dequantize_rows(data: np.ndarray, n_per_row: int) -> np.ndarray:
        n_rows = data.shape[0]
        y = np.empty((n_rows * (n_per_row // block), block), dtype=np.float32)
        if y.shape[0]:
            deq_kernel(data.reshape(-1, type_size), _KV, y)
        return y.reshape(n_rows, n_per_row)

    register(name, quantize_rows=quantize_rows, dequantize_rows=dequantize_rows, uses_importance=True)


_register("IQ4_NL", _iq4_nl_deq)
_register("IQ4_XS", _iq4_xs_deq)
