"""How one tensor is quantized: GPTQ-style error feedback inside ggml's block formats (issue 15 item 2a),
with refine.py's scale refinement (item 2b).

quantize_tensor(w, qtype, hessian=H) minimizes tr((W-Q) H (W-Q)^T), H = X^T X of the layer's inputs, the
GPTQ way (Frantar et al. 2022), within one ggml block format:

- The columns are processed one format block at a time (32 columns for the legacy types and IQ4_NL, one
  256-column superblock for the K-quants and IQ4_XS). When a block starts, its scales are fitted on the
  CURRENT weights (the originals plus every error pushed onto them so far) by ggufkit's standard kernel,
  the format's own importance-weighted search with importance diag(H) (byte-identical to libggml's
  imatrix path), optionally refined (refine_scales=True: refine.py, diag(H)-weighted). For the K-quants
  the whole superblock's d, dmin and integer sub-scales are fitted when the superblock starts, so they
  are fixed before any of its columns is rounded.
- Then each column of the block is rounded to its nearest code under those fixed scales, and its error
  is pushed onto the not-yet-quantized columns through the upper Cholesky factor U of H^-1 (H dampened
  by damp * mean(diag H)): err = (w_i - q_i) / U_ii, W[:, j] -= err * U_ij for j > i. The updates are lazy:
  per column only inside its group of 32 columns (a numba kernel, row-parallel), per group inside the
  block batch (>= 128 columns), per batch onto the rest (BLAS matmuls).
- act_order: the format decides which columns share a scale, so columns cannot move between blocks.
  Within that constraint the order is: blocks by descending sum of diag(H), and inside each block the
  columns by descending diag(H) (a superblock's scales are all fixed at its start, so any order inside it
  is allowed). A block's scales are always fitted on its columns in their original positions.
- The codes are packed into the block bytes at the end (packing.py); the scale bytes are the fit's.

Without a hessian, quantize_tensor is the standard kernel with `importance` followed by refine.py:
never worse than the standard kernel in the importance-weighted squared error, block by block.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numba import njit, prange

from ..errors import QuantizeError
from ..quants import registry
from .packing import Layout, affine, layout, pack_codes, supported
from .refine import refine

GROUP = 32  # columns rounded with per-column updates before a group update
BATCH = 128  # at least this many columns per batch update


def _round_group_py(wg, d, m, table, sorted_t, order, linear, u, codes, err):
    """Round the columns of wg [R, g] in order under x = d*t[c] + m, pushing each column's scaled error
    err = (w - q)/u_ii onto the later columns of the group: wg[:, j] -= err * u[i, j]."""
    rows, g = wg.shape
    nlev = table.shape[0]
    for r in prange(rows):
        for i in range(g):
            x = wg[r, i]
            dd = d[r, i]
            c = 0
            if dd != 0.0 and np.isfinite(dd):
                v = (x - m[r, i]) / dd
                if linear:
                    c = int(min(max(np.rint(v), 0.0), nlev - 1.0))
                else:
                    lo, hi = 0, nlev - 1  # first sorted level whose midpoint with the next is >= v
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if v <= 0.5 * (sorted_t[mid] + sorted_t[mid + 1]):
                            hi = mid
                        else:
                            lo = mid + 1
                    c = order[lo]
            q = dd * table[c] + m[r, i]
            codes[r, i] = c
            e = (x - q) / u[i, i]
            err[r, i] = e
            for j in range(i + 1, g):
                wg[r, j] -= e * u[i, j]


_round_group = njit(parallel=True, cache=True)(_round_group_py)  # row-parallel, for tall tensors
_round_group_1 = njit(cache=True)(_round_group_py)  # one thread: a parallel launch costs more than small work
PARALLEL_ROWS = 1024


def _check(w, qtype, hessian, importance) -> tuple[np.ndarray, Layout, np.ndarray | None, np.ndarray | None]:
    try:
        fmt = registry.get_format(qtype)
    except (KeyError, ValueError) as e:
        raise QuantizeError(f"unknown type {qtype!r}: {e}") from None
    if fmt.name not in supported():
        raise QuantizeError(
            f"{fmt.name}: not a block format quantize_tensor takes ({', '.join(supported())})"
        )
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise QuantizeError(f"{fmt.name}: w must be a float [rows, k] array, got {w.dtype} {list(w.shape)}")
    rows, k = w.shape
    if rows == 0 or k == 0 or k % fmt.block_size:
        raise QuantizeError(
            f"{fmt.name}: row length {k} is not a positive multiple of the block size {fmt.block_size}"
        )
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise QuantizeError(f"{fmt.name}: w holds {int((~np.isfinite(w)).sum())} non-finite values")
    if hessian is not None and importance is not None:
        raise QuantizeError(f"{fmt.name}: give a hessian or an importance, not both")
    if hessian is not None:
        h = np.asarray(hessian, dtype=np.float64)
        if h.ndim == 3 and h.shape[0] == 1:
            h = h[0]
        if h.shape != (k, k):
            raise QuantizeError(
                f"{fmt.name}: hessian must be [{k}, {k}] for rows of {k}, got {list(h.shape)}"
            )
        if not np.all(np.isfinite(h)):
            raise QuantizeError(f"{fmt.name}: the hessian holds non-finite values")
        if np.any(np.diag(h) < 0) or not np.allclose(
            h, h.T, rtol=1e-6, atol=1e-9 * max(np.abs(h).max(), 1e-300)
        ):
            raise QuantizeError(f"{fmt.name}: the hessian is not symmetric with a non-negative diagonal")
        hessian = h
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float64)
        if imp.shape != (k,) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise QuantizeError(
                f"{fmt.name}: importance must be {k} finite values >= 0, got shape {list(imp.shape)}"
            )
        importance = imp.astype(np.float32)
    return w, layout(fmt.name), hessian, importance


def quantize_tensor(
    w: np.ndarray,
    qtype: str,
    *,
    hessian: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    damp: float = 0.01,
    act_order: bool = True,
    refine_scales: bool | None = None,
) -> np.ndarray:
    """The ggml block bytes uint8 [rows, row_bytes(qtype, k)] of w (float [rows, k]) in `qtype`.

    hessian: float64 [k, k] = X^T X of the layer's inputs (full symmetric, as calibrate.hessian's
    read_hessian gives it) -> error feedback; importance: [k] (an imatrix row) when there is no hessian;
    neither: the standard kernel without importance, refined with uniform weights. Deterministic.
    refine_scales: refine.py after the standard kernel's search (default: on the importance path only;
    with a hessian it lowered the held-out error on synthetic data but raised it slightly on SmolLM2's,
    docs/benchmarks.md "Optimize: error feedback").
    Raises QuantizeError on a type without blocks of codes and scales, a row length that is not a
    multiple of the block size, non-finite values, or a hessian / importance of the wrong shape.
    """
    w, lay, h, imp = _check(w, qtype, hessian, importance)
    if h is None:
        data = registry.quantize(w, lay.name, importance=imp)
        if refine_scales is None or refine_scales:
            data = refine(w, np.ones(w.shape[1], np.float32) if imp is None else imp, data, lay)
        return data
    return _feedback(w, lay, h, damp=damp, act_order=act_order, refine_scales=bool(refine_scales))


def _order(diag: np.ndarray, bs: int, act_order: bool) -> np.ndarray:
    k = diag.size
    if not act_order:
        return np.arange(k)
    per_block = diag.reshape(-1, bs)
    blocks = np.argsort(-per_block.sum(axis=1), kind="stable")
    inner = np.argsort(-per_block, axis=1, kind="stable")
    return (blocks[:, None] * bs + inner[blocks]).reshape(k)


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with U^T U = (H + damp*mean(diag H)*I)^-1; dead columns (diag 0) get diag 1 first.

    With J the reversal permutation and J H J = L L^T (lower L): H^-1 = (J L^-T J)(J L^-1 J), and
    J L^-1 J is upper with a positive diagonal, so it is U: one Cholesky factorization and one inverse.
    """
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    rev = h[::-1, ::-1]
    for attempt in range(6):
        try:
            low = np.linalg.cholesky(rev + np.eye(h.shape[0]) * (damp * mean * 10.0**attempt))
        except np.linalg.LinAlgError:
            continue
        return np.ascontiguousarray(_lower_inverse(low)[::-1, ::-1])
    raise QuantizeError("the hessian stays singular after dampening")


