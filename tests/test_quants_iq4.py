"""IQ4_NL and IQ4_XS against libggml (ggml_quantize_chunk and the type's to_float), every run."""

from __future__ import annotations

import numpy as np
import pytest

from ggufkit.quants import dequantize, get_format, quantize
from ggufkit.quants.iq4 import KVALUES
from tests.helpers.libggml import _TO_FLOAT, ggml_dequantize, ggml_quantize, libggml
from tests.helpers.quant_data import (
    assert_same_bytes,
    assert_same_floats,
    check_against_libggml,
    hostile_cases,
    importance_rows,
    nonfinite_cases,
    random_block_bytes,
)

TYPES = ["IQ4_NL", "IQ4_XS"]
CASES = hostile_cases()
IMPORTANCE = importance_rows()
NONFINITE = nonfinite_cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", TYPES)
def test_without_importance_matches_libggml(qtype, case):
    check_against_libggml(CASES[case], qtype, what=case)


@pytest.mark.parametrize("imp", sorted(IMPORTANCE))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", TYPES)
def test_importance_matches_libggml(qtype, case, imp):
    check_against_libggml(CASES[case], qtype, IMPORTANCE[imp], what=f"{case} importance={imp}")


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_changes_the_result(qtype):
    x = CASES["student_t"]
    ref = check_against_libggml(x, qtype, IMPORTANCE["imatrix_like"])
    assert not np.array_equal(ref, ggml_quantize(x, qtype)), "the importance path must be a different one"
    assert get_format(qtype).uses_importance


def test_iq4_nl_is_the_ntry7_search_not_the_ref_quantizer():
    # libggml's from_float_ref for IQ4_NL (quantize_row_iq4_nl_ref) runs ntry = -1; llama-quantize
    # (ggml_quantize_chunk) runs ntry = 7. ggufkit must follow the latter, and the two must differ here.
    x = CASES["gaussian"]
    traits = libggml().ggml_get_type_traits(20).contents
    ref_variant = np.zeros((x.shape[0], x.shape[1] // 32 * 18), np.uint8)
    _TO_FLOAT(traits.from_float_ref)(x.ctypes.data, ref_variant.ctypes.data, x.size)
    ours = quantize(x, "IQ4_NL")
    assert_same_bytes(ours, ggml_quantize(x, "IQ4_NL"), 18, "IQ4_NL")
    assert not np.array_equal(ours, ref_variant)


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("case", sorted(NONFINITE))
@pytest.mark.parametrize("qtype", TYPES)
def test_nonfinite_matches_libggml(qtype, case, with_importance):
    # Documented in iq4.py: NaN/inf go through libggml's float32 operations; the bytes are deterministic.
    x = NONFINITE[case]
    imp = IMPORTANCE["imatrix_like"] if with_importance else None
    ref = check_against_libggml(x, qtype, imp, what=f"non-finite {case}")
    assert_same_floats(dequantize(ref, qtype, x.shape), ggml_dequantize(ref, qtype, x.shape), "dequantize")


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_libggml(qtype):
    fmt = get_format(qtype)
    for name in ["gaussian", "student_t", "zero_blocks", "huge", "tiny"]:
        x = CASES[name]
        q = ggml_quantize(x, qtype)
        assert_same_floats(dequantize(q, qtype, x.shape), ggml_dequantize(q, qtype, x.shape), name)
    raw = random_block_bytes(2048, fmt.type_size, seed=TYPES.index(qtype))
    shape = (32, 2048 // 32 * fmt.block_size)
    assert_same_floats(dequantize(raw, qtype, shape), ggml_dequantize(raw, qtype, shape), "random bytes")


def test_all_zero_block_bytes():
    assert quantize(np.zeros((1, 32), np.float32), "IQ4_NL").tobytes().hex() == "0000" + "88" * 16
    xs = quantize(np.zeros((1, 256), np.float32), "IQ4_XS").tobytes().hex()
    assert xs == "0080" + "aaaa" + "00" * 4 + "88" * 128
    assert xs == ggml_quantize(np.zeros((1, 256), np.float32), "IQ4_XS").tobytes().hex()


def test_kvalues_table_is_libggml_s():
    # dequantizing d = 1.0 (IQ4_NL) with index k in both nibbles gives KVALUES[k] twice
    blocks = np.zeros((16, 18), np.uint8)
    blocks[:, 1] = 0x3C  # fp16 1.0
    blocks[:, 2:] = (np.arange(16, dtype=np.uint8) * 0x11)[:, None]
    out = ggml_dequantize(blocks, "IQ4_NL", (16, 32))
    assert np.array_equal(out[:, 0], KVALUES.astype(np.float32))
    assert np.array_equal(out[:, 16], KVALUES.astype(np.float32))


@pytest.mark.parametrize("qtype", TYPES)
def test_many_rows_and_odd_shapes(qtype):
    rng = np.random.default_rng(11)
    for shape in [(1, 256), (1, 256 * 200), (700, 256), (9, 768)]:
        x = rng.standard_normal(shape).astype(np.float32)
        check_against_libggml(x, qtype, what=str(shape))
        check_against_libggml(x, qtype, rng.random(shape[1]).astype(np.float32), what=f"{shape} importance")
