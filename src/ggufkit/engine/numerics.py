"""The engine's numerics, each rounded as llama.cpp's CPU backend rounds it: rms_norm, silu, geglu (GELU
through ggml's F16 table), the causal and sliding-window softmax, the activations' rounding to the weight's
vec_dot type (round_activations), the F16 kernels, and the BLAS/numba thread control.

F16 kernels: bit for bit numpy's `astype`. The engine rounds activations to F16 before F16 matmuls and
keeps its KV cache in F16 (both as llama.cpp does), and reads F16 weights as float32. numpy's
`astype(np.float16).astype(np.float32)` makes two passes through memory and a float16 temporary; the
round-trip kernel makes one pass, and the F16 -> F32 kernel one read and one write (both faster than
astype: docs/benchmarks.md).

The round trip (and rms_norm) are engine/fused.py's: one branch-free pass that numba vectorizes, on the
engine's threads through a Python thread pool (not numba's OpenMP pool, whose spinning against OpenBLAS's
threads on 2 cores made the whole engine slower), and so is the F16 -> F32 read.

The conversions are ggml's (quants/fp.py), which are numpy's for every non-NaN value: round to nearest
even, subnormals, overflow to inf (|x| >= 65520), -0.0. They differ on NaN payloads only (ggml drops the
payload and quiets the NaN; numpy keeps the payload's top bits and never quiets), so the kernels take the
NaN branch numpy's way: the engine's output is then bit-identical to what the astype code gave, NaN or not.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from contextlib import contextmanager

import numpy as np
from numba import njit

from ..gguf.types import GGML_QUANT_SIZES, GGMLQuantizationType
from ..quants import dequantize, quantize
from ..quants.fp import fp16_bits_to_fp32
from ..quants.registry import FORMATS
from . import fused

log = logging.getLogger(__name__)

_EXP32 = np.uint32(0x7F800000)


@njit(cache=True, nogil=True)
def _f16_to_f32_flat(i0, i1, h, out, out_u):
    """out[i0:i1] = F16 bit patterns h[i0:i1] as float32; out_u is the uint32 view of out."""
    for i in range(i0, i1):
        b = np.uint32(h[i])
        if (b & np.uint32(0x7FFF)) > np.uint32(0x7C00):  # NaN: numpy shifts the payload, never quiets it
            out_u[i] = np.uint32(
                ((b & np.uint32(0x8000)) << np.uint32(16))
                | _EXP32
                | ((b & np.uint32(0x3FF)) << np.uint32(13))
            )
        else:
            out[i] = fp16_bits_to_fp32(h[i])


def f16_to_f32(h: np.ndarray) -> np.ndarray:
    """F16 values h (float16 or their uint16 bit patterns) as float32, bit for bit h.astype(np.float32), in
    ranges on the engine's threads."""
    h = np.ascontiguousarray(h).view(np.uint16)
    out = np.empty(h.shape, np.float32)
    oflat = out.reshape(-1)
    fused.split_rows(_f16_to_f32_flat, oflat.size, h.reshape(-1), oflat, oflat.view(np.uint32))
    return out


def f16_round(x: np.ndarray) -> np.ndarray:
    """x (float32) rounded to F16 and back: a new float32 array equal bit for bit to
    x.astype(np.float16).astype(np.float32) (engine/fused.py's kernel, on the engine's threads)."""
    return fused.f16_round(x)


# -- llama.cpp's activation rounding ---------------------------------------------------------------
# ggml's CPU matmul first converts the activations to the weight type's "vec_dot type" (type_traits_cpu in
# ggml-cpu.c) and then takes exact block dot products. Rounding the activations the same way and then
# multiplying in float32 reproduces llama.cpp's numbers up to summation order. Without it, a quantized
# model's measured damage would leave out the (small) activation-rounding share that llama.cpp adds.
# weight type -> the ggml type name its activations are rounded to (the registry's vec_dot)
_VEC_DOT = {f.ggml_type: f.vec_dot for f in FORMATS.values()}


def _round_q8_0(x: np.ndarray) -> np.ndarray:
    """x through quantize_row_q8_0 (x86 AVX path) and back: per 32 values d = amax/127 stored as F16,
    q = round-half-even(x * 127/amax)."""
    qk = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
    b = x.reshape(-1, qk)
    amax = np.abs(b).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    d = f16_round(amax / np.float32(127))
    return (np.rint(b * inv) * d).reshape(x.shape)


