"""Importance-weighted refinement of a block's float scales, beyond llama.cpp's search (issue 15 item 2b).

llama.cpp's imatrix quantizers search a block's scale on a grid of candidate inverse scales and keep the
integer sub-scales (K-quants) they derive; the fp16 d (and dmin / m) they store is then the rounded result
of that search, not the weighted least-squares optimum for the codes they chose. Here, with every element
x = sum_j f_j * (D_j*t[c] + M_j) linear in the block's fp16 float fields f_j (packing.Layout.floats:
d, and dmin or m), and the integer sub-scales and codes held:

    1. f = the weighted least-squares optimum for the current codes (1 or 2 unknowns per block),
       rounded to fp16;
    2. every code re-rounded to the nearest value under the new scales;
    3. repeat (`iters` times), keeping each block's best weighted error seen.

Finally each block keeps whichever of (the given blocks, the refined blocks) has the lower weighted error,
measured on the bytes' actual decode, so the result is never worse than the input block by block. The
sub-scales (6-bit, 4-bit, int8) are not changed.
"""

from __future__ import annotations

import numpy as np

from ..quants import registry
from .packing import Layout, affine, nearest, pack_codes, unpack_codes


def _floats_of(data: np.ndarray, lay: Layout) -> np.ndarray:
    """The float fields of every block: float64 [n, nblocks, nf]."""
    n = data.shape[0]
    blocks = data.reshape(n, -1, lay.ts)
    return np.stack(
        [blocks[:, :, o : o + 2].copy().view(np.float16)[..., 0].astype(np.float64) for o in lay.floats],
        axis=-1,
    )


def _set_floats(data: np.ndarray, f: np.ndarray, lay: Layout) -> None:
    blocks = data.reshape(data.shape[0], -1, lay.ts)
    for j, o in enumerate(lay.floats):
        blocks[:, :, o : o + 2] = f[..., j].astype(np.float16)[..., None].view(np.uint8)


def _basis(data: np.ndarray, lay: Layout) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each float field j: (D_j, M_j) with f_j = 1 and the other float fields 0."""
    n, nb = data.shape[0], data.shape[1] // lay.ts
    out = []
    for j in range(len(lay.floats)):
        unit = data.copy()
        f = np.zeros((n, nb, len(lay.floats)))
        f[..., j] = 1.0
        _set_floats(unit, f, lay)
        out.append(affine(unit, lay))
    return out


def block_error(x: np.ndarray, q: np.ndarray, w: np.ndarray, bs: int) -> np.ndarray:
    """sum w*(x-q)^2 per block: float64 [n, nblocks]."""
    d = (x.astype(np.float64) - q) ** 2 * w
    return d.reshape(x.shape[0], -1, bs).sum(axis=-1)


def refine(x: np.ndarray, w: np.ndarray, data: np.ndarray, lay: Layout, *, iters: int = 4) -> np.ndarray:
    """Blocks at least as good as `data` (uint8 [n, nblocks*ts]) for float32 x [n, k] under weights
    w ([k] or [n, k], >= 0): refined float scales and re-rounded codes where that lowers the error."""
    n, k = x.shape
    nb, bs = k // lay.bs, lay.bs
    xb = x.astype(np.float64).reshape(n, nb, bs)
    wb = np.broadcast_to(w, (n, k)).astype(np.float64).reshape(n, nb, bs)
    basis = [(dj.reshape(n, nb, bs), mj.reshape(n, nb, bs)) for dj, mj in _basis(data, lay)]
    f = _floats_of(data, lay)
    codes = unpack_codes(data, lay).reshape(n, nb, bs)
    best_f, best_c = f.copy(), codes.copy()
    best_e = np.full((n, nb), np.inf)
    nf = len(basis)
    for it in range(iters + 1):
        D = sum(f[..., j, None] * basis[j][0] for j in range(nf))
        M = sum(f[..., j, None] * basis[j][1] for j in range(nf))
        if it:  # re-round under the new scales (the first pass scores the given codes)
            with np.errstate(divide="ignore", invalid="ignore"):
                codes = nearest((xb - M) / D, lay)
        err = (wb * (xb - (D * lay.table[codes] + M)) ** 2).sum(axis=-1)
        better = err < best_e
        best_e = np.where(better, err, best_e)
        best_f[better], best_c[better] = f[better], codes[better]
        if it == iters:
            break
        feats = [dj * lay.table[codes] + mj for dj, mj in basis]  # x ~ sum_j f_j * feats_j
        g = np.array([[(wb * a * b).sum(-1) for b in feats] for a in feats])  # [nf, nf, n, nb]
        r = np.array([(wb * a * xb).sum(-1) for a in feats])  # [nf, n, nb]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if nf == 1:
                sol = (r[0] / g[0, 0])[..., None]
            else:
                det = g[0, 0] * g[1, 1] - g[0, 1] * g[1, 0]
                sol = np.stack(
                    [(r[0] * g[1, 1] - r[1] * g[0, 1]) / det, (g[0, 0] * r[1] - g[1, 0] * r[0]) / det], -1
                )
            sol16 = sol.astype(np.float16).astype(np.float64)
        ok = np.all(np.isfinite(sol16), axis=-1)
        f = np.where(ok[..., None], sol16, f)
    out = data.copy()
    _set_floats(out, best_f, lay)
    pack_codes(out, best_c.reshape(n, k), lay)
    # keep, block by block, the lower error of the two on their actual decode
    e_old = block_error(x, registry.dequantize(data, lay.name, (n, k)), wb.reshape(n, k), bs)
    e_new = block_error(x, registry.dequantize(out, lay.name, (n, k)), wb.reshape(n, k), bs)
    keep = ~(e_new < e_old)
    ob, db = out.reshape(n, nb, lay.ts), data.reshape(n, nb, lay.ts)
    ob[keep] = db[keep]
    return out