def _lower_inverse(low: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix, by halves: [[A, 0], [C, B]]^-1 = [[A^-1, 0],
    [-B^-1 C A^-1, B^-1]] (matmuls; a general inverse costs six times the flops)."""
    n = low.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(low))
    m = n // 2
    a, b = _lower_inverse(low[:m, :m]), _lower_inverse(low[m:, m:])
    out = np.zeros_like(low)
    out[:m, :m], out[m:, m:] = a, b
    out[m:, :m] = -b @ (low[m:, :m] @ a)
    return out


def _factor(h: np.ndarray, damp: float, perm: np.ndarray) -> np.ndarray:
    """_inverse_cholesky of H permuted, float32; the last few are kept, keyed by H's bytes, damp and the
    order, as one tensor is often quantized to several types in a row (optimize/allocate.py)."""
    key = (hashlib.blake2b(h.tobytes(), digest_size=16).digest(), float(damp), perm.tobytes())
    if key not in _FACTORS:
        if len(_FACTORS) >= 4:
            _FACTORS.pop(next(iter(_FACTORS)))
        _FACTORS[key] = _inverse_cholesky(h[np.ix_(perm, perm)], damp).astype(np.float32)
    return _FACTORS[key]


_FACTORS: dict = {}


def _fit(cur: np.ndarray, lay: Layout, imp: np.ndarray, refine_scales: bool) -> np.ndarray:
    data = registry.quantize(np.ascontiguousarray(cur), lay.name, importance=imp)
    return refine(cur, imp, data, lay) if refine_scales else data


def _feedback(
    w, lay: Layout, h: np.ndarray, *, damp: float, act_order: bool, refine_scales: bool
) -> np.ndarray:
    rows, k = w.shape
    bs, ts = lay.bs, lay.ts
    diag = np.diag(h).copy()
    imp = diag.astype(np.float32)
    perm = _order(diag, bs, act_order)
    u = _factor(h, damp, perm)
    wp = np.ascontiguousarray(w[:, perm])
    codes = np.empty((rows, k), np.uint8)  # codes < 256 (Q8_0 has the most levels)
    out = np.empty((rows, k // bs * ts), np.uint8)
    sorted_t = lay.table[lay.order]
    batch = max(bs, BATCH // bs * bs)
    g = min(bs, GROUP)
    for b0 in range(0, k, batch):
        b1 = min(b0 + batch, k)
        wb = np.ascontiguousarray(wp[:, b0:b1])
        eb = np.empty_like(wb)
        for f0 in range(b0, b1, bs):
            blk = perm[f0] // bs
            local = perm[f0 : f0 + bs] - blk * bs  # original in-block position of each processed column
            cur = np.empty((rows, bs), np.float32)
            cur[:, local] = wb[:, f0 - b0 : f0 - b0 + bs]
            data = _fit(cur, lay, imp[blk * bs : (blk + 1) * bs], refine_scales)
            out[:, blk * ts : (blk + 1) * ts] = data
            dd, mm = affine(data, lay)
            dd, mm = dd[:, local], mm[:, local]
            for g0 in range(f0, f0 + bs, g):
                s = slice(g0 - b0, g0 - b0 + g)
                wg = np.ascontiguousarray(wb[:, s])
                cg = np.empty((rows, g), np.uint8)
                eg = np.empty((rows, g), np.float32)
                cols = slice(g0 - f0, g0 - f0 + g)
                ug = np.ascontiguousarray(u[g0 : g0 + g, g0 : g0 + g])
                dg, mg = np.ascontiguousarray(dd[:, cols]), np.ascontiguousarray(mm[:, cols])
                (_round_group if rows >= PARALLEL_ROWS else _round_group_1)(
                    wg, dg, mg, lay.table, sorted_t, lay.order, lay.linear, ug, cg, eg
                )
                codes[:, perm[g0 : g0 + g]] = cg
                eb[:, s] = eg
                if g0 + g < b1:
                    wb[:, g0 - b0 + g :] -= eg @ u[g0 : g0 + g, g0 + g : b1]
        if b1 < k:
            wp[:, b1:] -= eb @ u[b0:b1, b1:]
    pack_codes(out, codes, lay)
    return out
