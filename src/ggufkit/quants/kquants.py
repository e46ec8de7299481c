"""K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: quantize and dequantize, byte-identical to libggml.

A super-block is QK_K = 256 weights. Without importance weights each follows the type's
quantize_row_*_ref in ggml-quants.c; with them, quantize_row_*_impl (the imatrix algorithm). Both work
super-block by super-block (the impl paths' sigma2 is taken over the super-block, and importance[k]
weights column k of every row). Quantizing is one numba kernel for all five types (one compile, cached),
run over row chunks on numba.get_num_threads() threads (the kernel releases the GIL). Dequantizing is
vectorized numpy: elementwise float32 products in C's order, nothing to compile (kdequant.py). The block
quantizers and their bit layouts are in kblocks_min.py and kblocks_signed.py (shared pieces: kblocks.py);
this module runs them over blocks and rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .kblocks import QK_K, _kernel
from .kblocks_min import _q2k_block, _q45k_block
from .kblocks_signed import _q3k_block, _q6k_block
from .kdequant import DEQUANTIZE as _DEQUANTIZE
from .registry import FORMATS, names, register
from .search import MAX_LANES


def _id(name: str) -> int:
    return int(FORMATS[name].ggml_type)


# _quantize_blocks switches on the ggml type id (native/build.py passes gk_run's on as it is)
Q2_K = _id("Q2_K")
Q3_K = _id("Q3_K")
Q5_K = _id("Q5_K")
Q6_K = _id("Q6_K")


@_kernel
def _quantize_blocks(t, xb, qw, out):
    """Super-blocks xb [nb, 256] of ggml type id t -> out [nb, type_size]; qw [row_blocks, 256] importance
    (0 rows: none).
    xb must start at a row boundary so that block b takes importance row b % row_blocks."""
    nbr = qw.shape[0]
    noq = np.empty(0, np.float32)
    work = np.empty((8, MAX_LANES), np.float32)
    L = np.empty(QK_K, np.uint8)
    w = np.empty(32, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.uint8)
    Lm = np.empty(16, np.uint8)
    wfull = np.empty(QK_K, np.float32)
    sc = (
        np.empty(QK_K, np.float32),
        np.empty(QK_K, np.float32),
        np.empty(QK_K, np.uint8),
        np.empty((18, 16), np.float32),
        np.empty(QK_K, np.float32),
    )  # make_qkx_lockstep / make_q3_lockstep scratch
    for b in range(xb.shape[0]):
        x = xb[b]
        y = out[b]
        q = qw[b % nbr] if nbr > 0 else noq
        if t == Q2_K:
            _q2k_block(x, q, y, L, wfull, sc, scales, mins, sw, Ls, Lm)
        elif t == Q3_K:
            _q3k_block(x, q, y, L, w, work, scales, sw, Ls, sc)
        elif t == Q6_K:
            _q6k_block(x, q, y, L, work, scales)
        else:
            _q45k_block(x, q, t == Q5_K, y, L, wfull, sc, scales, mins, sw, Ls, Lm)


# ---------------------------------------------------------------------------------------------------
# registration

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, thread_name_prefix="ggufkit-kquants")
    return _POOL


def _rows(name):
    t, type_size = _id(name), FORMATS[name].type_size
    dequantize = _DEQUANTIZE[name]

    def quantize_rows(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        n_rows, n_per_row = x.shape
        qw = np.empty((0, QK_K), np.float32) if importance is None else importance.reshape(-1, QK_K)
        out = np.empty((n_rows, n_per_row // QK_K * type_size), dtype=np.uint8)
        n_threads = min(numba.get_num_threads(), n_rows)
        bounds = np.linspace(0, n_rows, n_threads + 1).astype(int) if n_threads > 1 else [0, n_rows]

        def run(i):  # a chunk of whole rows: block b of the chunk takes importance row b % blocks_per_row
            r0, r1 = bounds[i], bounds[i + 1]
            _quantize_blocks(t, x[r0:r1].reshape(-1, QK_K), qw, out[r0:r1].reshape(-1, type_size))

        if len(bounds) > 2:
            list(_pool().map(run, range(len(bounds) - 1)))
        else:
            run(0)
        return out

    def dequantize_rows(data: np.ndarray, n_per_row: int) -> np.ndarray:
        return dequantize(data.reshape(-1, type_size)).reshape(data.shape[0], n_per_row)

    return quantize_rows, dequantize_rows


for _name in names(kernels="kquants"):
    _qr, _dqr = _rows(_name)
    register(_name, quantize_rows=_qr, dequantize_rows=_dqr, uses_importance=True)
