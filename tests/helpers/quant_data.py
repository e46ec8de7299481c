"""Seeded hostile inputs for the block-format tests: the cases issue 2 lists, plus importance rows.

Every case is float32 [n_rows, n_per_row] with n_per_row a multiple of 256, so it fits every block format.
"""

from __future__ import annotations

import numpy as np


def _blocks_of(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, size)


def hostile_cases(n_rows: int = 8, n_per_row: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n_rows, n_per_row)
    g = rng.standard_normal(shape)
    cases: dict[str, np.ndarray] = {
        "gaussian": g * 0.02,
        "gaussian_unit": g,
        "student_t": rng.standard_t(3, shape) * 0.02,
        "student_t_df1": rng.standard_t(1, shape),  # Cauchy: extreme outliers inside blocks
    }
    outl = rng.standard_normal(shape) * 0.02
    cols = rng.choice(n_per_row, 6, replace=False)
    outl[:, cols] *= 80.0  # a few outlier columns, as real checkpoints have
    outl[:, cols[0]] = -np.abs(outl[:, cols[0]])  # a column that is always the negative max
    cases["outlier_columns"] = outl

    z = rng.standard_normal(shape)
    b32 = _blocks_of(z, 32)
    b32[:, ::3] = 0.0  # all-zero blocks
    b32[:, 1::5] = -0.0  # all negative-zero blocks
    b32[:, 2::7] = rng.choice([0.0, -0.0], size=b32[:, 2::7].shape)  # mixed signed zeros
    b256 = _blocks_of(z, 256)
    b256[0::4] = 0.0  # whole rows (every superblock) zero
    b256[1::4, 0] = -0.0
    cases["zero_blocks"] = z

    c = rng.standard_normal(shape)
    b32 = _blocks_of(c, 32)
    b32[:, 0::2] = rng.standard_normal((n_rows, b32[:, 0::2].shape[1], 1))  # constant blocks
    b32[:, 1::4] = -0.75  # negative constant
    _blocks_of(c, 256)[0::3, 0] = 1.0  # a constant superblock
    c[-1] = 3.0  # a constant row
    cases["constant_blocks"] = c

    cases["tiny"] = rng.standard_normal(shape) * 1e-30
    t = rng.standard_normal(shape) * 1e-30
    t[:, ::2] = 0.0
    cases["tiny_sparse"] = t
    cases["subnormal"] = rng.standard_normal(shape) * 1e-39
    cases["huge"] = rng.uniform(-6e4, 6e4, shape)
    h = rng.standard_normal(shape) * 0.02
    h[:, 5::64] = rng.choice([-6e4, 6e4, 65504.0, -65519.0, 65520.0], size=h[:, 5::64].shape)
    cases["huge_spikes"] = h
    m = rng.standard_normal(shape) * np.exp(rng.uniform(np.log(1e-30), np.log(6e4), (n_rows, 1)))
    cases["mixed_magnitudes"] = m
    mb = rng.standard_normal(shape)
    _blocks_of(mb, 32)[:] *= np.exp(rng.uniform(np.log(1e-8), np.log(1e4), (n_rows, n_per_row // 32, 1)))
    cases["block_magnitudes"] = mb
    cases["ties"] = rng.integers(-8, 9, shape) * 0.25  # exact multiples: ties in every rounding rule
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in cases.items()}


def importance_rows(n_per_row: int = 512, seed: int = 1) -> dict[str, np.ndarray]:
    """Importance vectors like llama-imatrix's (non-negative per-column means of squared activations)."""
    rng = np.random.default_rng(seed)
    imp = {
        "imatrix_like": rng.gamma(0.5, 2.0, n_per_row),
        "with_zeros": np.where(rng.random(n_per_row) < 0.3, 0.0, rng.random(n_per_row) * 5),
        "ones": np.ones(n_per_row),
        "spiky": np.where(rng.random(n_per_row) < 0.02, 1e4, 1e-3),
    }
    return {k: v.astype(np.float32) for k, v in imp.items()}


def nonfinite_cases(n_rows: int = 6, n_per_row: int = 512, seed: int = 2) -> dict[str, np.ndarray]:
    """Rows with NaN / +-inf planted in some blocks (the rest gaussian)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, vals in {
        "nan": [np.nan],
        "inf": [np.inf],
        "neg_inf": [-np.inf],
        "mixed": [np.nan, np.inf, -np.inf],
    }.items():
        x = rng.standard_normal((n_rows, n_per_row)).astype(np.float32)
        flat = x.reshape(-1)
        pos = rng.choice(flat.size, max(4, flat.size // 300), replace=False)
        flat[pos] = rng.choice(np.array(vals, dtype=np.float32), pos.size)
        x[0, :32] = vals[0]  # one block entirely non-finite
        x[1, 40] = vals[-1]  # a lone one
        out[name] = x
    return out


def random_block_bytes(n_blocks: int, type_size: int, seed: int = 3) -> np.ndarray:
    """Arbitrary bytes, fp16 fields included: exercises dequantizers on inf/NaN/subnormal scales."""
    return np.random.default_rng(seed).integers(0, 256, (n_blocks, type_size), dtype=np.uint8)


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, type_size: int, what: str = "") -> None:
    """Byte-for-byte equality, reporting the first differing block (row, block index, both byte strings)."""
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (what, ours.dtype, ours.shape, ref.shape)
    if np.array_equal(ours, ref):
        return
    a = ours.reshape(ours.shape[0], -1, type_size)
    b = ref.reshape(ref.shape[0], -1, type_size)
    bad = np.argwhere((a != b).any(axis=2))
    r, k = bad[0]
    raise AssertionError(
        f"{what}: {len(bad)} of {a.shape[0] * a.shape[1]} blocks differ; first at row {r} block {k}:\n"
        f"  ours {a[r, k].tobytes().hex()}\n  ggml {b[r, k].tobytes().hex()}"
    )


def assert_same_floats(ours: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """Bit-for-bit float32 equality (NaN payloads and signed zeros included)."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (what, ours.dtype, ours.shape, ref.shape)
    a = ours.view(np.uint32)
    b = np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    if np.array_equal(a, b):
        return
    bad = np.argwhere(a != b)
    i = tuple(bad[0])
    raise AssertionError(
        f"{what}: {len(bad)} of {a.size} values differ; first at {i}: ours {a[i]:#010x} ({ours[i]!r}), "
        f"ggml {b[i]:#010x} ({ref[i]!r})"
    )


def check_against_libggml(x: np.ndarray, qtype, importance=None, what: str = "") -> np.ndarray:
    """Quantize x with ggufkit and with libggml (ggml_quantize_chunk); assert equal bytes; return libggml's
    bytes."""
    from ggufkit.quants import get_format, quantize

    from .libggml import ggml_quantize

    ours = quantize(x, qtype, importance=importance)
    ref = ggml_quantize(x, qtype, importance)
    assert_same_bytes(ours, ref, get_format(qtype).type_size, f"{qtype} {what}")
    return ref
