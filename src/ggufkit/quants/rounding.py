"""C's nearest_int (ggml-quants.c) for every float32, for the numba kernels of search.py and lockstep.py.

nearest_int(fval) is `float val = fval + 12582912.f; int i; memcpy(&i, &val, 4); return (i & 0x007fffff)
- 0x00400000;` behind an assert(fabsf(fval) <= 4194303.f) that release builds drop. Within that range it
is round-half-to-even (np.rint); beyond it, and for NaN and inf, the bit trick is reproduced. This matters
for finite data too (a fitted min far from a zero-weight spike, or iscale = nmax/(max - min) overflowing
to inf when max - min is subnormal). Nothing here raises on NaN/inf or converts them to integers
undefined-ly; results equal C's for numpy's default NaN (C's trick reads a NaN's payload bits).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

F32 = np.float32
_RINT_LIMIT = F32(4194303.0)
_F32_MAX = F32(3.4028235e38)  # nearest_int is np.rint up to here (C asserts it; release builds don't)


@njit(cache=True, error_model="numpy")
def _nearest_int_wide(f):
    # C: bits(f + 12582912.f) & 0x7fffff - 0x400000, for arguments outside |f| <= 4194303 (or NaN).
    val = F32(f + F32(12582912.0))
    if val != val:
        return 0  # default quiet NaN 0x7fc00000 -> mantissa field 0x400000
    if val == 0 or math.isinf(val):
        return -0x400000
    fr, _ = math.frexp(abs(float(val)))
    mant = int(fr * 16777216.0) - 0x800000  # the 23 stored mantissa bits of a normal float32
    return mant - 0x400000


@njit(cache=True, error_model="numpy")
def nearest_int(f):
    """nearest_int(f: float32) -> int: C's nearest_int for every float32.

    For |f| <= 4194303 this is round-half-to-even (np.rint); beyond that (and for NaN/inf) it reproduces
    C's bit trick (no assert in release builds), so results agree even on hostile data.
    """
    if abs(f) <= F32(4194303.0):
        return int(np.rint(f))
    return _nearest_int_wide(f)


@njit(cache=True, error_model="numpy", inline="always")
def rint_clamp(f, lo, hi):
    """A level as the searches take it: np.rint(f) (f exact already, or within rint's range) clamped to
    [lo, hi] as C's MAX(lo, MIN(hi, l)) does, kept as a float (a NaN f gives lo)."""
    l = np.rint(f)
    l = l if l >= lo else lo
    return l if l <= hi else hi


@njit(cache=True, error_model="numpy")
def _fix_wide(raw):
    """raw[k] = nearest_int(raw[k]) where |raw[k]| > 4194303 or NaN (C's bit trick; rint elsewhere is
    the same). Returns nothing; called only when such a value exists (rare)."""
    for k in range(raw.shape[0]):
        if not abs(raw[k]) <= _RINT_LIMIT:
            raw[k] = F32(nearest_int(raw[k]))


@njit(cache=True, error_model="numpy", inline="always")
def _scaled(raw, iscale, src, n):
    """raw[i] = iscale * src[i] for i < n, then C's nearest_int for the rare values out of rint's range, so
    that np.rint(raw[i]) is nearest_int(iscale * src[i]) everywhere."""
    n_wide = 0
    for i in range(n):
        f = iscale * src[i]
        raw[i] = f
        n_wide += not abs(f) <= _RINT_LIMIT
    if n_wide:
        _fix_wide(raw[:n])
