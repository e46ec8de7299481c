"""The GGUF byte layout's arithmetic, defined once: scalar encodings, alignment padding, tensor sizes.

The reader, the writer and the memory estimate all derive their sizes from here; the per-type block facts
come from ggufkit.gguf.types.GGML_QUANT_SIZES.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = [
    "ALIGNMENT",
    "GGUF_MAGIC",
    "GGUF_VERSION",
    "I32",
    "I64",
    "SCALAR",
    "U32",
    "U64",
    "n_dims",
    "pad",
    "row_nbytes",
    "tensor_nbytes",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # what gguf.cpp writes
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: a file's alignment without a general.alignment KV

# Fixed-size scalar value types: struct format (little-endian), size in bytes, numpy dtype of arrays.
SCALAR: dict[GGUFValueType, tuple[str, int, str]] = {
    GGUFValueType.UINT8: ("<B", 1, "<u1"),
    GGUFValueType.INT8: ("<b", 1, "<i1"),
    GGUFValueType.UINT16: ("<H", 2, "<u2"),
    GGUFValueType.INT16: ("<h", 2, "<i2"),
    GGUFValueType.UINT32: ("<I", 4, "<u4"),
    GGUFValueType.INT32: ("<i", 4, "<i4"),
    GGUFValueType.FLOAT32: ("<f", 4, "<f4"),
    GGUFValueType.BOOL: ("<B", 1, "<u1"),
    GGUFValueType.UINT64: ("<Q", 8, "<u8"),
    GGUFValueType.INT64: ("<q", 8, "<i8"),
    GGUFValueType.FLOAT64: ("<d", 8, "<f8"),
}
I32 = struct.Struct("<i")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
I64 = struct.Struct("<q")


def pad(n: int, alignment: int = ALIGNMENT) -> int:
    """GGML_PAD: n rounded up to a multiple of the alignment."""
    return (n + alignment - 1) // alignment * alignment


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: the number of dimensions once trailing 1s are dropped (at least 1)."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


def row_nbytes(ggml_type, n: int) -> int:
    """ggml_row_size: bytes of n elements of a type, n a whole number of its blocks."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(ggml_type))]
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of the {block}-element block")
    return n // block * type_size


def tensor_nbytes(shape: Sequence[int], ggml_type) -> int:
    """ggml_nbytes of a contiguous tensor: rows of whole blocks (shape in ggml order, shape[0] a row)."""
    rows = 1
    for s in shape[1:]:
        rows *= int(s)
    return rows * row_nbytes(ggml_type, int(shape[0]))
