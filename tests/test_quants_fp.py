"""F32, F16, BF16 and the fp16 scalar helpers every block format uses, against libggml, every run."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from ggufkit.quants import dequantize, quantize
from ggufkit.quants.fp import fp16_bits_to_fp32, fp32_to_fp16_bits
from tests.helpers.libggml import ggml_dequantize, ggml_quantize
from tests.helpers.quant_data import assert_same_bytes, assert_same_floats, hostile_cases, importance_rows


def _f32_probe() -> np.ndarray:
    """float32 bit patterns around every fp16 / bf16 rounding boundary, plus 2M random patterns."""
    h = np.arange(0x7C01, dtype=np.uint32)  # every finite non-negative half (and the first NaN)
    as_f32 = h.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    halfway = (as_f32[:-1].astype(np.uint64) + as_f32[1:]) // 2  # the tie between two neighbours
    near = (halfway[:, None] + np.arange(-2, 3, dtype=np.int64)[None, :]).reshape(-1)
    bf16_ties = (np.arange(1 << 16, dtype=np.uint64) << 16)[:, None] + np.array([0x7FFF, 0x8000, 0x8001])
    rng = np.random.default_rng(5)
    rand = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64)
    special = np.array(
        [
            0x00000000,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0xFFBFFFFF,
            0x7FFFFFFF,
            0x00000001,
            0x807FFFFF,
            0x477FF000,
            0x477FEFFF,
            0xC77FF000,
            0x33000000,
            0x33000001,
            0x7F7FFFFF,
            0xFF7FFFFF,
        ],
        dtype=np.uint64,
    )
    u = np.concatenate([as_f32, near, bf16_ties.reshape(-1), rand, special]).astype(np.uint64)
    u = np.concatenate([u, u | 0x80000000]) & 0xFFFFFFFF
    u = u.astype(np.uint32)
    return u[: u.size // 64 * 64].view(np.float32).reshape(-1, 64)


PROBE = _f32_probe()


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_conversion_matches_libggml_on_every_boundary(qtype):
    ref = ggml_quantize(PROBE, qtype)
    assert_same_bytes(quantize(PROBE, qtype), ref, 2, qtype)


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_every_16bit_pattern_dequantizes_like_libggml(qtype):
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(256, 512)
    assert_same_floats(dequantize(raw, qtype, (256, 256)), ggml_dequantize(raw, qtype, (256, 256)), qtype)


def test_f32_is_a_copy_like_libggml():
    x = PROBE[:1000]  # NaN payloads and signed zeros must survive
    ref = ggml_quantize(x, "F32")
    assert_same_bytes(quantize(x, "F32"), ref, 4, "F32")
    assert_same_floats(dequantize(ref, "F32", x.shape), ggml_dequantize(ref, "F32", x.shape), "F32")


@njit
def _scalar_f32_to_f16(x, out):
    for i in range(x.size):
        out[i] = fp32_to_fp16_bits(x[i])


@njit
def _scalar_f16_to_f32(h, out):
    for i in range(h.size):
        out[i] = fp16_bits_to_fp32(h[i])


def test_numba_scalar_fp16_helpers_match_libggml():
    # the kernels of legacy.py and iq4.py store and read their scales through these two
    x = PROBE.reshape(-1)
    ours = np.empty(x.size, np.uint16)
    _scalar_f32_to_f16(x, ours)
    assert_same_bytes(
        ours.view(np.uint8).reshape(PROBE.shape[0], -1), ggml_quantize(PROBE, "F16"), 2, "f32->f16"
    )
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = np.empty(h.size, np.float32)
    _scalar_f16_to_f32(h, back)
    assert_same_floats(back, ggml_dequantize(h, "F16", (h.size,)), "f16->f32")


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_hostile_cases_and_importance_ignored(qtype):
    imp = importance_rows()["spiky"]
    for name, x in hostile_cases().items():
        ref = ggml_quantize(x, qtype)
        assert np.array_equal(ggml_quantize(x, qtype, imp), ref)  # libggml ignores it too
        assert_same_bytes(quantize(x, qtype), ref, ref.shape[1] // x.shape[1], f"{qtype} {name}")
        assert_same_bytes(quantize(x, qtype, importance=imp), ref, ref.shape[1] // x.shape[1], name)
