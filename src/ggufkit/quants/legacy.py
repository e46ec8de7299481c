"""Legacy 32-element block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml-quants.c).

Block layouts (little-endian, d/m are fp16):
  Q4_0  d | qs[16]            x = d*(q-8)     q in 0..15, byte j = q[j] | q[j+16] << 4
  Q4_1  d | m | qs[16]        x = d*q + m
  Q5_0  d | qh u32 | qs[16]   x = d*(q-16)    q in 0..31: low nibbles as Q4_0, bit 4 of q[j] is bit j of qh
  Q5_1  d | m | qh | qs[16]   x = d*q + m
  Q8_0  d | qs int8[32]       x = d*q

Two algorithms per type, chosen as ggml_quantize_chunk chooses them:
- without importance, the reference quantizers (quantize_row_*_ref): one pass per block from its
  max-abs (Q4_0, Q5_0: d = max/-8 or max/-16, signed) or from its min and max (Q4_1, Q5_1);
- with importance, Q4_0/Q5_0 run make_qx_quants and Q4_1/Q5_1 run make_qkx3_quants (search_qkx.py) with
  weights qw[j]*sqrt(sigma2 + x[j]^2), sigma2 = mean of x^2 over the whole row (quantize_row_*_impl).
  Q8_0 has no such algorithm: importance is accepted and ignored.

Quirks kept on purpose: the ref paths quantize with 1/d of the unrounded float32 d; `(int8_t)(v + 8.5f)`
is a float32 add and then a truncation; Q8_0 rounds half away from zero (roundf); an all-zero Q4_0/Q5_0
block stores d = -0.0 (0x8000).

Non-finite input (compared with libggml in tests/test_quants_legacy.py): nothing is rejected here (the
file-level quantizer refuses non-finite weights, as llama-quantize does). Values flow through the same
float32 operations as in libggml, and float -> integer conversions behave as the x86-64 build of libggml
does (cvttss2si: NaN or out of int32 range -> INT_MIN, whose low byte 0 is kept). For the ref paths:
- a NaN never wins the max-abs, min or max scans (strict comparisons are false for it), except in Q8_0,
  where amax = MAX(amax, |x|) lets a NaN replace the running max until the next element replaces it (a
  NaN last in its block makes d NaN); a NaN element's level is 0;
- an inf wins them: d = +-inf (stored as fp16 inf), 1/d = -+0, so every finite element gets the level
  of x*0 (Q4_0 8, Q5_0 16, Q8_0 0, Q4_1/Q5_1 0) and the inf itself (inf*0 = NaN) level 0.
For the importance paths, the levels follow C's nearest_int on the same float32 values (NaN -> 0, then
clamped), through search.py's helpers. Dequantizing gives NaN/inf exactly where libggml does, with
libggml's NaN bit patterns.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import get_thread_id, njit, prange

from .fp import fp16_bits_to_fp32, fp32_to_fp16_bits
from .registry import FORMATS, register
from .search import make_qx_quants, search_work
from .search_qkx import make_qkx3_quants

QK = 32  # elements per block, the same for all five types
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit(inline="always")
def _cvt_i32(v):
    """C float -> int as x86-64 does it (cvttss2si): truncation; NaN or out of int32 range -> INT_MIN."""
    if v >= -2147483648.0 and v < 2147483648.0:
        return np.int64(v)
    return np.int64(-2147483648)


@njit(inline="always")
def _to_i8(v):
    """(int8_t)v for a float v: the low byte of the int32 conversion, as a signed value."""
    b = _cvt_i32(v) & 0xFF
    return b - 256 if b >= 128 else b


@njit(inline="always")
def _roundf(v):
    """C roundf (half away from zero) of a float32, exact through float64."""
    f = np.float64(v)
    return np.trunc(f + np.copysign(0.5, f))


@njit(inline="always")
def _put_fp16(out, b, off, value):
    h = fp32_to_fp16_bits(value)
    out[b, off] = np.uint8(h & np.uint16(0xFF))
    out[b, off + 1] = np.uint8(h >> np.uint16(8))


@njit(inline="always")
def _get_fp16(data, b, off):
    return fp16_bits_to_fp32(np.uint16(data[b, off]) | (np.uint16(data[b, off + 1]) << np.uint16(8)))


@njit(inline="always")
def _signed_max(x, b):
    """The signed value of the first element with the largest |x| (strict <: a NaN never wins)."""
    amax = _F0
    mx = _F0
    for j in range(QK):
        v = x[b, j]
        av = np.abs(v)
        if amax < av:
            amax = av
            mx = v
    return mx


@njit(inline="always")
def _min_max(x, b):
    mn = _FLT_MAX
    mx = -_FLT_MAX
    for j in range(QK):
        v = x[b, j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@njit(inline="always")
def _put_qh(out, b, off, qh):
    for k in range(4):
        out[b, off + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(inline="always")
def _put_q5(out, b, off, j, q0, q1):
    """The levels q[j] and q[j + 16] (0..31) of a 5-bit block: their low nibbles into byte off + j, and
    their bit 4 returned as bits j and j + 16 of qh (the caller ORs them in)."""
    out[b, off + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
    return (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))


# ---------------------------------------------------------------- reference quantizers (one block each)


@njit(inline="always")
def _put_signed_scale(x, b, out, div):
    """Q4_0/Q5_0: d = the signed max / div (-8 or -16), stored as fp16 at byte 0. Returns 1/d (0 if d = 0)."""
    d = _signed_max(x, b) / div
    _put_fp16(out, b, 0, d)
    return _F1 / d if d != 0 else _F0


@njit(inline="always")
def _put_scale_min(x, b, out, nmax):
    """Q4_1/Q5_1: d = (max - min) / nmax (15 or 31) and the min, stored as fp16 at bytes 0 and 2. Returns
    the min and 1/d (0 if d = 0)."""
    mn, mx = _min_max(x, b)
    d = (mx - mn) / nmax
    _put_fp16(out, b, 0, d)
    _put_fp16(out, b, 2, mn)
    return mn, _F1 / d if d != 0 else _F0


@njit(parallel=True, cache=True)
def _q4_0_ref(x, out):
    for b in prange(x.shape[0]):
        inv = _put_signed_scale(x, b, out, np.float32(-8.0))
        for j in range(16):
            q0 = min(15, _to_i8(x[b, j] * inv + np.float32(8.5))) & 0xFF
            q1 = min(15, _to_i8(x[b, j + 16] * inv + np.float32(8.5))) & 0xFF
            out[b, 2 + j] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@njit(parallel=True, cache=True)
def _q4_1_ref(x, out):
    for b in prange(x.shape[0]):
        mn, inv = _put_scale_min(x, b, out, np.float32(15.0))
        for j in range(16):
            q0 = min(15, _to_i8((x[b, j] - mn) * inv + np.float32(0.5))) & 0xFF
            q1 = min(15, _to_i8((x[b, j + 16] - mn) * inv + np.float32(0.5))) & 0xFF
            out[b, 4 + j] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@njit(parallel=True, cache=True)
def _q5_0_ref(x, out):
    for b in prange(x.shape[0]):
        inv = _put_signed_scale(x, b, out, np.float32(-16.0))
        qh = np.uint32(0)
        for j in range(16):
            q0 = min(31, _to_i8(x[b, j] * inv + np.float32(16.5))) & 0xFF
            q1 = min(31, _to_i8(x[b, j + 16] * inv + np.float32(16.5))) & 0xFF
            qh |= _put_q5(out, b, 6, j, q0, q1)
        _put_qh(out, b, 2, qh)


@njit(parallel=True, cache=True)
def _q5_1_ref(x, out):
    for b in prange(x.shape[0]):
        mn, inv = _put_scale_min(x, b, out, np.float32(31.0))
        qh = np.uint32(0)
        for j in range(16):
            q0 = _cvt_i32((x[b, j] - mn) * inv + np.float32(0.5)) & 0xFF  # (uint8_t), no clamp
            q1 = _cvt_i32((x[b, j + 16] - mn) * inv + np.float32(0.5)) & 0xFF
            qh |= _put_q5(out, b, 8, j, q0, q1)
        _put_qh(out, b, 4, qh)


@njit(parallel=True, cache=True)
def _q8_0_ref(x, out):
    for b in prange(x.shape[0]):
        amax = _F0
        for j in range(QK):
            av = np.abs(x[b, j])
            amax = amax if amax > av else av  # MAX(amax, |x|): a NaN |x| replaces the running max
        d = amax / np.float32(127.0)
        inv = _F1 / d if d != 0 else _F0
        _put_fp16(out, b, 0, d)
        for j in range(QK):
            out[b, 2 + j] = np.uint8(_cvt_i32(_roundf(x[b, j] * inv)) & 0xFF)


# ---------------------------------------------------------------- importance paths (one row each)


@njit(cache=True, nogil=True)
def impl_rows(x, qw, nmax, with_min, out, work, r0, r1):
    """quantize_row_q{4,5}_{0,1}_impl on rows r0..r1 of x [n_rows, n_per_row] into out [n_rows, n_blocks,
    type_size], serially (the parallel kernel below and the native library both run it on row ranges).

    nmax 8/16 without min (Q4_0/Q5_0: make_qx_quants, levels 0..2*nmax-1), 15/31 with min
    (Q4_1/Q5_1: make_qkx3_quants(-0.9, 0.05, 36), m = -the_min). work: search scratch (search_work()).
    """
    n = x.shape[1]
    five_bit = nmax == 16 or nmax == 31
    qs_at = 2 + (2 if with_min else 0) + (4 if five_bit else 0)
    w = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.uint8)
    for r in range(r0, r1):
        sum_x2 = _F0
        for j in range(n):
            sum_x2 += x[r, j] * x[r, j]
        sigma2 = sum_x2 / np.float32(n)
        for ib in range(n // QK):
            xb = x[r, ib * QK : (ib + 1) * QK]
            for j in range(QK):
                w[j] = qw[ib * QK + j] * np.float32(np.sqrt(sigma2 + xb[j] * xb[j]))
            blocks = out[r]
            if with_min:
                d, the_min = make_qkx3_quants(xb, w, nmax, L, -0.9, 0.05, 36, False, work)
                _put_fp16(blocks, ib, 2, -the_min)
            else:
                d = make_qx_quants(xb, nmax, L, w, work)
            _put_fp16(blocks, ib, 0, d)
            qh = np.uint32(0)
            for j in range(16):  # 4-bit levels (0..15) pack as the low nibbles of 5-bit ones
                qh |= _put_q5(blocks, ib, qs_at, j, np.int32(L[j]), np.int32(L[j + 16]))
            if five_bit:
                _put_qh(blocks, ib, qs_at - 4, qh)


@njit(parallel=True, cache=True)
def _impl_kernel(x, qw, nmax, with_min, out, works):
    """impl_rows over all rows, one row per parallel item; works: per-thread search scratch."""
    for r in prange(x.shape[0]):
        impl_rows(x, qw, nmax, with_min, out, works[get_thread_id()], r, r + 1)


def _impl_path(nmax: int, with_min: bool):
    def quantize_importance(x, importance, out):
        works = np.stack([search_work() for _ in range(numba.config.NUMBA_NUM_THREADS)])
        _impl_kernel(x, importance, nmax, with_min, out, works)

    return quantize_importance


# ---------------------------------------------------------------- dequantizers


@njit(parallel=True, cache=True)
def _q4_0_deq(data, y):
    for b in prange(data.shape[0]):
        d = _get_fp16(data, b, 0)
        for j in range(16):
            q = data[b, 2 + j]
            y[b, j] = np.float32(np.int32(q & 0x0F) - 8) * d
            y[b, j + 16] = np.float32(np.int32(q >> 4) - 8) * d


@njit(inline="always")
def _scale_add(q, d, m):
    """q*d + m in float32 with x86 SSE's NaN rule (the first NaN operand's payload wins); LLVM may swap
    the operands of the add, which would pick m's payload when both are NaN."""
    t = np.float32(q) * d
    r = t + m
    if r != r and t != t:
        return t
    return r


