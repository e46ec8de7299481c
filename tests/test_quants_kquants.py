"""K-quants (Q2_K..Q6_K) against libggml, run in the same process on every test run (tests.helpers.libggml).

Byte identity of ggufkit.quants.quantize with ggml_quantize_chunk, with and without importance weights,
on seeded synthetic families (rows are multiples of 256) and on every ffn_down tensor of SmolLM2-135M
(the only 2-D tensors of that model whose 1536-wide rows take K-quants); bit identity of
ggufkit.quants.dequantize with ggml's to_float on libggml's own bytes. Also the scalar pieces of
quants/search.py that can be checked without C internals: fp16 rounding and nearest_int.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ggufkit import quants
from ggufkit.quants import native, search
from tests.helpers.libggml import ggml_dequantize, ggml_quantize

KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
WIDTH = 512  # two super-blocks per row
BACKENDS = ("native", "jit") if native.compiler() else ("jit",)  # both kernel builds give these bytes


def _ggml_quantize(x, qtype, importance=None):
    """ggml_quantize_chunk over row chunks on all cores (ctypes releases the GIL), as llama-quantize."""
    n = os.cpu_count() or 1
    parts = [p for p in np.array_split(x, n) if len(p)]
    with ThreadPoolExecutor(n) as ex:
        return np.concatenate(list(ex.map(lambda p: ggml_quantize(p, qtype, importance), parts)))


def _importance(n, seed):
    rng = np.random.default_rng(seed)
    imp = rng.gamma(1.0, 1.0, n).astype(np.float32)  # positive, with a spread like real imatrix rows
    imp[rng.choice(n, n // 40, replace=False)] = 0.0  # a few columns with no activation at all
    return imp


def _gaussian(rng):
    return rng.standard_normal((48, WIDTH)) * 0.02


def _student_t(rng):
    return rng.standard_t(3, (48, WIDTH)) * 0.02


def _outlier_columns(rng):
    x = rng.standard_normal((48, WIDTH)) * 0.02
    cols = rng.choice(WIDTH, 6, replace=False)
    x[:, cols] *= 150.0
    x[5, 7] = -40.0  # and one lone spike
    return x


def _zero_and_constant(rng):
    x = rng.standard_normal((24, WIDTH))
    x[0] = 0.0  # all-zero super-blocks
    x[1] = 0.75  # constant positive
    x[2] = -0.75  # constant negative
    x[3, :256] = 3.0
    x[4, 16:32] = 0.0  # one zero sub-block of 16 in a normal super-block
    x[5, 32:64] = 0.0  # one zero sub-block of 32
    x[6, 64:96] = 1.5  # one constant sub-block
    x[7, ::2] = 0.0
    x[8] = np.where(np.arange(WIDTH) % 16 == 0, 1.0, 0.0)  # one nonzero per sub-block
    x[9] = np.abs(x[9])  # all positive (min clamps to 0)
    x[10] = -np.abs(x[10])  # all negative
    x[11, 256:] = 1e-16  # below GROUP_MAX_EPS
    return x


def _signed_zeros(rng):
    x = np.zeros((16, WIDTH))
    x[0] = -0.0
    x[1] = np.where(rng.random(WIDTH) < 0.5, -0.0, 0.0)
    x[2] = -0.0
    x[2, 100] = 1.0
    x[3] = -0.0
    x[3, 300] = -2.0
    x[4:] = rng.standard_normal((12, WIDTH))
    x[4:][rng.random((12, WIDTH)) < 0.3] = -0.0
    return x


def _tiny(rng):
    x = rng.standard_normal((24, WIDTH)) * 1e-30
    x[12:, ::3] = rng.standard_normal((12, (WIDTH + 2) // 3))  # tiny mixed with normal sub-blocks
    x[20] = 1e-30
    x[21] = rng.standard_normal(WIDTH) * 1e-7  # fp16 super-scales underflow to subnormal / zero
    return x


def _subnormal(rng):
    x = rng.standard_normal((16, WIDTH)) * 1e-39  # max - min subnormal: iscale overflows to inf
    x[8:, ::5] = rng.standard_normal((8, (WIDTH + 4) // 5)) * 1e-3
    x[12] = np.float32(1.4e-45) * rng.integers(-3, 4, WIDTH)  # the smallest subnormals
    return x


def _huge(rng):
    x = rng.uniform(-6e4, 6e4, (24, WIDTH))
    x[0] = 6e4
    x[1] = -6e4
    x[2, ::2] = 6e4
    x[2, 1::2] = -6e4
    x[3, :16] = 6e4  # one saturated sub-block among small values
    x[3, 16:] *= 1e-4
    x[4] = rng.standard_normal(WIDTH) * 3e3 - 5.5e4  # large offset: fp16 dmin rounding dominates
    return x


FAMILIES = {
    "gaussian": _gaussian,
    "student_t": _student_t,
    "outlier_columns": _outlier_columns,
    "zero_and_constant": _zero_and_constant,
    "signed_zeros": _signed_zeros,
    "tiny": _tiny,
    "subnormal": _subnormal,
    "huge": _huge,
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    rng = np.random.default_rng(list(FAMILIES).index(request.param) + 100)
    x = np.ascontiguousarray(FAMILIES[request.param](rng), dtype=np.float32)
    return request.param, x


def _assert_same_bytes(got, ref, what):
    assert got.dtype == np.uint8 and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    bad = np.nonzero((got != ref).any(axis=1))[0]
    assert bad.size == 0, f"{what}: {bad.size} of {len(ref)} rows differ from libggml, first row {bad[0]}"


def _assert_same_floats(got, ref, what):
    assert got.dtype == np.float32 and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    bad = np.nonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert bad[0].size == 0, f"{what}: {bad[0].size} values differ from libggml's to_float, first at {bad}"


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", KQUANTS)
def test_quantize_matches_libggml(qtype, with_importance, family):
    name, x = family
    imp = _importance(x.shape[1], 7) if with_importance else None
    got = quants.quantize(x, qtype, importance=imp)
    ref = ggml_quantize(x, qtype, imp)
    _assert_same_bytes(got, ref, f"{qtype} {name} {'imatrix' if with_importance else 'ref'}")


@pytest.mark.parametrize("qtype", KQUANTS)
def test_dequantize_matches_libggml(qtype, family):
    name, x = family
    for imp in (None, _importance(x.shape[1], 8)):
        data = ggml_quantize(x, qtype, imp)
        got = quants.dequantize(data, qtype, x.shape)
        _assert_same_floats(got, ggml_dequantize(data, qtype, x.shape), f"{qtype} {name}")


@pytest.mark.parametrize("qtype", KQUANTS)
def test_dequantize_arbitrary_blocks(qtype):
    """Every bit pattern of the packed fields (random bytes), with finite fp16 super-scales."""
    fmt = quants.get_format(qtype)
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, (64, fmt.type_size), dtype=np.uint8)
    half_offsets = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype]
    for off in half_offsets:  # a finite fp16 (exponent field != 31), either sign
        h = rng.standard_normal(64).astype(np.float16).view(np.uint16)
        data[:, off : off + 2] = h.view(np.uint8).reshape(64, 2)
    shape = (4, 16 * fmt.block_size)
    got = quants.dequantize(data, qtype, shape)
    _assert_same_floats(got, ggml_dequantize(data, qtype, shape), f"{qtype} random blocks")


@pytest.mark.parametrize("qtype", KQUANTS)
def test_importance_shape_and_zero_weights(qtype):
    """All-zero importance (a column block never activated), a constant one, and one with negative
    entries (not a real imatrix, but C takes it), on gaussian rows."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 768)) * 0.05).astype(np.float32)
    signed = np.random.default_rng(6).standard_normal(768).astype(np.float32)  # no early error cut-off
    for imp in (np.zeros(768, np.float32), np.full(768, 0.5, np.float32), signed):
        _assert_same_bytes(
            quants.quantize(x, qtype, importance=imp),
            ggml_quantize(x, qtype, imp),
            f"{qtype} importance={imp[0]}",
        )


