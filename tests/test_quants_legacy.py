"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against libggml (ggml_quantize_chunk and the type's to_float), every run."""

from __future__ import annotations

import numpy as np
import pytest

from ggufkit.quants import dequantize, get_format, quantize
from tests.helpers.libggml import ggml_dequantize, ggml_quantize
from tests.helpers.quant_data import (
    assert_same_bytes,
    assert_same_floats,
    check_against_libggml,
    hostile_cases,
    importance_rows,
    nonfinite_cases,
    random_block_bytes,
)

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
IMPORTANCE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # Q8_0 has no imatrix algorithm in llama.cpp
CASES = hostile_cases()
IMPORTANCE = importance_rows()
NONFINITE = nonfinite_cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", TYPES)
def test_ref_path_matches_libggml(qtype, case):
    check_against_libggml(CASES[case], qtype, what=case)


@pytest.mark.parametrize("imp", sorted(IMPORTANCE))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", IMPORTANCE_TYPES)
def test_importance_path_matches_libggml(qtype, case, imp):
    check_against_libggml(CASES[case], qtype, IMPORTANCE[imp], what=f"{case} importance={imp}")


@pytest.mark.parametrize("qtype", IMPORTANCE_TYPES)
@pytest.mark.parametrize("n_per_row", [32, 96, 4096])
def test_importance_sigma2_is_per_row(qtype, n_per_row):
    # sigma2 is the mean of x^2 over the whole row: rows of different lengths and scales must all match
    rng = np.random.default_rng(n_per_row)
    x = (rng.standard_normal((5, n_per_row)) * np.array([[1e-3], [1.0], [30.0], [1e-20], [1.0]])).astype(
        np.float32
    )
    imp = rng.gamma(0.5, 2.0, n_per_row).astype(np.float32)
    ref = check_against_libggml(x, qtype, imp, what=f"n_per_row={n_per_row}")
    assert not np.array_equal(ref, ggml_quantize(x, qtype)), "importance must change the bytes here"


def test_q8_0_ignores_importance_like_libggml():
    x = CASES["gaussian"]
    imp = IMPORTANCE["spiky"]
    ref = ggml_quantize(x, "Q8_0")
    assert np.array_equal(ggml_quantize(x, "Q8_0", imp), ref)
    assert_same_bytes(quantize(x, "Q8_0", importance=imp), ref, 34, "Q8_0 with importance")
    assert not get_format("Q8_0").uses_importance


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "importance"])
@pytest.mark.parametrize("case", sorted(NONFINITE))
@pytest.mark.parametrize("qtype", TYPES)
def test_nonfinite_matches_libggml(qtype, case, with_importance):
    # Documented in legacy.py: NaN/inf flow through the same float32 operations and x86 conversions.
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
    # arbitrary bytes: inf/NaN/subnormal fp16 scales and every level pattern
    raw = random_block_bytes(4096, fmt.type_size, seed=TYPES.index(qtype))
    shape = (64, 4096 // 64 * fmt.block_size)
    got = dequantize(raw, qtype, shape)
    assert_same_floats(got, ggml_dequantize(raw, qtype, shape), "random bytes")


@pytest.mark.parametrize("qtype", TYPES)
def test_all_zero_block_bytes(qtype):
    # the signed-zero quirk: Q4_0/Q5_0 store d = -0.0 for an all-zero block (from max/-8), others +0
    x = np.zeros((1, 32), np.float32)
    expected = {
        "Q4_0": "0080" + "88" * 16,
        "Q4_1": "00" * 20,
        "Q5_0": "0080" + "ff" * 4 + "00" * 16,
        "Q5_1": "00" * 24,
        "Q8_0": "00" * 34,
    }[qtype]
    assert ggml_quantize(x, qtype).tobytes().hex() == expected  # the facts digest agrees with libggml
    assert quantize(x, qtype).tobytes().hex() == expected


@pytest.mark.parametrize("qtype", TYPES)
def test_many_rows_and_odd_shapes(qtype):
    # parallel chunking must not matter: one long row, many short rows, a single block
    rng = np.random.default_rng(7)
    for shape in [(1, 32), (1, 32 * 1000), (3000, 32), (17, 160)]:
        x = rng.standard_normal(shape).astype(np.float32)
        check_against_libggml(x, qtype, what=str(shape))
        if qtype in IMPORTANCE_TYPES:
            check_against_libggml(
                x, qtype, rng.random(shape[1]).astype(np.float32), what=f"{shape} importance"
            )