@njit(parallel=True, cache=True)
def _q4_1_deq(data, y):
    for b in prange(data.shape[0]):
        d = _get_fp16(data, b, 0)
        m = _get_fp16(data, b, 2)
        for j in range(16):
            q = data[b, 4 + j]
            y[b, j] = _scale_add(q & 0x0F, d, m)
            y[b, j + 16] = _scale_add(q >> 4, d, m)


@njit(inline="always")
def _get_qh(data, b, off):
    qh = np.uint32(0)
    for k in range(4):
        qh |= np.uint32(data[b, off + k]) << np.uint32(8 * k)
    return qh


@njit(inline="always")
def _get_q5_high(qh, j):
    """Bit 4 of the levels q[j] and q[j + 16] of a 5-bit block (bits j and j + 16 of qh), as 16 or 0."""
    h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
    h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
    return h0, h1


@njit(parallel=True, cache=True)
def _q5_0_deq(data, y):
    for b in prange(data.shape[0]):
        d = _get_fp16(data, b, 0)
        qh = _get_qh(data, b, 2)
        for j in range(16):
            q = np.int32(data[b, 6 + j])
            h0, h1 = _get_q5_high(qh, j)
            y[b, j] = np.float32(((q & 0x0F) | h0) - 16) * d
            y[b, j + 16] = np.float32(((q >> 4) | h1) - 16) * d


