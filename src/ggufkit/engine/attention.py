"""Causal (optionally sliding-window) attention of a group of chunks, as the engine computes it.

Work is cut into independent tasks, one chunk x one kv head each, run threads() at a time from Python threads
(fused.run_tasks: a static assignment) with OpenBLAS on one thread (fused.blas_single, set and restored once
by the calling thread around all the tasks). A task goes block by block through the query positions (128 at a
time): the block's queries against the keys up to its last position (so little more than the causal half is
computed) into the thread's [128*group, T] score matrix, its rows softmaxed in place (numerics.softmax_rows),
times the values. Every product is one single-threaded BLAS call on the same operands whichever thread runs
it, so the result is the same bits on one thread and on two, and from run to run (tests/test_engine_fused.py).
Under OpenBLAS's own two threads these small products spent most of their time in its thread hand-off; one
task per thread keeps both cores on arithmetic.
"""

from __future__ import annotations

import numpy as np

from . import fused
from .numerics import softmax_rows


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float | None = None,
    window: int = 0,
    block: int = 128,
) -> np.ndarray:
    """q [C,T,H,d], k/v [C,T,Hkv,d] -> [C*T, H*dv]. scale: the kq scale, applied to q (1/sqrt(d) by
    default; 1 for a q the graph has already scaled); window > 0: each position sees itself and the
    window - 1 before it. Query head h attends with kv head h // (H / Hkv) (ggml's broadcast in mul_mat)."""
    C, T, H, d = q.shape
    hkv = k.shape[2]
    g = H // hkv
    dv = v.shape[-1]
    mul = np.float32(1.0 / np.sqrt(d)) if scale is None else np.float32(scale)
    out = np.empty((C, T, H * dv), np.float32)
    starts = range(0, T, block)
    blocks = [(b0, min(b0 + block, T), max(0, b0 - window + 1) if window > 0 else 0) for b0 in starts]
    pairs = [(c, h) for c in range(C) for h in range(hkv)]
    t = min(fused.threads(), len(pairs))
    # per thread (run_tasks runs task i on thread i % t): the kv head's queries, scaled, [T*g, d] (a block of
    # positions is then one contiguous matrix), and a block's scores, [128*g, T]
    queries = [np.empty((T, g, d), np.float32) for _ in range(t)]
    scores = [np.empty((min(block, T) * g, T), np.float32) for _ in range(t)]

    def task(i: int, c: int, h: int) -> None:
        qh = queries[i % t]
        if scale != 1:
            np.multiply(q[c, :, h * g : (h + 1) * g], mul, out=qh)
        else:
            qh[...] = q[c, :, h * g : (h + 1) * g]
        qh = qh.reshape(T * g, d)
        kh, vh = k[c, :, h], v[c, :, h]  # [T, d] and [T, dv] with the row stride of k and v: BLAS reads them
        for b0, b1, k0 in blocks:
            s = scores[i % t][: (b1 - b0) * g]  # the block's queries x key positions; it fills k0..b1-1
            np.matmul(qh[b0 * g : b1 * g], kh[k0:b1].T, out=s[:, k0:b1])
            softmax_rows(0, 1, s, b0, g, block, window)
            out[c, b0:b1, h * g * dv : (h + 1) * g * dv] = (s[:, k0:b1] @ vh[k0:b1]).reshape(b1 - b0, g * dv)

    with fused.blas_single():
        fused.run_tasks(task, [(i, c, h) for i, (c, h) in enumerate(pairs)])
    return out.reshape(C * T, H * dv)
