"""The scale searches shared by the K-quants, the legacy imatrix paths and (via fp16) every super-scale.

Each function mirrors one helper of llama.cpp's ggml/src/ggml-quants.c bit for bit: float32 arithmetic
in the C source's association order, sequential sums from 0 (or from element 0 where C starts there),
round-half-to-even `nearest_int`, strict `<`/`>` tie rules, uint8 wrap of stored levels.

They are numba scalar kernels over 1-D float32 slices, callable from other @njit code (and from Python
for tests). Where they are faster than libggml it is by skipping work that provably cannot change the
result, never by reordering float arithmetic:
  - make_qx_quants tries its 19 candidate scales together, one SIMD lane per candidate (they do not
    depend on each other): every lane sums over the elements strictly in order, so each candidate's sums
    are C's float32 values, and the winner is then chosen by C's sequential strict comparison;
  - make_q3_quants computes x*x and x*x*x once instead of in every sweep (same values).
The K-quant kernels run the 8 or 16 searches of a super-block together, one SIMD lane per search
(lockstep.py: make_qkx_lockstep, make_q3_lockstep, with the same results); the functions here serve
single searches. C's nearest_int and the fp16 conversions they round with are in rounding.py and fp.py.
The scale-and-min searches (make_qkx2/qkx3_quants) are in search_qkx.py.

Note for developers: numba's on-disk cache of a kernel that calls these functions (kblocks, kquants,
lockstep, legacy) is keyed on the caller's source file only; after editing this file or rounding.py,
delete the callers' cached .nbi/.nbc files (src/ggufkit/quants/__pycache__) or their kernels keep the
old code. A fresh install has no stale cache.

Conventions for every function below:
  - x: float32 1-D (C-contiguous slice), n = x.shape[0] elements.
  - L: uint8 1-D of length >= n, output levels (C's int8/uint8 L; values are the same bits).
  - "no weights" is passed as an EMPTY float32 array (shape (0,)), never None.
  - work: float32 scratch from `search_work()`, reused across calls (no allocation in the kernels).
  - Integer arguments (nmax, nstep) are Python/numba ints; float arguments (rmin, rdelta) are converted
    to float32 inside (np.float32(-0.9) == -0.9f etc.).

Levels: every nearest_int argument is rounded as C rounds it (rounding.py): np.rint where it is provably
within |v| <= 2**22 (make_qx_quants on finite x), elsewhere C's bit trick for any value outside that range,
NaN or inf.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# fp16 conversions inside kernels: one implementation, in fp.py (checked against libggml on all patterns)
from .fp import fp16_bits_to_fp32 as f16_bits_to_f32  # noqa: F401  (re-exported for kquants)
from .fp import fp32_to_fp16_bits as f32_to_f16_bits  # noqa: F401
from .rounding import _F32_MAX, F32, _scaled, nearest_int, rint_clamp

GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: below this max |x| a group is "all zero"
MAX_LANES = 64  # make_qx_quants candidates evaluated together (19 used); qkx searches: n <= 64
_WORK_ROWS = 8


def search_work() -> np.ndarray:
    """Scratch for the searches: float32 [8, 64]. Allocate one per thread (or per chunk) and reuse it."""
    return np.empty((_WORK_ROWS, MAX_LANES), dtype=np.float32)


@njit(cache=True, error_model="numpy", inline="always")
def _all_zero(L, n):
    """An all-zero group (or a degenerate one): levels 0, not offset by nmax even for signed levels (as in
    C), and the scale 0."""
    for i in range(n):
        L[i] = 0
    return F32(0.0)


@njit(cache=True, error_model="numpy")
def _signed_max(x):
    """(max |x|, the first x holding it, how many x are NaN or infinite): the loop that opens ggml's
    make_qx_quants and make_q3_quants (a strict > keeps the first of equal magnitudes)."""
    mx = F32(0.0)
    amax = F32(0.0)
    n_nonfinite = 0
    for i in range(x.shape[0]):
        ax = abs(x[i])
        n_nonfinite += not ax <= _F32_MAX
        if ax > amax:
            amax = ax
            mx = x[i]
    return amax, mx, n_nonfinite


@njit(cache=True, error_model="numpy")
def _make_qx_plain(x, nmax, L, qw, mx):
    """make_qx_quants one candidate at a time with nearest_int, as in C (for inputs with NaN/inf)."""
    n = x.shape[0]
    noweights = qw.shape[0] == 0
    fn = F32(nmax)
    scale = F32(0.0)
    best = F32(0.0)
    for s in range(-10, 10):  # -10 stands for C's first pass, iscale = -nmax/max
        if s == 0:
            continue
        iscale = F32(-nmax) / mx if s == -10 else -(fn + F32(0.1) * F32(s)) / mx
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = F32(max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))))
            w = x[i] * x[i] if noweights else qw[i]
            sumlx += (w * x[i]) * l
            suml2 += (w * l) * l
        if s == -10:
            scale = sumlx / suml2 if suml2 != 0 else F32(0.0)
            best = scale * sumlx
        elif not (suml2 > 0 and sumlx * sumlx > best * suml2):
            continue
        else:
            scale = sumlx / suml2
            best = scale * sumlx
        for i in range(n):
            L[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) + nmax
    return scale


@njit(cache=True, error_model="numpy")
def make_qx_quants(x, nmax, L, qw, work):
    """make_qx_quants(x: f32[n], nmax: int, L: u8[n] out, qw: f32[n] | f32[0], work) -> float32 scale.

    ggml's make_qx_quants with rmse_type = 1 (the only one llama.cpp's quantizers use): signed levels
    l in [-nmax, nmax-1] for the scale that best fits x under weights qw (qw empty -> w = x*x), tried at
    iscale = -nmax/max and -(nmax + 0.1*is)/max for is = -9..9 (is != 0), strict improvement rule.
    Writes L[i] = l + nmax (0..2*nmax-1). max |x| < 1e-15: L = 0, returns 0. The returned scale is
    usually negative (max maps to -nmax). nmax <= 127.
    """
    n = x.shape[0]
    amax, mx, n_nonfinite = _signed_max(x)
    if amax < GROUP_MAX_EPS:
        return _all_zero(L, n)
    if n_nonfinite:  # NaN/inf: C's nearest_int bit trick decides levels; take the plain port
        return _make_qx_plain(x, nmax, L, qw, mx)
    fn = F32(nmax)
    lo = -fn
    hi = fn - F32(1.0)
    isc = work[0]
    slx = work[1]
    sl2 = work[2]
    # lane 0: the first pass; lanes 1..18: is = -9..-1, 1..9 (C's order)
    isc[0] = F32(-nmax) / mx
    nc = 1
    for s in range(-9, 10):
        if s != 0:
            isc[nc] = -(fn + F32(0.1) * F32(s)) / mx
            nc += 1
    for c in range(nc):
        slx[c] = F32(0.0)
        sl2[c] = F32(0.0)
    noweights = qw.shape[0] == 0
    for i in range(n):
        xi = x[i]
        wi = xi * xi if noweights else qw[i]
        wx = wi * xi
        for c in range(nc):
            l = rint_clamp(isc[c] * xi, lo, hi)
            slx[c] += wx * l
            sl2[c] += (wi * l) * l
    scale = slx[0] / sl2[0] if sl2[0] != 0 else F32(0.0)
    best = scale * slx[0]
    bc = 0
    for c in range(1, nc):
        if sl2[c] > 0 and slx[c] * slx[c] > best * sl2[c]:
            scale = slx[c] / sl2[c]
            best = scale * slx[c]
            bc = c
    ib = isc[bc]
    for i in range(n):
        l = rint_clamp(ib * x[i], lo, hi)
        L[i] = np.uint8(l + fn)
    return scale


@njit(cache=True, error_model="numpy")
def make_q3_quants(x, nmax, L):
    """make_q3_quants(x: f32[n], nmax: int, L: u8[n] out) -> float32 scale.

    ggml's make_q3_quants with do_rmse = true (Q3_K ref, nmax = 4): w = x*x, levels l in [-nmax, nmax-1]
    from iscale = -nmax/max, then up to 5 sweeps of coordinate-wise re-rounding with strict acceptance.
    Writes L[i] = l + nmax. max |x| < 1e-15: L = 0 (NOT offset by nmax, as in C), returns 0.
    """
    return _make_q3(x, np.int64(nmax), L, np.empty((3, x.shape[0]), np.float32))


@njit(cache=True, error_model="numpy")
def _make_q3(x, nmax, L, work):
    """make_q3_quants with scratch work (3 rows of >= n float32): the signed levels are kept as float32
    and w = x*x, w*x are computed once, the same values C recomputes in every sweep."""
    n = x.shape[0]
    amax, mx, _ = _signed_max(x)
    if amax < GROUP_MAX_EPS:
        return _all_zero(L, n)
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    wv = work[0]
    wx = work[1]
    lf = work[2]
    iscale = F32(-nmax) / mx
    _scaled(lf, iscale, x, n)  # |iscale*x| <= nmax unless x is NaN/inf: then C's nearest_int
    for i in range(n):
        lf[i] = rint_clamp(lf[i], lo, hi)
        wv[i] = x[i] * x[i]
        wx[i] = wv[i] * x[i]
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        sumlx += wx[i] * lf[i]
        suml2 += (wv[i] * lf[i]) * lf[i]
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            li = lf[i]
            slx = sumlx - wx[i] * li
            if slx > 0:
                sl2 = suml2 - (wv[i] * li) * li
                new_l = F32(max(-nmax, min(nmax - 1, nearest_int((x[i] * sl2) / slx))))
                if new_l != li:
                    slx += wx[i] * new_l
                    sl2 += (wv[i] * new_l) * new_l
                    if sl2 > 0 and (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        lf[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] = np.uint8(lf[i] + F32(nmax))
    return sumlx / suml2 if suml2 > 0 else F32(0.0)


@njit(cache=True, error_model="numpy")
def make_qp_quants(x, nmax, L, qw):
    """make_qp_quants(x: f32[n], nmax: int, L: u8[n] out, qw: f32[n]) -> float32 scale.

    ggml's make_qp_quants: unsigned levels (<= nmax) for non-negative values (the sub-block scales and
    mins of the imatrix K-quant paths) x ~ scale*L under weights qw: best of iscale = (nmax + 0.1*is)/max,
    is = -4..4, then up to 5 sweeps of coordinate re-rounding. A negative level wraps mod 256 when stored
    into L, and C's later arithmetic reads the wrapped value back; both are reproduced.
    max x < 1e-15: L = 0, returns 0.
    """
    n = x.shape[0]
    mx = F32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        return _all_zero(L, n)
    fn = F32(nmax)
    iscale = fn / mx
    for i in range(n):
        L[i] = np.uint8(nearest_int(iscale * x[i]) & 0xFF)
    scale = F32(1.0) / iscale
    best_mse = F32(0.0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += (qw[i] * diff) * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_is = (F32(0.1) * F32(s) + fn) / mx
        scale_is = F32(1.0) / iscale_is
        mse = F32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(l)
            mse += (qw[i] * diff) * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = np.uint8(l & 0xFF)
        fl = F32(l)
        sumlx += (qw[i] * x[i]) * fl
        suml2 += (qw[i] * fl) * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = F32(L[i])
            slx = sumlx - (w * x[i]) * li
            sl2 = suml2 - (w * li) * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int((x[i] * sl2) / slx))
                if new_l != np.int64(L[i]):
                    fnew = F32(new_l)
                    slx += (w * x[i]) * fnew
                    sl2 += (w * fnew) * fnew
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = np.uint8(new_l & 0xFF)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F32(0.0)
