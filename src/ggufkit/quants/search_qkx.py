"""The scale-and-min searches: ggml's make_qkx2_quants (the K-quant ref paths) and make_qkx3_quants (the
imatrix paths, and Q4_1/Q5_1 with importance), bit for bit, under search.py's conventions (x, L, w, work,
float arguments converted to float32 inside).

Their candidates depend on earlier winners (C updates `min`), so they go one candidate at a time; a
candidate whose levels equal the previous one's is skipped (same sums, same error, cannot pass the strict
`<`), and an error sum stops once it reaches the best (weights >= 0 only). The K-quant kernels run the 8 or
16 searches of a super-block together (lockstep.make_qkx_lockstep, with the same results); these serve
single searches. As for search.py: numba's on-disk cache of a caller (legacy) is keyed on the caller's
source file only; after editing this file, delete the callers' cached .nbi/.nbc files.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .rounding import F32, _scaled, rint_clamp
from .search import _all_zero

__all__ = ["make_qkx2_quants", "make_qkx3_quants"]


@njit(cache=True, error_model="numpy")
def _make_qkx(x, w, nmax, L, rmin, rdelta, nstep, use_mad, work, strict_degenerate):
    n = x.shape[0]
    noweights = w.shape[0] == 0
    mn = x[0]
    mx = x[0]
    sum_w = x[0] * x[0] if noweights else w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        xi = x[i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        wi = xi * xi if noweights else w[i]
        sum_w += wi
        sum_x += wi * xi
    if mn > 0:
        mn = F32(0.0)
    if (mx == mn) if strict_degenerate else (mx <= mn):
        return _all_zero(L, n), -mn
    fn = F32(nmax)
    zero = F32(0.0)
    lv = work[0]  # levels of the candidate being tried (as float32)
    xm = work[1]  # x - min for the current min
    wv = work[2]  # the weights
    raw = work[3]  # iscale * (x - min), before rounding
    nonneg = True  # all weights >= 0: partial error sums only grow, so a candidate can be dropped early
    for i in range(n):
        wv[i] = x[i] * x[i] if noweights else w[i]
        nonneg = nonneg and wv[i] >= 0
        xm[i] = x[i] - mn
    iscale = fn / (mx - mn)  # inf when max - min is subnormal
    scale = F32(1.0) / iscale
    best = zero
    _scaled(raw, iscale, xm, n)
    for i in range(n):
        l = rint_clamp(raw[i], zero, fn)
        L[i] = np.uint8(l)
        diff = scale * l + mn - x[i]
        best += wv[i] * (abs(diff) if use_mad else diff * diff)
    if nstep < 1:
        return scale, -mn
    frmin = F32(rmin)
    frdelta = F32(rdelta)
    for s in range(nstep + 1):
        # C's `min` is updated whenever a candidate wins, and the next candidates use it
        iscale = (frmin + frdelta * F32(s) + fn) / (mx - mn)
        # Once a fitted min has replaced min(x), x - min can be far outside [0, max - min] (e.g. a spike
        # with weight 0), and C's nearest_int then returns its bit trick, not the rounded value.
        _scaled(raw, iscale, xm, n)
        changed = 0 if s > 0 else 1
        for i in range(n):
            l = rint_clamp(raw[i], zero, fn)
            changed |= l != lv[i]
            lv[i] = l
        if changed == 0:
            # Same levels as the previous candidate: same sums, same fit, same error; that error did
            # not beat (or already is) the best, and the test is a strict <, so C keeps its state.
            continue
        sum_l = zero
        sum_l2 = zero
        sum_xl = zero
        for i in range(n):
            wl = wv[i] * lv[i]
            sum_l += wl
            sum_l2 += wl * lv[i]
            sum_xl += wl * x[i]
        d = sum_w * sum_l2 - sum_l * sum_l
        if not d > 0:
            continue
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d
        if this_min > 0:
            this_min = zero
            this_scale = sum_xl / sum_l2
        cur = zero
        i = 0
        while i < n:
            end = min(n, i + 8)
            if use_mad:
                for k in range(i, end):
                    cur += wv[k] * abs(this_scale * lv[k] + this_min - x[k])
            else:
                for k in range(i, end):
                    diff = this_scale * lv[k] + this_min - x[k]
                    cur += wv[k] * (diff * diff)
            if nonneg and cur >= best:
                break
            i = end
        if cur < best:
            for k in range(n):
                L[k] = np.uint8(lv[k])
            best = cur
            scale = this_scale
            if this_min != mn:
                for k in range(n):
                    xm[k] = x[k] - this_min
            mn = this_min
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(x, w, nmax, L, rmin, rdelta, nstep, use_mad, work):
    """make_qkx2_quants(x: f32[n], w: f32[n], nmax: int, L: u8[n] out, rmin: float, rdelta: float,
    nstep: int, use_mad: bool, work) -> (scale: float32, the_min: float32).

    ggml's make_qkx2_quants (the K-quant ref paths): asymmetric levels 0..nmax with x ~ scale*L - the_min,
    min = min(0, min x). Candidates iscale = (rmin + rdelta*is + nmax)/(max-min), is = 0..nstep, each
    least-squares fitted (scale, min<=0), kept if its weighted error (|d| if use_mad else d*d) is
    strictly smaller; a winning candidate's min is used by the later candidates (as in C).
    max == min: L = 0, returns (0, -min). the_min is >= 0 (may be -0.0). n <= 64.
    """
    return _make_qkx(
        x, w, np.int64(nmax), L, rmin, rdelta, np.int64(nstep), np.bool_(use_mad), work, np.bool_(True)
    )


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(x, w, nmax, L, rmin, rdelta, nstep, use_mad, work):
    """make_qkx3_quants(x: f32[n], w: f32[n] | f32[0], nmax: int, L: u8[n] out, rmin: float,
    rdelta: float, nstep: int, use_mad: bool, work) -> (scale: float32, the_min: float32).

    ggml's make_qkx3_quants (the imatrix paths, called with rmin=-0.9, rdelta=0.05, nstep=36,
    use_mad=False): as make_qkx2_quants, except w empty -> w = x*x and the degenerate test is max <= min.
    """
    return _make_qkx(
        x, w, np.int64(nmax), L, rmin, rdelta, np.int64(nstep), np.bool_(use_mad), work, np.bool_(False)
    )
