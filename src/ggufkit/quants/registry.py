"""The one table of block formats: type -> block size, bytes per block, quantize and dequantize kernels.

Block size and bytes per block come from GGML_QUANT_SIZES (ggufkit.gguf.types: gguf-py's table, checked
against it in the tests; the same facts as ggml's type traits); everything that converts shapes to bytes
goes through `row_bytes`; nothing else in ggufkit hard-codes 256 or 144. The kernels come from one of two
builds of the same numba source (fp, legacy, kquants, iq4): the native library (quants/native.py: compiled
ahead of time, loaded with ctypes, no numba in the process; the default) or the numba JIT modules, which
register themselves here on import (the fallback when the library cannot be built, e.g. without a C
compiler). Both give the same bytes.

Kernel contract (the registry does every check before calling one):
  quantize_rows(x: float32 C-contiguous [n_rows, n_per_row], importance: float32 [n_per_row] | None)
      -> uint8 [n_rows, row_bytes]
  dequantize_rows(data: uint8 C-contiguous [n_rows, row_bytes], n_per_row: int) -> float32 [n_rows, n_per_row]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..gguf.types import GGML_QUANT_SIZES, GGMLQuantizationType

if TYPE_CHECKING:  # numpy is imported by the functions that take arrays (a quantize process never needs it)
    import numpy as np

QuantizeRows = Callable[["np.ndarray", "np.ndarray | None"], "np.ndarray"]
DequantizeRows = Callable[["np.ndarray", int], "np.ndarray"]

# name -> (module of its numba kernels, has an importance-weighted (imatrix) algorithm in llama.cpp)
_TABLE = {
    "F32": ("fp", False),
    "F16": ("fp", False),
    "Q4_0": ("legacy", True),
    "Q4_1": ("legacy", True),
    "Q5_0": ("legacy", True),
    "Q5_1": ("legacy", True),
    "Q8_0": ("legacy", False),
    "Q2_K": ("kquants", True),
    "Q3_K": ("kquants", True),
    "Q4_K": ("kquants", True),
    "Q5_K": ("kquants", True),
    "Q6_K": ("kquants", True),
    "IQ4_NL": ("iq4", True),
    "IQ4_XS": ("iq4", True),
    "BF16": ("fp", False),
}


@dataclass(frozen=True)
class Kernels:
    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    uses_importance: bool  # has an importance-weighted (imatrix) algorithm in llama.cpp

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        return row_bytes(self, n_per_row)

    def quantize_rows(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return kernels(self.name).quantize_rows(x, importance)

    def dequantize_rows(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        return kernels(self.name).dequantize_rows(data, n_per_row)


def _format(name: str) -> BlockFormat:
    qt = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return BlockFormat(name, qt, block_size, type_size, _TABLE[name][1])


# every supported format by name, in ggml type-id order
FORMATS: dict[str, BlockFormat] = {
    f.name: f for f in sorted((_format(n) for n in _TABLE), key=lambda f: int(f.ggml_type))
}
_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}

# -- kernels: the native library (quants.native: ahead-of-time compiled, no numba in the process) or the
# numba JIT modules (fp, legacy, kquants, iq4), which register themselves on import. Both give the same
# bytes (tests check both against libggml); "auto" takes the native library when it loads or builds.

_JIT: dict[str, Kernels] = {}
_LOADED = False
_BACKENDS = ("auto", "native", "jit")
_backend = "auto"
_threads: int | None = None


def register(
    name: str, *, quantize_rows: QuantizeRows, dequantize_rows: DequantizeRows, uses_importance: bool
) -> BlockFormat:
    """Called by the JIT kernel modules for each format they implement."""
    fmt = FORMATS[name]
    assert uses_importance == fmt.uses_importance, name
    _JIT[name] = Kernels(quantize_rows, dequantize_rows)
    return fmt


def _load() -> None:
    global _LOADED
    if not _LOADED:
        from . import fp, iq4, kquants, legacy  # noqa: F401  (they register themselves)

        _LOADED = True
        if _threads is not None:
            _numba_threads(_threads)


def jit_kernels(name: str) -> Kernels:
    """The numba JIT kernels of a format (imports numba)."""
    _load()
    return _JIT[name]


def kernels(name: str) -> Kernels:
    """The kernels the current backend uses for a format."""
    if _backend != "jit":
        from . import native

        k = native.kernels(name)
        if k is not None:
            return k
        if _backend == "native":
            raise RuntimeError(f"native kernels are not available: {native.status()}")
    return jit_kernels(name)


def set_backend(name: str) -> str:
    """Choose the kernels: "auto" (default: native when available, else JIT), "native" or "jit".
    Results are identical; this changes only how the process gets its compiled code. Returns the old one."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    old, _backend = _backend, name
    return old


def backend() -> str:
    """The backend in use: "native" or "jit" (resolving "auto", which may build the native library)."""
    if _backend == "jit":
        return "jit"
    from . import native

    return "native" if native.library() is not None else "jit"


def _numba_threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(n, int(numba.config.NUMBA_NUM_THREADS))))


def max_threads() -> int:
    """Threads available to the kernels (the CPUs this process may run on)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_threads() -> int:
    return _threads if _threads is not None else max_threads()


def set_threads(n: int | None) -> int | None:
    """Threads for the kernels of both backends (None: all CPUs). Returns the previous setting."""
    global _threads
    old = _threads
    _threads = None if n is None else max(1, int(n))
    if _LOADED:
        _numba_threads(get_threads())
    return old


def formats() -> dict[str, BlockFormat]:
    """All supported formats by name, in ggml type-id order."""
    return dict(FORMATS)


def get_format(qtype: str | int | GGMLQuantizationType) -> BlockFormat:
    """Look up a format by name (case-insensitive), ggml type id, or gguf.GGMLQuantizationType."""
    try:
        if isinstance(qtype, str):
            qt = GGMLQuantizationType[qtype.upper()]
        else:
            qt = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise ValueError(f"unknown quantization type {qtype!r}; supported: {', '.join(FORMATS)}") from None
    if qt not in _BY_TYPE:
        raise ValueError(f"quantization type {qt.name} is not supported; supported: {', '.join(FORMATS)}")
    return _BY_TYPE[qt]


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
    import numpy as np

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
    import numpy as np

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
