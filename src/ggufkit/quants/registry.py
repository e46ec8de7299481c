"""The one table of block formats: type -> block size, bytes per block, quantize and dequantize kernels.

Block size and bytes per block come from gguf-py's GGML_QUANT_SIZES (the same facts as ggml's type
traits); everything that converts shapes to bytes goes through `row_bytes`. Each format module
(fp, legacy, kquants, iq4) registers its kernels here; nothing else in ggufkit hard-codes 256 or 144.

Kernel contract (the registry does every check before calling one):
  quantize_rows(x: float32 C-contiguous [n_rows, n_per_row], importance: float32 [n_per_row] | None)
      -> uint8 [n_rows, row_bytes]
  dequantize_rows(data: uint8 C-contiguous [n_rows, row_bytes], n_per_row: int) -> float32 [n_rows, n_per_row]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QuantizeRows = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
DequantizeRows = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows
    uses_importance: bool  # has an importance-weighted (imatrix) algorithm in llama.cpp

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        return row_bytes(self, n_per_row)


_FORMATS: dict[GGMLQuantizationType, BlockFormat] = {}
_LOADED = False


def register(
    name: str, *, quantize_rows: QuantizeRows, dequantize_rows: DequantizeRows, uses_importance: bool
) -> BlockFormat:
    qt = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qt]
    fmt = BlockFormat(name, qt, block_size, type_size, quantize_rows, dequantize_rows, uses_importance)
    _FORMATS[qt] = fmt
    return fmt


def _load() -> None:
    global _LOADED
    if not _LOADED:
        from . import fp, iq4, kquants, legacy  # noqa: F401  (they register themselves)

        _LOADED = True


def formats() -> dict[str, BlockFormat]:
    """All supported formats by name, in ggml type-id order."""
    _load()
    return {f.name: f for f in sorted(_FORMATS.values(), key=lambda f: int(f.ggml_type))}


def get_format(qtype: str | int | GGMLQuantizationType) -> BlockFormat:
    """Look up a format by name (case-insensitive), ggml type id, or gguf.GGMLQuantizationType."""
    _load()
    try:
        if isinstance(qtype, str):
            qt = GGMLQuantizationType[qtype.upper()]
        else:
            qt = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise ValueError(f"unknown quantization type {qtype!r}; supported: {', '.join(formats())}") from None
    if qt not in _FORMATS:
        raise ValueError(f"quantization type {qt.name} is not supported; supported: {', '.join(formats())}")
    return _FORMATS[qt]


def row_bytes(qtype, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements (ggml_row_size); the row length must fill whole blocks."""
    fmt = qtype if isinstance(qtype, BlockFormat) else get_format(qtype)
    if n_per_row % fmt.block_size:
        raise ValueError(
            f"{fmt.name}: row length {n_per_row} is not a multiple of the block size {fmt.block_size}"
        )
    return n_per_row // fmt.block_size * fmt.type_size


def quantize(x: np.ndarray, qtype, *, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows x [n_rows, n_per_row] to uint8 [n_rows, row_bytes], like ggml_quantize_chunk.

    importance: per-column weights (llama.cpp's imatrix row) float32 [n_per_row]; ignored by formats that
    have no importance-weighted algorithm (F32, F16, BF16, Q8_0), as in llama.cpp. Non-finite inputs are
    not rejected here; they flow through the same float32 arithmetic as in libggml (the file-level
    quantizer refuses them, as llama-quantize does).
    """
    fmt = get_format(qtype)
    shape = getattr(x, "shape", None)
    row = shape[-1] if shape else "?"
    what = f"{fmt.name} (block size {fmt.block_size}, row length {row})"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"{what}: expected a float32 array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [n_rows, n_per_row], got shape {x.shape}")
    n_rows, n_per_row = x.shape
    nbytes = row_bytes(fmt, n_per_row)
    if importance is not None:
        importance = np.asarray(importance)
        if importance.dtype != np.float32 or importance.shape != (n_per_row,):
            raise ValueError(
                f"{fmt.name}: importance must be float32 of shape ({n_per_row},), got "
                f"{importance.dtype} {importance.shape}"
            )
        importance = np.ascontiguousarray(importance) if fmt.uses_importance else None
    out = fmt.quantize_rows(np.ascontiguousarray(x), importance)
    assert out.dtype == np.uint8 and out.shape == (n_rows, nbytes), (fmt.name, out.dtype, out.shape)
    return out


def dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    """Dequantize raw blocks to float32 of `shape` (last dimension = row length), like ggml's to_float."""
    fmt = get_format(qtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"{fmt.name}: bad shape {shape}")
    n_per_row = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    nbytes = row_bytes(fmt, n_per_row)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != n_rows * nbytes:
        raise ValueError(
            f"{fmt.name}: {raw.size} bytes do not hold shape {shape} ({n_rows} rows x {nbytes} bytes)"
        )
    out = fmt.dequantize_rows(raw.reshape(n_rows, nbytes), n_per_row)
    assert out.dtype == np.float32
    return out.reshape(shape)
