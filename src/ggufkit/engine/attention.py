"""Causal (optionally sliding-window) attention of a group of chunks, as the engine computes it.

Work is cut into independent tasks, one chunk x one kv head x one block of query positions, each two plain
BLAS products (on the engine's BLAS threads) around a one-pass softmax (numerics.window_softmax), run one
after the other. Running them two at a time from Python threads with OpenBLAS on one thread each
(fused.run_tasks, fused.blas_single) was 16x faster under heavy load, but it changes the float order of
the products (another draw of the rounding noise) and its determinism was not established in time (a
check that seemed to show otherwise was fooled by the in-place scaling fixed below), so the tasks stay
serial and give the former engine's numbers bit for bit.
"""

from __future__ import annotations

import numpy as np

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
        if np.shares_memory(qh, q):  # one kv head: the transpose was already contiguous, a view of q
            qh = qh.copy()
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

    for c in range(C):
        for h in range(hkv):
            for b0 in range(0, T, block):
                task(c, h, b0)
    return out.transpose(0, 2, 1, 3, 4).reshape(C * T, H * dv)
