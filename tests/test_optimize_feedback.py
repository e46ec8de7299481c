"""optimize/feedback.py: GPTQ-style error feedback inside ggml's block formats, refine.py's scale refit and
packing.py's layouts, checked against libggml's own decoder and the standard (libggml-identical) kernels."""

from __future__ import annotations

import numpy as np
import pytest

from ggufkit.errors import QuantizeError
from ggufkit.optimize import packing
from ggufkit.optimize.feedback import quantize_tensor
from ggufkit.optimize.refine import block_error
from ggufkit.quants import registry
from tests.helpers.libggml import ggml_dequantize

TYPES = packing.supported()
ROWS, K = 64, 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """BLAS and numba on one thread: these matrices are small, and threads only wait on a shared machine."""
    from ggufkit.engine.numerics import blas_threads

    with blas_threads(1):
        yield


@pytest.fixture(scope="module")
def data(one_thread):
    """Weights and a correlated input covariance: X = Z (I + noise) with log-normal column scales."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((2048, K))
    x = (z @ (np.eye(K) + 2.4 * rng.standard_normal((K, K)) / np.sqrt(K))) * np.exp(rng.standard_normal(K))
    h = x.T @ x
    w = rng.standard_normal((ROWS, K)).astype(np.float32)
    return w, h


def _herr(w, q, h):
    e = (w - q).astype(np.float64)
    return float(np.sum((e @ h) * e))


@pytest.fixture(scope="module")
def feedback(data):
    w, h = data
    return {t: quantize_tensor(w, t, hessian=h) for t in TYPES}


def test_every_block_format_is_supported():
    assert {"Q4_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q6_K", "IQ4_XS"} <= set(TYPES)
    assert "F16" not in TYPES and "F32" not in TYPES


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_are_valid_blocks_libggml_decodes(qtype, data, feedback):
    w, _ = data
    out = feedback[qtype]
    assert out.dtype == np.uint8 and out.shape == (ROWS, registry.row_bytes(qtype, K))
    ours = registry.dequantize(out, qtype, w.shape)
    theirs = ggml_dequantize(out, qtype, w.shape)
    assert np.array_equal(ours, theirs) and np.all(np.isfinite(theirs))
    # re-encode: the codes and fp16 scales read back from the bytes and written again give the same bytes
    lay = packing.layout(qtype)
    codes = packing.unpack_codes(out, lay)
    assert codes.min() >= 0 and codes.max() < len(lay.table)
    again = out.copy()
    again.reshape(ROWS, -1, lay.ts)[:, :, lay.code_bytes] = 0
    packing.pack_codes(again, codes, lay)
    assert np.array_equal(again, out)
    # every element sits on its block's grid: x = D*t[c] + M with the decoded scales
    d, m = packing.affine(out, lay)
    assert np.allclose(d * lay.table[codes] + m, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())


def test_layout_reads_libggml_codes():
    """packing's code order is libggml's: codes of libggml's Q4_0 / Q6_K blocks decode to its values."""
    from tests.helpers.libggml import ggml_quantize

    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    for qtype in ("Q4_0", "Q6_K"):
        raw = ggml_quantize(x, qtype)
        lay = packing.layout(qtype)
        d, m = packing.affine(raw, lay)
        y = ggml_dequantize(raw, qtype, x.shape)
        assert np.allclose(d * lay.table[packing.unpack_codes(raw, lay)] + m, y, rtol=0, atol=1e-6)


# H-weighted error of feedback / the standard imatrix kernel (importance = diag H) on the data above,
# measured 2026-12-04 (default options): 0.37 (Q8_0) .. 0.59 (Q2_K); asserted with a margin
MAX_RATIO = 0.8


@pytest.mark.parametrize("qtype", TYPES)
def test_feedback_lowers_the_hessian_weighted_error(qtype, data, feedback):
    w, h = data
    std = registry.quantize(w, qtype, importance=np.diag(h).astype(np.float32))
    base = _herr(w, registry.dequantize(std, qtype, w.shape), h)
    ours = _herr(w, registry.dequantize(feedback[qtype], qtype, w.shape), h)
    assert ours < MAX_RATIO * base, (qtype, ours / base)


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_path_is_never_worse(qtype, data):
    w, _ = data
    imp = (np.random.default_rng(5).random(K) ** 4 + 1e-3).astype(np.float32)
    bs = registry.get_format(qtype).block_size
    for importance, weights in ((imp, imp), (None, np.ones(K, np.float32))):
        std = registry.quantize(w, qtype, importance=importance)
        ours = quantize_tensor(w, qtype, importance=importance)
        e_std = block_error(w, registry.dequantize(std, qtype, w.shape), weights, bs)
        e_ours = block_error(w, registry.dequantize(ours, qtype, w.shape), weights, bs)
        assert np.all(e_ours <= e_std)
        assert e_ours.sum() < e_std.sum() or np.array_equal(ours, std)


def test_deterministic_and_options(data, feedback):
    w, h = data
    assert np.array_equal(quantize_tensor(w, "Q4_K", hessian=h), feedback["Q4_K"])
    for kw in ({"act_order": False}, {"refine_scales": True}, {"damp": 0.1}):
        out = quantize_tensor(w, "IQ4_NL", hessian=h, **kw)
        assert np.all(np.isfinite(ggml_dequantize(out, "IQ4_NL", w.shape)))
    # a column no input reached (diag 0) and the [1, k, k] array read_hessian returns
    h0 = h.copy()
    h0[:, 5] = h0[5, :] = 0
    out = quantize_tensor(w, "Q4_0", hessian=h0[None])
    assert np.all(np.isfinite(ggml_dequantize(out, "Q4_0", w.shape)))


def test_bad_input_is_one_clear_error(data):
    w, h = data
    bad = [
        (w[:, :48], "Q4_0", {}),  # not a multiple of the block
        (w, "Q4_K", {"hessian": h[:256, :256]}),  # H of another size
        (w, "Q4_K", {"hessian": h[:, :256]}),  # H not square
        (w, "F16", {}),  # not a block format
        (w, "Q4_0", {"importance": np.ones(3)}),
        (w, "Q4_0", {"importance": np.ones(K), "hessian": h}),
        (w.astype(np.int32), "Q4_0", {}),
    ]
    nan_w = w.copy()
    nan_w[3, 7] = np.nan
    bad.append((nan_w, "Q4_0", {}))
    nan_h = h.copy()
    nan_h[1, 1] = np.inf
    bad.append((w, "Q4_0", {"hessian": nan_h}))
    for x, qtype, kw in bad:
        with pytest.raises(QuantizeError):
            quantize_tensor(x, qtype, **kw)
