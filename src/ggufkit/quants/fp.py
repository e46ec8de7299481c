"""Float formats F32, F16, BF16, and the fp16 scalar conversions every block format stores its scales with.

Reference: ggml.c ggml_fp32_to_fp16_row / ggml_fp16_to_fp32_row / ggml_fp32_to_bf16_row_ref /
ggml_bf16_to_fp32_row, with the scalar conversions of ggml-impl.h (GGML_FP32_TO_FP16 is a software
routine in ggml-base, never the F16C instruction).

F32 -> F16 is IEEE round-to-nearest-even: |x| >= 65520 -> inf, subnormals rounded, -0.0 -> 0x8000, and
every NaN -> 0x7E00 with the input's sign (payload dropped). F16 -> F32 is exact, except that a
signalling-NaN half (0x7C01..0x7DFF) comes back quiet (ggml computes it with a float multiply, which sets
the quiet bit). BF16: NaN -> (bits >> 16) | 0x0040 (quiet, sign and top payload kept); otherwise
round-to-nearest-even on the top 16 bits (inf stays inf, overflow rounds to inf). BF16 -> F32 is a
16-bit shift. None of the three has an importance-weighted algorithm; importance is ignored.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .registry import register

_TWO_POW_24 = np.float32(16777216.0)
_TWO_POW_M24 = np.float32(2.0**-24)


@njit(inline="always")
def fp32_to_fp16_bits(f):
    """GGML_FP32_TO_FP16 on one float32, as a uint16 bit pattern (for numba kernels)."""
    u = np.float32(f).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # NaN: quiet, payload dropped
        return np.uint16(sign | np.uint32(0x7E00))
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds to inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a >= np.uint32(0x38800000):  # normal half: rebias the exponent (127 -> 15), round 13 bits to even
        r = a - np.uint32(0x38000000)
        r = (r + np.uint32(0xFFF) + ((r >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        return np.uint16(sign | r)
    # subnormal half or zero: |f| * 2^24 is exact in float32; rint rounds half to even
    m = np.rint(np.abs(np.float32(f)) * _TWO_POW_24)
    return np.uint16(sign | np.uint32(m))


@njit(inline="always")
def fp16_bits_to_fp32(h):
    """GGML_FP16_TO_FP32 on one uint16 bit pattern, as float32 (for numba kernels)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:  # zero or subnormal: m * 2^-24, exact
        mag = np.float32(np.float32(m) * _TWO_POW_M24).view(np.uint32)
        return np.uint32(sign | mag).view(np.float32)
    if e == 31:  # inf, or NaN made quiet
        quiet = np.uint32(0x400000) if m != 0 else np.uint32(0)
        return np.uint32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)) | quiet).view(np.float32)
    return np.uint32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))).view(np.float32)


@njit(parallel=True, cache=True)
def _f16_rows(x, out):
    for r in prange(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for j in range(xr.shape[0]):
            orow[j] = fp32_to_fp16_bits(xr[j])


@njit(parallel=True, cache=True)
def _f16_to_f32_rows(h, y):
    for r in prange(h.shape[0]):
        hr = h[r]
        yr = y[r]
        for j in range(hr.shape[0]):
            yr[j] = fp16_bits_to_fp32(hr[j])


@njit(parallel=True, cache=True)
def _bf16_rows(u, out):
    """ggml_compute_fp32_to_bf16 on float32 bit patterns u (uint32)."""
    for r in prange(u.shape[0]):
        ur = u[r]
        orow = out[r]
        for j in range(ur.shape[0]):
            v = ur[j]
            if (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep the top bits, force quiet
                orow[j] = np.uint16((v >> np.uint32(16)) | np.uint32(0x40))
            else:  # round to nearest even; never wraps for a non-NaN (-inf 0xFF800000 + 0x8000 fits)
                bump = np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))
                orow[j] = np.uint16((v + bump) >> np.uint32(16))


@njit(parallel=True, cache=True)
def _bf16_to_f32_rows(h, y):
    for r in prange(h.shape[0]):
        hr = h[r]
        yr = y[r]
        for j in range(hr.shape[0]):
            yr[j] = np.uint32(hr[j]) << np.uint32(16)


def _quantize_f32(x: np.ndarray, importance) -> np.ndarray:
    return x.view(np.uint8).copy()


def _dequantize_f32(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return data.view(np.float32).copy()


def _quantize_f16(x: np.ndarray, importance) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.uint16)
    _f16_rows(x, out)
    return out.view(np.uint8)


def _dequantize_f16(data: np.ndarray, n_per_row: int) -> np.ndarray:
    y = np.empty((data.shape[0], n_per_row), dtype=np.float32)
    _f16_to_f32_rows(data.view(np.uint16), y)
    return y


def _quantize_bf16(x: np.ndarray, importance) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.uint16)
    _bf16_rows(x.view(np.uint32), out)
    return out.view(np.uint8)


def _dequantize_bf16(data: np.ndarray, n_per_row: int) -> np.ndarray:
    y = np.empty((data.shape[0], n_per_row), dtype=np.uint32)
    _bf16_to_f32_rows(data.view(np.uint16), y)
    return y.view(np.float32)


register("F32", quantize_rows=_quantize_f32, dequantize_rows=_dequantize_f32, uses_importance=False)
register("F16", quantize_rows=_quantize_f16, dequantize_rows=_dequantize_f16, uses_importance=False)
register("BF16", quantize_rows=_quantize_bf16, dequantize_rows=_dequantize_bf16, uses_importance=False)
