"""numba kernels for the engine's F16 conversions, bit for bit numpy's `astype`.

The engine rounds activations to F16 before F16 matmuls and keeps its KV cache in F16 (both as llama.cpp
does), and reads F16 weights as float32. numpy's `astype(np.float16).astype(np.float32)` makes two passes
through memory and a float16 temporary; the round-trip kernel makes one pass (2048x1536 values: 6.3 ms
against 10 ms), and the F16 -> F32 kernel takes 3.1 ms where astype takes 4.4 ms.

Serial on purpose, like _causal_softmax: they run between BLAS calls, and numba's OpenMP pool spinning
against OpenBLAS's threads on 2 cores made the whole engine slower (measured 2026-11-27, 2 shared cores:
a parallel round trip took 7.7 ms alone and slowed the BLAS products around it).

The conversions are ggml's (quants/fp.py), which are numpy's for every non-NaN value: round to nearest
even, subnormals, overflow to inf (|x| >= 65520), -0.0. They differ on NaN payloads only (ggml drops the
payload and quiets the NaN; numpy keeps the payload's top bits and never quiets), so the kernels take the
NaN branch numpy's way: the engine's output is then bit-identical to what the astype code gave, NaN or not.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..quants.fp import fp16_bits_to_fp32, fp32_to_fp16_bits

_EXP32 = np.uint32(0x7F800000)
_ABS32 = np.uint32(0x7FFFFFFF)
_SIGN32 = np.uint32(0x80000000)


@njit(cache=True)
def _f16_round_flat(x, xu, out, out_u):
    """out = x through F16; xu and out_u are the uint32 views of x and out."""
    n = x.shape[0]
    for i in range(n):
        u = xu[i]
        if (u & _ABS32) > _EXP32:  # NaN: numpy keeps the sign and the payload's top 10 bits (at least 1)
            sig = (u & np.uint32(0x7FFFFF)) >> np.uint32(13)
            if sig == 0:
                sig = np.uint32(1)
            out_u[i] = (u & _SIGN32) | _EXP32 | (sig << np.uint32(13))
        else:
            out[i] = fp16_bits_to_fp32(fp32_to_fp16_bits(x[i]))


@njit(cache=True)
def _f16_to_f32_flat(h, out, out_u):
    """out = F16 bit patterns h as float32; out_u is the uint32 view of out."""
    n = h.shape[0]
    for i in range(n):
        b = np.uint32(h[i])
        if (b & np.uint32(0x7FFF)) > np.uint32(0x7C00):  # NaN: numpy shifts the payload, never quiets it
            out_u[i] = np.uint32(
                ((b & np.uint32(0x8000)) << np.uint32(16))
                | _EXP32
                | ((b & np.uint32(0x3FF)) << np.uint32(13))
            )
        else:
            out[i] = fp16_bits_to_fp32(h[i])


def f16_round(x: np.ndarray) -> np.ndarray:
    """x (float32) rounded to F16 and back: a new float32 array equal bit for bit to
    x.astype(np.float16).astype(np.float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    flat, oflat = x.reshape(-1), out.reshape(-1)
    _f16_round_flat(flat, flat.view(np.uint32), oflat, oflat.view(np.uint32))
    return out


def f16_to_f32(h: np.ndarray) -> np.ndarray:
    """F16 values h (float16 or their uint16 bit patterns) as float32, bit for bit h.astype(np.float32)."""
    h = np.ascontiguousarray(h).view(np.uint16)
    out = np.empty(h.shape, np.float32)
    oflat = out.reshape(-1)
    _f16_to_f32_flat(h.reshape(-1), oflat, oflat.view(np.uint32))
    return out