def _round_q8_k(x: np.ndarray) -> np.ndarray:
    """x through quantize_row_q8_K_ref and back: per 256 values iscale = -127/max (max = the value of
    largest magnitude, first one on ties), q = min(127, round(iscale*x)), d = 1/iscale in float32."""
    qk = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_K][0]
    b = x.reshape(-1, qk)
    mx = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(iscale * b), np.float32(127))
    return (q * d).reshape(x.shape)


def vec_dot(weight_type) -> str | None:
    """The type llama.cpp's CPU backend rounds activations to for a weight of `weight_type` (None: a type
    the registry does not know)."""
    return _VEC_DOT.get(GGMLQuantizationType(weight_type))


def round_activations(x: np.ndarray, weight_type) -> np.ndarray:
    """Activations x [n, k] as llama.cpp's CPU backend rounds them before a matmul with `weight_type`."""
    kind = vec_dot(weight_type)
    if kind is None or kind == "F32":
        return x
    if kind == "F16":
        return f16_round(x)
    if kind == "BF16":
        return dequantize(quantize(np.ascontiguousarray(x), "BF16"), "BF16", x.shape)
    if kind == "Q8_K":
        return _by_rows(_round_q8_k, x, GGML_QUANT_SIZES[GGMLQuantizationType.Q8_K][0])
    return _by_rows(_round_q8_0, x, GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0])


def _by_rows(fn, x: np.ndarray, block: int) -> np.ndarray:
    """fn (a rounding by blocks of `block` values) on row ranges of x on the engine's threads (numpy's
    loops release the GIL); the whole of x at once when its rows are not whole blocks."""
    if x.ndim < 2 or x.shape[-1] % block:
        return fn(x)
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty(x2.shape, np.float32)

    def rows(r0: int, r1: int) -> None:
        out[r0:r1] = fn(x2[r0:r1])

    fused.split_rows(rows, x2.shape[0])
    return out.reshape(x.shape)


_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 with the low 21 mantissa bits zero: n * _LN2_HI is exact for |n| < 2^21
_LN2_LO = 1.9082149292705877e-10  # ln 2 - _LN2_HI


