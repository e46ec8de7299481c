"""engine/fused.py and engine/attention.py against the numpy expressions they replace (synthetic data, fast).

The whole engine against llama.cpp is tests/test_engine.py's; here each fused kernel is held to the plain
numpy it stands for, bit for bit where it computes the same float32 operations in the same order, on one
thread and on two."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from ggufkit.engine import fused
from ggufkit.engine.attention import attention
from ggufkit.engine.numerics import blas_threads, exp32, softmax_rows

RNG = np.random.default_rng(7)


@njit
def _exp_rows(x, out):
    for i in range(x.shape[0]):
        out[i] = exp32(x[i])


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _astype_round(x):
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def _numpy_rms_norm(x, w, eps):
    """ggml's rms_norm in numpy, with the squares summed in double in column order (ggml's order)."""
    sq = np.square(x, dtype=np.float32).astype(np.float64)
    s = np.zeros(sq.shape[:-1])
    for j in range(x.shape[-1]):
        s += sq[..., j]
    ms = (s / x.shape[-1]).astype(np.float32)[..., None]
    return x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps))) * w


def _numpy_rope(x, cos, sin, nd, neox):
    c, s = cos[:, None, :], sin[:, None, :]
    x = x.copy()
    if neox:
        x0, x1 = x[..., : nd // 2].copy(), x[..., nd // 2 : nd].copy()
        x[..., : nd // 2], x[..., nd // 2 : nd] = x0 * c - x1 * s, x0 * s + x1 * c
    else:
        x0, x1 = x[..., 0:nd:2].copy(), x[..., 1:nd:2].copy()
        x[..., 0:nd:2], x[..., 1:nd:2] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    with blas_threads(request.param):
        yield request.param


def test_f16_round_on_every_kind_of_float(threads):
    u = RNG.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    near = (np.arange(1 << 16, dtype=np.uint32) << 13)[:, None] + np.array(
        [0, 1, 0xFFF, 0x1000, 0x1001], np.uint32
    )
    x = np.concatenate([u, near.ravel(), near.ravel() | np.uint32(0x80000000)]).view(np.float32)
    x = x[: x.size // 33 * 33].reshape(-1, 33)  # rows of an odd width
    np.testing.assert_array_equal(_bits(fused.f16_round(x)), _bits(_astype_round(x)))


def test_rms_norm_and_its_rounding(threads):
    for shape in [(300, 576), (2, 50, 9, 64), (1, 7)]:
        x = (RNG.standard_normal(shape) * RNG.uniform(1e-3, 300)).astype(np.float32)
        w = RNG.standard_normal(shape[-1]).astype(np.float32)
        y, yr = fused.rms_norm(x, w, 1e-5, rounded=True)
        np.testing.assert_array_equal(_bits(y), _bits(_numpy_rms_norm(x, w, 1e-5)))
        np.testing.assert_array_equal(_bits(yr), _bits(_astype_round(y)))
        np.testing.assert_array_equal(_bits(fused.rms_norm(x, w, 1e-5)), _bits(y))
        assert y.shape == shape


def test_swiglu_is_silu_times_up(threads):
    g = (RNG.standard_normal((257, 1536)) * 6).astype(np.float32)
    u = RNG.standard_normal((257, 1536)).astype(np.float32)
    y, yr = fused.swiglu(g[:, :1000], u[:, :1000], rounded=True)  # strided views in
    want = g[:, :1000] / (np.float32(1.0) + np.exp(-g[:, :1000])) * u[:, :1000]
    np.testing.assert_array_equal(_bits(y), _bits(want))
    np.testing.assert_array_equal(_bits(yr), _bits(_astype_round(want)))


@pytest.mark.parametrize("neox", [False, True])
def test_rope_in_place_on_a_strided_view(threads, neox):
    C, T, H, d, nd = 2, 40, 3, 16, 12  # rope over 12 of 16 dims
    cos = RNG.standard_normal((T, nd // 2)).astype(np.float32)
    sin = RNG.standard_normal((T, nd // 2)).astype(np.float32)
    buf = RNG.standard_normal((C * T, H * d + 10)).astype(np.float32)
    before = buf.copy()
    view = buf[:, : H * d].reshape(C, T, H, d)  # a column slice of a wider product, as the engine's q
    want = _numpy_rope(view, cos, sin, nd, neox)
    assert fused.rope(view, cos, sin, nd, neox) is view
    np.testing.assert_array_equal(_bits(view), _bits(want))
    np.testing.assert_array_equal(buf[:, H * d :], before[:, H * d :])


def test_column_squares(threads):
    x = (RNG.standard_normal((1000, 96)) * 50).astype(np.float32)
    want = np.square(x, dtype=np.float32).astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(fused.column_squares(x), want, rtol=1e-12)


@pytest.mark.parametrize("window", [0, 37])
def test_attention_tasks_against_float64(threads, window):
    C, T, H, hkv, d = 2, 150, 6, 2, 16
    q = RNG.standard_normal((C, T, H, d)).astype(np.float32)
    k = RNG.standard_normal((C, T, hkv, d)).astype(np.float32)
    v = RNG.standard_normal((C, T, hkv, d)).astype(np.float32)
    got = attention(q, k, v, window=window, block=64).reshape(C, T, H, d)
    pos = np.arange(T)
    seen = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < window) if window else True)
    for c in range(C):
        for h in range(H):
            s = q[c, :, h].astype(np.float64) @ k[c, :, h // (H // hkv)].T.astype(np.float64) / np.sqrt(d)
            s = np.where(seen, s, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            want = (p / p.sum(axis=1, keepdims=True)) @ v[c, :, h // (H // hkv)]
            np.testing.assert_allclose(got[c, :, h], want, rtol=0, atol=2e-6)
    for _ in range(3):  # the same bits every time
        again = attention(q, k, v, window=window, block=64).reshape(C, T, H, d)
        np.testing.assert_array_equal(again.view(np.uint32), got.view(np.uint32))
    with blas_threads(3 - threads):  # and on the other thread count
        other = attention(q, k, v, window=window, block=64).reshape(C, T, H, d)
    np.testing.assert_array_equal(other.view(np.uint32), got.view(np.uint32))


def test_exp32_is_exp_correctly_rounded():
    """numerics.exp32 against float64's exp rounded once to float32, on every float32 in [-1, 0] with a
    stride, random draws down to -110, the edges of the float32 range (subnormal results, 0 below), and the
    float32 just either side of the points where the range reduction changes n."""
    every = np.arange(0xBF800000, 0x80000000, -97, dtype=np.int64).astype(np.uint32)
    draws = -(RNG.random(3_000_000) * 110).astype(np.float32)
    steps = (np.arange(-160, 1) + 0.5) * np.log(2)
    near = np.concatenate([np.nextafter(steps.astype(np.float32), s) for s in (-np.inf, np.inf)])
    edges = np.array([0, -0.0, -1e-30, -87.3, -87.4, -103.2, -103.3, -103.98, -104, -120, -1e4, -np.inf])
    x = np.concatenate([every.view(np.float32), draws, near[near <= 0], edges.astype(np.float32)])
    got = np.empty_like(x)
    _exp_rows(x, got)
    want = np.exp(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("window", [0, 5, 300])
def test_softmax_rows_in_the_attention_layout(window):
    """Rows of s [T*g, T] against a float64 softmax over the keys each query sees; the row's other columns
    inside its block are 0 and the columns outside the block's keys are untouched."""
    T, g, block = 300, 3, 64
    s = (RNG.standard_normal((T * g, T)) * 8).astype(np.float32)
    got = s.copy()
    softmax_rows(0, 1, got, 0, g, block, window)
    split = s.copy()
    fused.run_tasks(softmax_rows, [(j, 3, split, 0, g, block, window) for j in range(3)])
    later = s[g * 2 * block :].copy()  # the rows from position 2 * block on, as a block's own matrix
    softmax_rows(0, 1, later, 2 * block, g, block, window)
    np.testing.assert_array_equal(_bits(later), _bits(got[g * 2 * block :]))
    np.testing.assert_array_equal(_bits(split), _bits(got))  # rows are independent
    for r in range(T * g):
        pos = r // g
        b0 = pos - pos % block
        k0 = max(0, b0 - window + 1) if window else 0
        lo = max(0, pos - window + 1) if window else 0
        e = np.exp((s[r, lo : pos + 1] - s[r, lo : pos + 1].max()).astype(np.float64))  # float32 difference
        np.testing.assert_allclose(got[r, lo : pos + 1], e / e.sum(), rtol=2.5e-7, atol=1e-38)
        assert not got[r, k0:lo].any() and not got[r, pos + 1 : min(b0 + block, T)].any()
        outside = np.r_[0:k0, min(b0 + block, T) : T]
        np.testing.assert_array_equal(_bits(got[r, outside]), _bits(s[r, outside]))


