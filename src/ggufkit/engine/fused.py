"""The engine's elementwise work in one pass each, on the engine's threads: rms_norm (with the activations'
F16 rounding fused in), SwiGLU (likewise), rope in place, the F16 round trip, the squared-input column sums
of the imatrix observer, and attention's per-head tasks.

Every kernel is numba `nogil` and works on a range of rows; `split_rows` runs it on `threads()` row ranges
at once from a small Python thread pool (the main thread takes the first range). Python threads wait on a
lock when idle, where numba's OpenMP pool spins: on 2 shared cores a spinning pool steals time from the
BLAS threads of the matmul that follows (numerics' module doc). Attention's tasks (one chunk x one kv head,
engine/attention.py) run the same way (`run_tasks`) with OpenBLAS on one thread (`blas_single`), so the
small products of attention never wait on OpenBLAS's thread hand-off. SwiGLU's numpy loops run on row
ranges the same way (they release the GIL).

The numbers are those of the numpy expressions they replace (numerics.rms_norm, numerics.silu, the rope
of LlamaModel._rope, numerics.f16_round), operation for operation in float32, with two differences of
summation order only: rms_norm's sum of squares runs in double from the first column to the last (ggml's
order; numpy's was pairwise), and the observer's column sums add the rows in order.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import threading
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit

MIN_ROWS = 16  # fewer rows than this per thread: run on one thread
_EXP32 = np.uint32(0x7F800000)
_ABS32 = np.uint32(0x7FFFFFFF)
_SIGN32 = np.uint32(0x80000000)
_TWO_POW_24 = np.float32(16777216.0)
_TWO_POW_M24 = np.float32(2.0**-24)
_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def threads() -> int:
    """The engine's thread count: numba's, which numerics.blas_threads sets with BLAS's."""
    return max(1, numba.get_num_threads())


def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pool_lock:
        if n not in _pools:
            _pools[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="ggufkit-engine")
        return _pools[n]