@njit(inline="always")
def exp32(x):
    """exp(x) of a float32 x <= 0, as float32: computed in double (x = n ln2 + r, |r| <= ln2/2, e^r by its
    degree-11 Taylor polynomial, relative error < 1e-14, then 2^n put in the exponent bits) and rounded
    once, so the result is exp(x) correctly rounded but for inputs within 1e-14 of a float32 rounding
    boundary (none among tests/test_engine_fused.py's inputs, nor in 5e7 random draws checked when it was
    written; libm's expf, which np.exp calls inside numba, misses about 6 in 10^4 by one ulp).
    Branch-free: numba vectorizes the loops that call it. Below -120 the result is 0, as float32 would round
    it."""
    d = max(np.float64(x), -120.0)
    n = np.rint(d * _LOG2E)
    r = (d - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return np.float32(p * np.int64((np.int64(n) + 1023) << 52).view(np.float64))


@njit(cache=True, nogil=True)
def softmax_rows(j0, step, s, first_pos, group, block, window):
    """Rows j0, j0 + step, ... of s [R, K] in place, as attention (engine/attention.py) lays them out: row r
    is query position pos = first_pos + r // group (`group` query heads share a kv head and sit side by
    side), column j is key position j, and the row's keys were computed for its block of `block` positions
    only: columns k0 .. b1 - 1, b0 = the block's first position, b1 its end, k0 = 0, or b0 - window + 1
    with a window. Those columns become softmax over the keys the query sees followed by zeros; the others
    are not touched. A query sees the keys at positions pos - window + 1 .. pos (window 0: 0 .. pos, the
    causal mask), llama.cpp's LLAMA_SWA_TYPE_STANDARD (masked when pos - key >= window). The double sum
    of the exps runs in 8 lanes (the order: lane by lane, then the lanes pairwise), so numba vectorizes it."""
    R, K = s.shape
    for r in range(j0, R, step):
        pos = first_pos + r // group
        b0 = pos - pos % block
        b1 = min(b0 + block, K)
        k0 = max(0, b0 - window + 1) if window > 0 else 0
        lo = max(k0, pos - window + 1) if window > 0 else 0
        s[r, k0:lo] = 0.0
        s[r, pos + 1 : b1] = 0.0
        row = s[r, lo : pos + 1]  # the keys seen; loops from 0 let numba drop the negative-index checks
        n = row.shape[0]
        m = row[0]
        for j in range(1, n):
            m = max(m, row[j])
        for j in range(n):
            row[j] = exp32(row[j] - m)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        for j in range(0, n - n % 8, 8):
            a0 += row[j]
            a1 += row[j + 1]
            a2 += row[j + 2]
            a3 += row[j + 3]
            a4 += row[j + 4]
            a5 += row[j + 5]
            a6 += row[j + 6]
            a7 += row[j + 7]
        for j in range(n - n % 8, n):
            a0 += row[j]
        inv = np.float32(1.0 / (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))))
        for j in range(n):
            row[j] *= inv


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * weight, rounded as ggml's rms_norm: float32 squares summed in double (in order, first
    column to last), the mean rounded to float32, scale = 1/sqrt(mean + eps) in float32, then
    (x * scale) * weight. One pass of engine/fused.py's kernel when weight is one row of x's width; numpy
    (squares summed pairwise) otherwise."""
    if np.shape(weight) == (x.shape[-1],):
        return fused.rms_norm(x, weight, eps)
    sq = np.square(x, dtype=np.float32)
    ms = (sq.sum(axis=-1, dtype=np.float64) / x.shape[-1]).astype(np.float32)[..., None]
    scale = np.float32(1.0) / np.sqrt(ms + np.float32(eps))
    return x * scale * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


# ggml's GELU (tanh form) constants, float32 as in ggml-cpu/vec.h
_GELU_COEF_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


@functools.cache
def gelu_table() -> np.ndarray:
    """ggml's ggml_table_gelu_f16 as float32 [65536]: for every F16 bit pattern h, F16(gelu(h)) with
    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x x))) in float32 (ggml_gelu_f32) as the compiler
    builds it: 1 + (0.044715 x) x contracted into one fused multiply-add (emulated here in double, where the
    product of two floats is exact), tanhf correctly rounded (tanh in double, rounded to float32). Checked
    against libggml's own table, every finite entry (tests/test_gemma3.py); numpy's float32 tanh instead
    would differ in 234 entries, mostly where 1 + tanh cancels."""
    x = f16_to_f32(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16))
    with np.errstate(over="ignore", invalid="ignore"):
        ax = (_GELU_COEF_A * x).astype(np.float64)
        poly = (ax * x + 1.0).astype(np.float32)  # fmaf(0.044715 x, x, 1)
        inner = (_SQRT_2_OVER_PI * x) * poly
        t = np.tanh(inner.astype(np.float64)).astype(np.float32)
        y = (np.float32(0.5) * x) * (np.float32(1.0) + t)
    return f16_round(y)


def geglu(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """gelu(x) * g as ggml's CPU geglu computes it (GGML_GELU_FP16): x <= -10 gives 0, x >= 10 gives x * g,
    anything between reads gelu from the F16 table at x rounded to F16, then multiplies by g in float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        bits = x.astype(np.float16).view(np.uint16)
    y = gelu_table()[bits]
    y *= g
    hi = x >= np.float32(10.0)
    y[hi] = x[hi] * g[hi]
    y[x <= np.float32(-10.0)] = 0.0
    return y


# -- threads ------------------------------------------------------------------------------------------


def _blas_thread_setter():
    """OpenBLAS's set_num_threads of the library numpy is linked with (Linux), or None."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None, None
    for lib in libs:
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(dll, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(dll, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    return get, put
    return None, None


@contextmanager
def blas_threads(n: int | None):
    """Run BLAS matmuls and numba kernels on n threads inside the block (None: leave them, normally all
    cores)."""
    if not n:
        yield
        return
    import numba

    get, put = _blas_thread_setter()
    if get is None:
        log.info("cannot set the BLAS thread count (OpenBLAS not found); using its default")
    old_blas = get() if get is not None else None
    old_numba = numba.get_num_threads()
    if put is not None:
        put(int(n))
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if put is not None:
            put(old_blas)
        numba.set_num_threads(old_numba)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
