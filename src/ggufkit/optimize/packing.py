"""A block format's layout, read off its own dequantizer: which bits hold which element's code, the code
-> value table, and the fp16 scale fields (d, and dmin or m) every element is linear in.

The error-feedback quantizer (feedback.py) keeps a format's scales from ggufkit's standard kernel (the
importance-weighted search, byte-identical to libggml) and chooses the codes itself; to write its codes
into the blocks it needs each format's bit packing. Rather than spell every packing out a second time
(quants/ holds them, in numba kernels that quantize and dequantize but expose no "pack these codes"),
`layout()` probes the registry's dequantizer once per type on one block:

- flipping a bit that changes exactly one element is a code bit of that element; every other bit is a
  scale bit (every format here keeps whole bytes for codes: Q5_0's qh, Q3_K's hmask and qs, ...);
- from a block whose code bits are all zero, flipping one code bit moves its element by the bit's weight
  (1, 2, 4, ... times the element's step, or an IQ4 table difference): sorting an element's bits by that
  move orders them from least to most significant;
- every element is x = D*t[c] + M for its code c, with t = 0..2^bits-1 for the linear formats and the
  shifted kvalues_iq4nl table for IQ4_NL / IQ4_XS; D and M follow from decoding all-zero and all-one codes;
- an fp16 field is a *float scale* when writing 0, 1, 2, 4 there moves every element linearly (d and
  dmin/m; the 6-bit or 4-bit sub-scales never do). x is then sum_j f_j * (D_j*t[c] + M_j) over the float
  fields f_j, with (D_j, M_j) decoded with f_j = 1 and the other fields 0: refine.py's least squares.

Every probe is checked (each element has the same number of code bits, the table is exact for every
element of the probe block); a format that does not fit the model raises at its first use.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from ..errors import QuantizeError
from ..quants import registry

KERNELS = ("legacy", "kquants", "iq4")  # the block-format kernel modules (not fp's F16/BF16/F32)


def supported() -> tuple[str, ...]:
    """The block formats quantize_tensor takes: every registry format with blocks of codes and scales."""
    return tuple(n for n, f in registry.formats().items() if f.kernels in KERNELS)


class Layout(NamedTuple):
    name: str
    bs: int  # elements per block
    ts: int  # bytes per block
    nbits: int  # code bits per element
    code_bytes: np.ndarray  # int64 [nc]: the byte offsets holding codes, ascending
    src_elem: np.ndarray  # int64 [nc*8]: element of bit i of code_bytes (bit i%8 of byte i//8)
    src_sig: np.ndarray  # int64 [nc*8]: which bit of that element's code it holds
    table: np.ndarray  # float64 [2^nbits]: t[c], t[0] = 0
    linear: bool  # t[c] == c
    order: np.ndarray  # int64 [2^nbits]: the codes by ascending t (Q8_0's int8 codes are not monotonic)
    floats: tuple[int, ...]  # byte offsets of the fp16 float scale fields


def _deq(lay_name: str, data: np.ndarray, bs: int) -> np.ndarray:
    n = data.shape[0]
    return registry.dequantize(np.ascontiguousarray(data), lay_name, (n, data.shape[1] // _ts(lay_name) * bs))


def _ts(name: str) -> int:
    return registry.get_format(name).type_size


@functools.cache
def layout(name: str) -> Layout:
    fmt = registry.get_format(name)
    if fmt.kernels not in KERNELS:
        raise QuantizeError(f"{name}: not a block format of codes and scales (supported: {supported()})")
    bs, ts = fmt.block_size, fmt.type_size
    x = np.random.default_rng(12345).standard_normal((1, bs)).astype(np.float32)
    ref = registry.quantize(x, name)[0]
    base = _deq(name, ref[None], bs)[0]
    flips = np.repeat(ref[None], ts * 8, axis=0)
    idx = np.arange(ts * 8)
    flips[idx, idx // 8] ^= (1 << (idx % 8)).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        changed = ~(_deq(name, flips, bs) == base[None])
    is_code = changed.sum(axis=1) == 1
    per_byte = is_code.reshape(ts, 8).sum(axis=1)
    if not np.all((per_byte == 0) | (per_byte == 8)):
        raise RuntimeError(f"{name}: a byte mixes code and scale bits")
    code_bytes = np.flatnonzero(per_byte == 8)
    code_bits = np.flatnonzero(is_code)  # ascending = code_bytes order, bit 0..7 within each byte
    src_elem = changed[code_bits].argmax(axis=1)
    counts = np.bincount(src_elem, minlength=bs)
    nbits = int(counts[0])
    if not np.all(counts == nbits) or nbits == 0:
        raise RuntimeError(f"{name}: elements hold different numbers of code bits {set(counts.tolist())}")
    # significance: move of each code bit from the all-zero-codes block
    zero = ref.copy()
    zero[code_bytes] = 0
    x0 = _deq(name, zero[None], bs)[0]
    one = np.repeat(zero[None], code_bits.size, axis=0)
    one[np.arange(code_bits.size), code_bits // 8] ^= (1 << (code_bits % 8)).astype(np.uint8)
    move = np.abs(_deq(name, one, bs)[np.arange(code_bits.size), src_elem] - x0[src_elem])
    src_sig = np.empty(code_bits.size, np.int64)
    for e in range(bs):
        mine = np.flatnonzero(src_elem == e)
        src_sig[mine[np.argsort(move[mine], kind="stable")]] = np.arange(nbits)
    lay = Layout(
        name,
        bs,
        ts,
        nbits,
        code_bytes,
        src_elem,
        src_sig,
        np.arange(2**nbits, dtype=np.float64),
        True,
        np.arange(2**nbits),
        (),
    )
    # the code -> value table, from every code written to every element of the probe block
    levels = 2**nbits
    allc = np.repeat(ref[None], levels, axis=0)
    pack_codes(allc, np.repeat(np.arange(levels)[:, None], bs, axis=1), lay)
    vals = _deq(name, allc, bs).astype(np.float64)  # [levels, bs]
    span = vals[-1] - vals[0]
    e = int(np.argmax(np.abs(span)))
    t = (vals[:, e] - vals[0, e]) / span[e] * (levels - 1)
    linear = bool(np.allclose(t, np.arange(levels), rtol=0, atol=1e-5))
    t = np.arange(levels, dtype=np.float64) if linear else t
    model = vals[0][None] + (span / (levels - 1))[None] * t[:, None]
    if not np.allclose(model, vals, rtol=1e-5, atol=1e-6 * np.abs(vals).max()):
        raise RuntimeError(f"{name}: elements do not share one code -> value table")
    floats = tuple(
        o
        for o in range(0, ts - 1)
        if o not in code_bytes and o + 1 not in code_bytes and _is_float(name, ref, o, bs)
    )
    if not 1 <= len(floats) <= 2:
        raise RuntimeError(f"{name}: found fp16 scale fields at {floats}")
    return lay._replace(table=t, linear=linear, order=np.argsort(t, kind="stable"), floats=floats)


def _is_float(name: str, ref: np.ndarray, off: int, bs: int) -> bool:
    """Whether the two bytes at `off` are an fp16 factor of every element (x linear in the value)."""
    tries = np.repeat(ref[None], 4, axis=0)
    tries[:, off : off + 2] = np.array([0.0, 1.0, 2.0, 4.0], np.float16).view(np.uint8).reshape(4, 2)
    with np.errstate(invalid="ignore", over="ignore"):
        y = _deq(name, tries, bs).astype(np.float64)
    if not np.all(np.isfinite(y)):
        return False
    d1 = y[1] - y[0]
    tol = 1e-5 * np.abs(y).max()  # the decode rounds d*a + b in float32
    return bool(
        np.abs(d1).max() > 100 * tol
        and np.allclose(y[2] - y[0], 2 * d1, rtol=0, atol=tol)
        and np.allclose(y[3] - y[0], 4 * d1, rtol=0, atol=tol)
    )


def pack_codes(data: np.ndarray, codes: np.ndarray, lay: Layout) -> None:
    """Write codes (integers [n, nblocks*bs], 0 <= c < 2^nbits) into the code bytes of data
    (uint8 [n, nblocks*ts]) in place; the scale bytes are left as they are."""
    n = data.shape[0]
    nb = codes.shape[1] // lay.bs
    c = codes.reshape(n, nb, lay.bs).astype(np.uint8)
    bits = (c[:, :, lay.src_elem] >> lay.src_sig.astype(np.uint8)) & 1  # [n, nb, nc*8]
    packed = np.packbits(bits, axis=-1, bitorder="little")  # [n, nb, nc]
    data.reshape(n, nb, lay.ts)[:, :, lay.code_bytes] = packed


def unpack_codes(data: np.ndarray, lay: Layout) -> np.ndarray:
    """The codes of data (uint8 [n, nblocks*ts]) as int64 [n, nblocks*bs]."""
    n = data.shape[0]
    nb = data.shape[1] // lay.ts
    raw = data.reshape(n, nb, lay.ts)[:, :, lay.code_bytes]
    bits = np.unpackbits(raw, axis=-1, bitorder="little").astype(np.int64)
    codes = np.zeros((n, nb, lay.bs), np.int64)
    for s in range(lay.nbits):
        sel = lay.src_sig == s
        codes[:, :, lay.src_elem[sel]] |= bits[:, :, sel] << s
    return codes.reshape(n, nb * lay.bs)


def affine(data: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Every element's x = D*t[c] + M under the scales of data (uint8 [n, nblocks*ts]): float64 D, M
    [n, nblocks*bs], decoded from the same scales with all-zero and all-one codes."""
    n = data.shape[0]
    both = np.concatenate([data, data]).reshape(2, n, -1, lay.ts)
    both[0, :, :, lay.code_bytes] = 0  # every code 0
    both[1, :, :, lay.code_bytes] = 0xFF  # every code bit set: the top code
    both = both.reshape(2 * n, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        y = _deq(lay.name, both, lay.bs).astype(np.float64)
    m = y[:n]
    return (y[n:] - m) / lay.table[-1], m


def nearest(u: np.ndarray, lay: Layout) -> np.ndarray:
    """The code whose table value is nearest u (= (x - M)/D; non-finite u gives code 0)."""
    u = np.where(np.isfinite(u), u, 0.0)
    if lay.linear:
        return np.clip(np.rint(u), 0, len(lay.table) - 1).astype(np.int64)
    ts = lay.table[lay.order]
    return lay.order[np.searchsorted((ts[1:] + ts[:-1]) / 2, u)]