@pytest.fixture(scope="module")
def smollm2_ffn_down(smollm2_path):
    """Every blk.N.ffn_down.weight of SmolLM2-135M (576 x 1536), dequantized to f32 by libggml."""
    import gguf

    reader = gguf.GGUFReader(smollm2_path)
    mats = []
    for t in reader.tensors:
        if t.name.endswith("ffn_down.weight"):
            n_per_row = int(t.shape[0])
            shape = (t.data.shape[0], n_per_row)
            mats.append(ggml_dequantize(np.asarray(t.data), t.tensor_type.name, shape))
    assert len(mats) == 30 and all(m.shape == (576, 1536) for m in mats), [m.shape for m in mats]
    return np.ascontiguousarray(np.concatenate(mats))


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", KQUANTS)
def test_smollm2_ffn_down(qtype, with_importance, smollm2_ffn_down):
    """All 30 layers without importance; with it (the slower C path) every third layer, 0, 3, .., 27."""
    x = smollm2_ffn_down
    if with_importance:
        x = np.ascontiguousarray(x.reshape(30, 576, 1536)[::3].reshape(-1, 1536))
    imp = _importance(x.shape[1], 3) if with_importance else None
    got = quants.quantize(x, qtype, importance=imp)
    ref = _ggml_quantize(x, qtype, imp)
    _assert_same_bytes(got, ref, f"{qtype} SmolLM2 ffn_down {'imatrix' if with_importance else 'ref'}")
    if not with_importance:
        _assert_same_floats(
            quants.dequantize(got, qtype, x.shape),
            ggml_dequantize(ref, qtype, x.shape),
            f"{qtype} SmolLM2 ffn_down dequantize",
        )