@pytest.mark.parametrize("n", [1, 63, 130, 1000])
def test_matmul_split_by_rows_is_one_blas_call(threads, n):
    """fused.matmul (row ranges, one single-threaded BLAS call each) gives the bits of x @ w.T as one BLAS
    call gives them on the engine's threads, and on one: each element is the same dot product in the same
    order (the module's claim; a BLAS that split the sum would fail here)."""
    for k, m in [(576, 192), (1536, 576), (64, 3000)]:
        x = RNG.standard_normal((n, k), dtype=np.float32)
        w = RNG.standard_normal((m, k), dtype=np.float32)
        got = fused.matmul(x, w)
        np.testing.assert_array_equal(_bits(got), _bits(x @ w.T))
        with blas_threads(3 - threads):
            np.testing.assert_array_equal(_bits(got), _bits(x @ w.T))


@pytest.mark.parametrize("weight_type", ["Q4_K", "Q8_0"])  # activations rounded to Q8_K and to Q8_0
def test_activation_rounding_on_row_ranges(weight_type):
    """numerics.round_activations splits rows between the engine's threads: the same bits as on one thread,
    and rows that are not whole Q8_K blocks (576 wide) are rounded whole."""
    from ggufkit.engine.numerics import round_activations
    from ggufkit.gguf.types import GGMLQuantizationType

    t = GGMLQuantizationType[weight_type]
    for width in (576, 1536):
        x = (RNG.standard_normal((300, width)) * RNG.uniform(0.1, 50, (300, 1))).astype(np.float32)
        x[3, :64] = 0.0
        with blas_threads(1):
            one = round_activations(x, t)
        with blas_threads(2):
            two = round_activations(x, t)
        np.testing.assert_array_equal(_bits(two), _bits(one))
