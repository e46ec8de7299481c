"""Causal (optionally sliding-window) attention of a group of chunks, as the engine computes it.

Work is cut into independent tasks, one chunk x one kv head x one block of query positions, each two plain
BLAS products around a one-pass softmax (numerics.window_softmax). The tasks run on the engine's threads
(fused.run_tasks) with OpenBLAS on one thread each (fused.blas_single): small products on two BLAS threads
each spend much of their time handing work over between the threads, and on a shared machine waiting for
the second one; independent single-threaded tasks do not wait for each other. Larger blocks go first, so
the threads finish together.
"""

from __future__ import annotations

import numpy as np

from .fused import blas_single, run_tasks
from .numerics import window_softmax


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
    # [C, Hkv, T, g, d]: a block of positions is one contiguous [nb*g, d] matrix per kv head.
    qh = np.ascontiguousarray(q.reshape(C, T, hkv, g, d).transpose(0, 2, 1, 3, 4))
    if scale != 1:
        qh *= np.float32(1.0 / np.sqrt(d)) if scale is None else np.float32(scale)
    kh = np.ascontiguousarray(k.transpose(0, 2, 1, 3))  # [C, Hkv, T, d]
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))  # [C, Hkv, T, dv]
    dv = vh.shape[-1]
    out = np.empty((C, hkv, T, g, dv), np.float32)

    def task(c: int, h: int, b0: int) -> None:
        # Plain 2-D matmuls: numpy's stacked matmul leaves BLAS for strided slices like kh[..., :b1, :].T.
        b1 = min(b0 + block, T)
        k0 = max(0, b0 - window + 1) if window > 0 else 0
        s = qh[c, h, b0:b1].reshape((b1 - b0) * g, d) @ kh[c, h, k0:b1].T  # [nb*g, b1-k0]
        window_softmax(s[None], b0, g, k0, window)
        out[c, h, b0:b1] = (s @ vh[c, h, k0:b1]).reshape(b1 - b0, g, dv)

    tasks = [(c, h, b0) for b0 in reversed(range(0, T, block)) for c in range(C) for h in range(hkv)]
    with blas_single():
        run_tasks(task, tasks)
    return out.transpose(0, 2, 1, 3, 4).reshape(C * T, H * dv)
