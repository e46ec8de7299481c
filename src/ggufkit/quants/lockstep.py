"""The scale searches of a K-quant super-block run together: one SIMD lane per sub-block (kblocks_*.py).

make_qkx_lockstep runs the 8 or 16 independent make_qkx2/qkx3_quants searches of a super-block, and
make_q3_lockstep the 16 make_q3_quants searches of a Q3_K super-block, one lane each; the results are
exactly those of the one-at-a-time helpers in search_qkx.py and search.py (scale, min and levels, signed
zeros included), whose conventions they follow. Levels are rounded with C's nearest_int (rounding.py)
wherever an argument may leave np.rint's exact range.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .rounding import _RINT_LIMIT, F32, _fix_wide, nearest_int, rint_clamp
from .search import GROUP_MAX_EPS


@njit(cache=True, error_model="numpy", inline="always")
def _take_level(f, fn, i, j, xt, wt, lev, sl, sl2, sxl):
    """Level (i, j) of a candidate: f (already exact, or within np.rint's range) rounded and clamped to
    [0, fn], stored, and added to its lane's weighted sums (the summation order of make_qkx2_quants)."""
    zero = F32(0.0)
    l = rint_clamp(f, zero, fn)
    lev[i, j] = l
    wl = wt[i, j] * l
    sl[j] += wl
    sl2[j] += wl * l
    sxl[j] += wl * xt[i, j]


@njit(cache=True, error_model="numpy")
def _qkx_levels_exact(xt, wt, isc, mn, fn, lev, sl, sl2, sxl):
    """make_qkx_lockstep's levels and sums for one candidate with C's nearest_int for every argument
    (the rare case where some |iscale * (x - min)| > 2**22, or NaN/inf)."""
    n = xt.shape[0]
    K = xt.shape[1]
    zero = F32(0.0)
    for i in range(n):
        for j in range(K):
            lev[i, j] = isc[j] * (xt[i, j] - mn[j])
    _fix_wide(lev.reshape(n * K))
    for j in range(K):
        sl[j] = zero
        sl2[j] = zero
        sxl[j] = zero
    for i in range(n):
        for j in range(K):
            _take_level(lev[i, j], fn, i, j, xt, wt, lev, sl, sl2, sxl)


@njit(cache=True, error_model="numpy", inline="always")
def make_qkx_lockstep(xt, wt, nmax, rmin, rdelta, nstep, use_mad, strict, Lt, out_scale, out_min, st, lev):
    """K independent make_qkx2_quants (strict=True) / make_qkx3_quants (strict=False) searches at once.

    make_qkx_lockstep(xt: f32[n, K], wt: f32[n, K], nmax: int, rmin: float, rdelta: float,
    nstep: int, use_mad: bool, strict: bool, Lt: u8[n, K] out, out_scale: f32[K] out, out_min: f32[K] out,
    st: f32[>= 18, K] scratch, lev: f32[n, K] scratch). Search j works on column j (element i at [i, j]);
    the results are exactly those of the one-at-a-time helpers (scale, the_min and levels, signed zeros
    included).

    The K searches are independent, so candidate `is` is tried for all of them together: one SIMD lane per
    search, each lane summing over its elements in order and keeping its own running min (C updates `min`
    when a candidate wins and the later candidates use it). No candidate is skipped here; the speed comes
    from the lanes (a K-quant super-block has 8 or 16 such searches).
    """
    n = xt.shape[0]
    K = xt.shape[1]
    nmax = np.int64(nmax)
    fn = F32(nmax)
    zero = F32(0.0)
    mn, mx, sw, sx, best, scale, dg, dmn = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    isc, sl, sl2, sxl, ts, tm, dd, err = st[8], st[9], st[10], st[11], st[12], st[13], st[14], st[15]
    for j in range(K):
        x0 = xt[0, j]
        mn[j] = x0
        mx[j] = x0
        w0 = wt[0, j]
        sw[j] = w0
        sx[j] = w0 * x0
    for i in range(1, n):
        for j in range(K):
            xi = xt[i, j]
            mn[j] = xi if xi < mn[j] else mn[j]
            mx[j] = xi if xi > mx[j] else mx[j]
            wi = wt[i, j]
            sw[j] += wi
            sx[j] += wi * xi
    for j in range(K):
        if mn[j] > 0:
            mn[j] = zero
        dg[j] = F32(1.0) if ((mx[j] == mn[j]) if strict else (mx[j] <= mn[j])) else zero
        dmn[j] = mn[j]
        isc[j] = fn / (mx[j] - mn[j])
        scale[j] = F32(1.0) / isc[j]
        best[j] = zero
    # the first guess (iscale is inf when max - min is subnormal: C's nearest_int(inf), not rint)
    lev_flat = lev.reshape(n * K)
    n_wide = 0
    for i in range(n):
        for j in range(K):
            f = isc[j] * (xt[i, j] - mn[j])
            lev[i, j] = f
            n_wide += not abs(f) <= _RINT_LIMIT
    if n_wide:
        _fix_wide(lev_flat)
    for i in range(n):
        for j in range(K):
            xi = xt[i, j]
            l = rint_clamp(lev[i, j], zero, fn)
            Lt[i, j] = np.uint8(l)
            diff = scale[j] * l + mn[j] - xi
            best[j] += wt[i, j] * (abs(diff) if use_mad else diff * diff)
    if nstep >= 1:
        frmin = F32(rmin)
        frdelta = F32(rdelta)
        for s in range(nstep + 1):
            r = frmin + frdelta * F32(s) + fn
            for j in range(K):
                isc[j] = r / (mx[j] - mn[j])
                sl[j] = zero
                sl2[j] = zero
                sxl[j] = zero
                err[j] = zero
            # levels and their sums in one pass. Once a fitted min has replaced min(x), x - min can be far
            # outside [0, max - min] (a spike with weight 0), and C's nearest_int then returns its bit
            # trick, not the rounding: if any argument is out of rint's range, redo the pass exactly.
            n_wide = 0
            for i in range(n):
                for j in range(K):
                    f = isc[j] * (xt[i, j] - mn[j])
                    n_wide += not abs(f) <= _RINT_LIMIT
                    _take_level(f, fn, i, j, xt, wt, lev, sl, sl2, sxl)
            if n_wide:
                _qkx_levels_exact(xt, wt, isc, mn, fn, lev, sl, sl2, sxl)
            for j in range(K):
                d = sw[j] * sl2[j] - sl[j] * sl[j]
                a = (sw[j] * sxl[j] - sx[j] * sl[j]) / d
                b = (sl2[j] * sx[j] - sl[j] * sxl[j]) / d
                if b > 0:
                    b = zero
                    a = sxl[j] / sl2[j]
                ts[j] = a
                tm[j] = b
                dd[j] = d
            if use_mad:
                for i in range(n):
                    for j in range(K):
                        err[j] += wt[i, j] * abs(ts[j] * lev[i, j] + tm[j] - xt[i, j])
            else:
                for i in range(n):
                    for j in range(K):
                        diff = ts[j] * lev[i, j] + tm[j] - xt[i, j]
                        err[j] += wt[i, j] * (diff * diff)
            for j in range(K):
                if dd[j] > 0 and err[j] < best[j]:
                    best[j] = err[j]
                    scale[j] = ts[j]
                    mn[j] = tm[j]
                    for i in range(n):
                        Lt[i, j] = np.uint8(lev[i, j])
    for j in range(K):
        if dg[j] != 0:  # max == min (qkx2) / max <= min (qkx3): L = 0, scale 0, the_min = -min
            out_scale[j] = zero
            out_min[j] = -dmn[j]
            for i in range(n):
                Lt[i, j] = 0
        else:
            out_scale[j] = scale[j]
            out_min[j] = -mn[j]


@njit(cache=True, error_model="numpy", inline="always")
def make_q3_lockstep(xt, nmax, Lt, out_scale, st, lf):
    """K independent make_q3_quants searches at once (Q3_K ref: K = 16 sub-blocks of n = 16).

    make_q3_lockstep(xt: f32[n, K], nmax: int, Lt: u8[n, K] out, out_scale: f32[K] out,
    st: f32[>= 8, K] scratch, lf: f32[n, K] scratch). Column j is one search; results equal
    make_q3_quants(xt[:, j], nmax, ...) exactly. The coordinate sweeps run in lockstep over the columns,
    one SIMD lane each, until no column changes (at most 5): a sweep that changes nothing in a column
    leaves its state as it was, so the extra sweeps C would not run for that column change nothing.
    """
    n = xt.shape[0]
    K = xt.shape[1]
    nmax = np.int64(nmax)
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    zero = F32(0.0)
    mx, amax, isc, sumlx, suml2, q, tslx, tsl2 = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    for j in range(K):
        mx[j] = zero
        amax[j] = zero
        sumlx[j] = zero
        suml2[j] = zero
    for i in range(n):
        for j in range(K):
            x = xt[i, j]
            ax = abs(x)
            bigger = ax > amax[j]
            mx[j] = x if bigger else mx[j]
            amax[j] = ax if bigger else amax[j]
    for j in range(K):
        isc[j] = F32(-nmax) / mx[j]
    n_wide = 0
    for i in range(n):  # |iscale*x| <= nmax unless x is NaN/inf: then C's nearest_int
        for j in range(K):
            f = isc[j] * xt[i, j]
            lf[i, j] = f
            n_wide += not abs(f) <= _RINT_LIMIT
    if n_wide:
        _fix_wide(lf.reshape(n * K))
    for i in range(n):
        for j in range(K):
            x = xt[i, j]
            l = rint_clamp(lf[i, j], lo, hi)
            lf[i, j] = l
            w = x * x
            sumlx[j] += (w * x) * l
            suml2[j] += (w * l) * l
    for _ in range(5):
        changed = 0
        for i in range(n):
            for j in range(K):
                x = xt[i, j]
                w = x * x
                li = lf[i, j]
                slx = sumlx[j] - (w * x) * li
                sl2 = suml2[j] - (w * li) * li
                tslx[j] = slx
                tsl2[j] = sl2
                q[j] = (x * sl2) / slx
            n_wide = 0
            for j in range(K):
                n_wide += not abs(q[j]) <= F32(4194303.0)
            if n_wide:  # out of rint's range (or NaN): C's bit trick, exactly
                for j in range(K):
                    if not abs(q[j]) <= F32(4194303.0):
                        q[j] = F32(nearest_int(q[j]))
            for j in range(K):
                x = xt[i, j]
                w = x * x
                li = lf[i, j]
                slx = tslx[j]
                new_l = rint_clamp(q[j], lo, hi)
                slx2 = slx + (w * x) * new_l
                sl22 = tsl2[j] + (w * new_l) * new_l
                accept = (
                    (slx > 0)
                    & (new_l != li)
                    & (sl22 > 0)
                    & ((slx2 * slx2) * suml2[j] > (sumlx[j] * sumlx[j]) * sl22)
                )
                lf[i, j] = new_l if accept else li
                sumlx[j] = slx2 if accept else sumlx[j]
                suml2[j] = sl22 if accept else suml2[j]
                changed += accept
        if changed == 0:
            break
    for j in range(K):
        if amax[j] < GROUP_MAX_EPS:  # all zero: L = 0 (not offset), scale 0
            out_scale[j] = zero
        else:
            out_scale[j] = sumlx[j] / suml2[j] if suml2[j] > 0 else zero
    for i in range(n):
        for j in range(K):
            Lt[i, j] = 0 if amax[j] < GROUP_MAX_EPS else np.uint8(lf[i, j] + F32(nmax))