@njit(parallel=True, cache=True)
def _q5_1_deq(data, y):
    for b in prange(data.shape[0]):
        d = _get_fp16(data, b, 0)
        m = _get_fp16(data, b, 2)
        qh = _get_qh(data, b, 4)
        for j in range(16):
            q = np.int32(data[b, 8 + j])
            h0, h1 = _get_q5_high(qh, j)
            y[b, j] = _scale_add((q & 0x0F) | h0, d, m)
            y[b, j + 16] = _scale_add((q >> 4) | h1, d, m)


@njit(parallel=True, cache=True)
def _q8_0_deq(data, y):
    for b in prange(data.shape[0]):
        d = _get_fp16(data, b, 0)
        for j in range(QK):
            q = np.int32(data[b, 2 + j])
            y[b, j] = np.float32(q - 256 if q >= 128 else q) * d


# ---------------------------------------------------------------- registry glue


def _blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, QK)


def _quantizer(ref_kernel, impl, type_size: int):
    def quantize_rows(x: np.ndarray, importance) -> np.ndarray:
        n_rows, n_per_row = x.shape
        out = np.empty((n_rows * (n_per_row // QK), type_size), dtype=np.uint8)
        if out.shape[0]:
            if importance is None:
                ref_kernel(_blocks(x), out)
            else:
                impl(x, importance, out.reshape(n_rows, -1, type_size))
        return out.reshape(n_rows, n_per_row // QK * type_size)

    return quantize_rows


def _dequantizer(kernel, type_size: int):
    def dequantize_rows(data: np.ndarray, n_per_row: int) -> np.ndarray:
        n_rows = data.shape[0]
        y = np.empty((n_rows * (n_per_row // QK), QK), dtype=np.float32)
        if y.shape[0]:
            kernel(data.reshape(-1, type_size), y)
        return y.reshape(n_rows, n_per_row)

    return dequantize_rows


def _register(name: str, ref_kernel, deq_kernel) -> None:
    """The registry's kernels of one legacy type: `ref_kernel` without importance; with importance, the
    search of the registry's legacy_search (nmax, has a min), if the type has one."""
    fmt = FORMATS[name]
    assert fmt.block_size == QK, name
    impl = _impl_path(*fmt.legacy_search) if fmt.legacy_search else None
    register(
        name,
        quantize_rows=_quantizer(ref_kernel, impl, fmt.type_size),
        dequantize_rows=_dequantizer(deq_kernel, fmt.type_size),
        uses_importance=impl is not None,
    )


_register("Q4_0", _q4_0_ref, _q4_0_deq)
_register("Q4_1", _q4_1_ref, _q4_1_deq)
_register("Q5_0", _q5_0_ref, _q5_0_deq)
_register("Q5_1", _q5_1_ref, _q5_1_deq)
_register("Q8_0", _q8_0_ref, _q8_0_deq)