def split_rows(kernel, n_rows: int, *args) -> None:
    """kernel(r0, r1, *args) over rows 0..n_rows in threads() ranges at once."""
    _split(kernel, n_rows, min(threads(), max(1, n_rows // MIN_ROWS)), *args)


def run_tasks(fn, tasks) -> None:
    """fn(*task) for every task, threads() at a time (the main thread works too). The assignment is static
    (thread j runs tasks j, j + t, ...): a product's float order can depend on the thread that runs it, so
    a dynamic queue would make the results depend on timing. Called from inside a task or a row range, it
    runs them all on the calling thread."""
    tasks = list(tasks)
    t = 1 if _busy() else min(threads(), len(tasks))

    def worker(j: int) -> None:
        for task in tasks[j::t]:
            fn(*task)

    _fan_out(worker, [(j,) for j in range(t)])


_local = threading.local()  # .busy: this thread is running a part of a split or of run_tasks


def _busy() -> bool:
    return getattr(_local, "busy", False)


def _marked(fn, *args) -> None:
    """fn(*args) with this thread marked busy: a split inside it runs on this thread (the pool's threads are
    taken by the outer one; waiting on them there would deadlock)."""
    before, _local.busy = _busy(), True
    try:
        fn(*args)
    finally:
        _local.busy = before


def _fan_out(fn, parts: list[tuple]) -> None:
    """fn(*part) for every part at once: the first on the calling thread, the others on the pool."""
    futures = [_pool(len(parts) - 1).submit(_marked, fn, *p) for p in parts[1:]]
    _marked(fn, *parts[0])
    for f in futures:
        f.result()


@functools.cache
def _blas_setter():
    from .numerics import _blas_thread_setter

    return _blas_thread_setter()


@contextmanager
def _blas_count(n: int):
    """OpenBLAS on n threads inside the block, restored after (a process-wide setting)."""
    get, put = _blas_setter()
    if get is None:
        yield
        return
    old = get()
    put(ctypes.c_int(n))
    try:
        yield
    finally:
        put(ctypes.c_int(old))


def blas_single():
    """OpenBLAS on one thread inside the block (for products run from several Python threads at once). The
    setting is process-wide: enter it from the thread that dispatches the tasks, around all of them, never
    from the tasks (one task's exit would restore the thread count while another still multiplies)."""
    return _blas_count(1)


def blas_all():
    """OpenBLAS on the engine's threads() inside the block (a large product inside single_blas)."""
    return _blas_count(threads())


def single_blas(method):
    """Run `method` (a forward pass) with OpenBLAS on one thread: its products go through matmul and
    attention's tasks, which split them between the engine's threads themselves. OpenBLAS's own threads,
    once woken, spin for a while after each product (its THREAD_TIMEOUT) and on 2 cores took a core from
    the threaded work between products; setting the count once per pass, rather than around each
    product, also kept the pass's time steady (docs/benchmarks.md, "Imatrix speed")."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with blas_single():
            return method(*args, **kwargs)

    return run


# -- kernels --------------------------------------------------------------------------------------------
@njit(inline="always")
def _f16rt(y):
    """y (float32) through F16 and back, bit for bit numpy's astype (NaN payloads included), without
    branches so that numba vectorizes the loops around it: a normal half keeps the top 10 mantissa bits,
    rounded to nearest even on the bits; a subnormal half is rint(|y| 2^24) 2^-24 (exact in float32)."""
    u = np.float32(y).view(np.uint32)
    sign = u & _SIGN32
    a = u & _ABS32
    normal = np.uint32((a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000))
    sub = np.float32(np.rint(np.abs(np.float32(y)) * _TWO_POW_24) * _TWO_POW_M24).view(np.uint32)
    sig = (a & np.uint32(0x7FFFFF)) >> np.uint32(13)
    nan = np.uint32(_EXP32 | (max(sig, np.uint32(1)) << np.uint32(13)))
    r = normal if a >= np.uint32(0x38800000) else sub
    r = _EXP32 if a >= np.uint32(0x477FF000) else r
    r = nan if a > _EXP32 else r
    return np.uint32(sign | r).view(np.float32)


@njit(nogil=True, cache=True)
def _round_rows(r0, r1, x, out):
    for r in range(r0, r1):
        for j in range(x.shape[1]):
            out[r, j] = _f16rt(x[r, j])


@njit(nogil=True, cache=True)
def _rms_rows(r0, r1, x, w, eps, out, rnd):
    D = x.shape[1]
    for r in range(r0, r1):
        s = 0.0
        for j in range(D):
            v = x[r, j]
            s += np.float64(v * v)
        mean = np.float32(s / D)
        scale = np.float32(1.0) / np.sqrt(mean + eps)
        for j in range(D):
            out[r, j] = (x[r, j] * scale) * w[j]
        if rnd.shape[0]:
            for j in range(D):
                rnd[r, j] = _f16rt(out[r, j])


@njit(nogil=True, cache=True)
def _rope_rows(r0, r1, x, cos, sin, n_dims, neox):
    """x [chunks, T, heads, d] in place, over the (chunk, position) rows r0..r1 (row = chunk * T + pos)."""
    half = n_dims // 2
    T = x.shape[1]
    for p in range(r0, r1):
        c, t = p // T, p % T
        for h in range(x.shape[2]):
            for i in range(half):
                if neox:
                    a, b = i, i + half
                else:
                    a, b = 2 * i, 2 * i + 1
                x0, x1 = x[c, t, h, a], x[c, t, h, b]
                co, si = cos[t, i], sin[t, i]
                x[c, t, h, a] = x0 * co - x1 * si
                x[c, t, h, b] = x0 * si + x1 * co


@njit(nogil=True, cache=True)
def _colsq_rows(r0, r1, x, out):
    """out[j] += sum over rows r0..r1 of float64(x[r, j]^2 in float32)."""
    for r in range(r0, r1):
        for j in range(x.shape[1]):
            v = x[r, j]
            out[j] += np.float64(v * v)


# -- the operations --------------------------------------------------------------------------------------
def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)


def _maybe(n: int, d: int, want: bool) -> np.ndarray:
    return np.empty((n if want else 0, d), np.float32)


def f16_round(x: np.ndarray) -> np.ndarray:
    """numerics.f16_round on the engine's threads: a new float32 array of x's shape."""
    x = np.asarray(x, dtype=np.float32)
    xr = _rows(x.reshape(1, -1) if x.ndim == 0 else x)
    out = np.empty_like(xr)
    split_rows(_round_rows, xr.shape[0], xr, out)
    return out.reshape(x.shape)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, *, rounded: bool = False):
    """numerics.rms_norm of x [..., D] with weight [D]; rounded=True: (y, y through F16) instead of y."""
    xr = _rows(x)
    n, d = xr.shape
    out, rnd = np.empty((n, d), np.float32), _maybe(n, d, rounded)
    w = np.ascontiguousarray(weight, dtype=np.float32).reshape(d)
    split_rows(_rms_rows, n, xr, w, np.float32(eps), out, rnd)
    if rounded:
        return out.reshape(x.shape), rnd.reshape(x.shape)
    return out.reshape(x.shape)


def swiglu(g: np.ndarray, u: np.ndarray, *, rounded: bool = False):
    """numerics.silu(g) * u, bit for bit (numpy's float32 exp, in place in one temporary), row ranges on the
    engine's threads (numpy's loops release the GIL); rounded=True: (y, y through F16) instead of y."""
    y = np.empty(np.broadcast_shapes(g.shape, u.shape), np.float32)
    y2 = y.reshape(-1, y.shape[-1])
    g2, u2 = (np.broadcast_to(a, y.shape).reshape(y2.shape) for a in (g, u))

    def rows(r0: int, r1: int) -> None:
        out = y2[r0:r1]
        np.negative(g2[r0:r1], out=out)
        np.exp(out, out=out)
        out += np.float32(1.0)
        np.divide(g2[r0:r1], out, out=out)
        out *= u2[r0:r1]

    split_rows(rows, y2.shape[0])
    return (y, f16_round(y)) if rounded else y


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_dims: int, neox: bool) -> np.ndarray:
    """x [..., T, heads, d] (float32) rotated in place over its first n_dims dims; returns x."""
    x4 = x.reshape((-1, *x.shape[-3:]))
    if not np.shares_memory(x4, x):  # a layout reshape cannot view: rotate a copy and write it back
        x[...] = rope(x.copy(), cos, sin, n_dims, neox)
        return x
    cos = np.ascontiguousarray(cos, dtype=np.float32)
    sin = np.ascontiguousarray(sin, dtype=np.float32)
    split_rows(_rope_rows, x4.shape[0] * x4.shape[1], x4, cos, sin, n_dims, neox)
    return x


def _split(kernel, n: int, t: int, *args) -> None:
    """kernel(r0, r1, *args) over 0..n in t ranges at once (one, on this thread, inside another split)."""
    t = 1 if _busy() else max(1, min(t, n))
    bounds = [n * i // t for i in range(t + 1)]
    _fan_out(kernel, [(bounds[i], bounds[i + 1], *args) for i in range(t)])


MIN_PRODUCT_ROWS = 64  # fewer rows than this per thread: one product on BLAS's own threads


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [n, k] @ w.T (w [m, k]) as threads() single-threaded BLAS products over row ranges of x, one per
    thread: OpenBLAS's own threads spin for a while after each product (its THREAD_TIMEOUT), and on 2 cores
    that spinning took a core from the threaded work that follows every product (attention, the fused
    kernels). Each output element is the same dot product in the same order as one BLAS call computes it
    (OpenBLAS splits rows and columns between threads, never the sum), so the result does not depend on the
    split."""
    x = np.asarray(x)
    n = x.shape[0]
    t = min(threads(), n // MIN_PRODUCT_ROWS)
    if t <= 1:
        return x @ w.T
    out = np.empty((n, w.shape[0]), np.result_type(x, w))

    def rows(r0: int, r1: int) -> None:
        np.matmul(x[r0:r1], w.T, out=out[r0:r1])

    with blas_single():
        _split(rows, n, t)
    return out


def column_squares(x: np.ndarray) -> np.ndarray:
    """Column sums of x [..., D]^2: squares in float32, summed in float64 (the imatrix observer's)."""
    xr = _rows(x)
    n, d = xr.shape
    t = 1 if _busy() else min(threads(), max(1, n // MIN_ROWS))
    parts = np.zeros((t, d), np.float64)
    bounds = [n * i // t for i in range(t + 1)]
    _fan_out(_colsq_rows, [(bounds[i], bounds[i + 1], xr, parts[i]) for i in range(t)])
    return parts.sum(axis=0)