@pytest.mark.parametrize("qtype", KQUANTS)
def test_non_finite_input_matches_libggml(qtype):
    """Non-finite values are the file quantizer's to refuse; here they flow through C's arithmetic (its
    nearest_int bit trick included) and give libggml's bytes (numpy's default NaN)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, :] = np.inf
    x[2, 7] = -np.inf
    x[3, ::2] = np.nan
    x[4, 300] = np.inf
    x[4, 301] = -np.inf
    x[5, 256:] = np.nan
    for imp in (None, _importance(512, 5)):
        _assert_same_bytes(
            quants.quantize(x, qtype, importance=imp),
            ggml_quantize(x, qtype, imp),
            f"{qtype} non-finite imatrix={imp is not None}",
        )


def test_rows_not_multiple_of_256_are_refused():
    x = np.zeros((2, 576), np.float32)
    for qtype in KQUANTS:
        with pytest.raises(ValueError, match="576"):
            quants.quantize(x, qtype)


def test_fp16_rounding_matches_numpy():
    rng = np.random.default_rng(0)
    mags = 10.0 ** rng.uniform(-12, 5.2, 40000)
    vals = np.concatenate(
        [
            (rng.choice([-1.0, 1.0], 40000) * mags),
            np.float32(2.0**-24) * np.arange(-3000, 3000) / 4,  # subnormal halves and their midpoints
            [
                0.0,
                -0.0,
                np.inf,
                -np.inf,
                65504.0,
                65519.996,
                65520.0,
                -65520.0,
                6.1035156e-05,
                2.0**-25,
                3 * 2.0**-26,
                1e-8,
                -1e-8,
                2049.0,
                2051.0,
                4097.0,
            ],
        ]
    ).astype(np.float32)
    with np.errstate(over="ignore"):
        ref = vals.astype(np.float16).view(np.uint16)
    got = np.array([search.f32_to_f16_bits(v) for v in vals], dtype=np.uint16)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, (vals[bad[:5]], got[bad[:5]], ref[bad[:5]])
    for v in (np.float32(np.nan), np.float32(-np.nan)):
        assert search.f32_to_f16_bits(v) == (0x7E00 | (0x8000 if np.signbit(v) else 0))
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    back = np.array([search.f16_bits_to_f32(int(h)) for h in halves], dtype=np.float32)
    exp = halves.view(np.float16).astype(np.float32)
    finite = np.isfinite(exp) | np.isinf(exp)
    assert np.array_equal(back[finite].view(np.uint32), exp[finite].view(np.uint32))
    assert np.isnan(back[~finite]).all()


def test_nearest_int_is_cs_bit_trick():
    """C: bits(f + 12582912.f) & 0x7fffff - 0x400000, for every float32 including huge and non-finite."""
    rng = np.random.default_rng(1)
    vals = np.concatenate(
        [
            rng.uniform(-100, 100, 2000),
            np.arange(-20, 20) + 0.5,
            rng.uniform(-3e7, 3e7, 2000),
            [4194303.0, 4194304.0, -4194304.5, 12582912.0, -12582912.0, 1e30, -1e30, np.inf, -np.inf, np.nan],
        ]
    ).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        bits = (vals + np.float32(12582912.0)).astype(np.float32).view(np.uint32).astype(np.int64)
    ref = (bits & 0x7FFFFF) - 0x400000
    got = np.array([search.nearest_int(v) for v in vals])
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, (vals[bad[:5]], got[bad[:5]], ref[bad[:5]])


@pytest.mark.parametrize("qtype", KQUANTS)
def test_row_counts_and_thread_chunks(qtype):
    """0 and 1 rows, and more rows than threads (rows are split into per-thread chunks that must keep each
    block's importance column), give libggml's bytes."""
    rng = np.random.default_rng(9)
    imp = _importance(768, 4)
    for n_rows in (0, 1, 7):
        x = rng.standard_normal((n_rows, 768)).astype(np.float32)
        for backend, threads in itertools.product(BACKENDS, sorted({1, quants.max_threads()})):
            old_backend, old_threads = quants.set_backend(backend), quants.set_threads(threads)
            try:
                got = quants.quantize(x, qtype, importance=imp)
            finally:
                quants.set_backend(old_backend)
                quants.set_threads(old_threads)
            want = ggml_quantize(x, qtype, imp)
            _assert_same_bytes(got, want, f"{qtype} {n_rows} rows {backend} {threads}T")
        assert quants.dequantize(got, qtype, x.shape).shape == x.shape


@pytest.mark.parametrize("qtype", KQUANTS)
def test_zero_weight_spikes(qtype):
    """Huge spikes in columns whose importance is 0: the fitted min ignores them, so C's nearest_int sees
    arguments far beyond 2**22 (its bit trick, not rounding, decides those levels)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((16, 512)) * 0.02
    spikes = rng.choice([-6e4, 6e4, 65504.0, -65519.0, 65520.0, -3e4, 1e4], size=x[:, 5::37].shape)
    x[:, 5::37] = spikes
    x = x.astype(np.float32)
    imp = np.where(rng.random(512) < 0.3, 0.0, rng.random(512) * 5).astype(np.float32)
    imp[5::37] = 0.0
    for importance in (None, imp):
        _assert_same_bytes(
            quants.quantize(x, qtype, importance=importance),
            ggml_quantize(x, qtype, importance),
            f"{qtype} spikes imatrix={importance is not None}",
        )
