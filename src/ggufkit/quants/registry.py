"""The one table of block formats: type -> block size, bytes per block, kernels, and every other per-type
fact ggufkit uses (importance, search work, native ops, the engine's dot-product partner, KV cache and
CPU repacking); other modules derive their lists from FORMATS or names(), never spell them out.

Block size and bytes per block come from GGML_QUANT_SIZES (ggufkit.gguf.types: gguf-py's table, checked
against it in the tests; the same facts as ggml's type traits); everything that converts shapes to bytes
goes through `row_bytes`; nothing else in ggufkit hard-codes 256 or 144. The kernels come from one of two
builds of the same numba source (fp, legacy, kquants, iq4): the native library (quants/native: compiled
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
from typing import TYPE_CHECKING, NamedTuple

from ..gguf.types import GGML_QUANT_SIZES, GGMLQuantizationType

if TYPE_CHECKING:  # numpy is imported by the functions that take arrays (a quantize process never needs it)
    import numpy as np

QuantizeRows = Callable[["np.ndarray", "np.ndarray | None"], "np.ndarray"]
DequantizeRows = Callable[["np.ndarray", int], "np.ndarray"]


class BlockFormat(NamedTuple):
    """A block format: ggml's type, its block size and bytes per block, the facts of the table below, and
    its kernels. (A NamedTuple, as every record a quantize process builds on import: they cost a tenth of a
    dataclass's creation, and start-up is part of what a user waits for.)"""

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    kernels: str  # the module of its numba kernels: fp, legacy, kquants, iq4
    vec_dot: str  # ggml's vec_dot_type (type_traits_cpu in ggml-cpu.c): what the CPU matmul rounds the
    #              activations to before multiplying with a weight of this type (Q8_1 holds Q8_0's values)
    uses_importance: bool  # has an importance-weighted (imatrix) algorithm in llama.cpp
    searched: bool  # quantizing searches scales block by block even without importance
    legacy_search: tuple[int, bool] | None  # the legacy imatrix search's (nmax, has a min)
    native_ops: frozenset[str]  # what the native library's gk_run does for the type:
    #              "quantize", "dequantize" and "check" (the first row holding a NaN or an infinity)
    kv_cache: bool  # a KV cache type of llama.cpp (-ctk/-ctv) the memory estimate knows
    cpu_repack: frozenset[str]  # machines on which ggml's CPU backend repacks the type's
    #              weights (ggml-cpu/repack.cpp): "avx2", "avx512" (x86-64), "arm" (dotprod or i8mm)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def costly(self, *, importance: bool) -> bool:
        """Whether quantizing searches (K-quants, IQ4, the legacy types with importance): the quantize
        stream then cuts smaller chunks."""
        return self.searched or (importance and self.legacy_search is not None)

    def row_bytes(self, n_per_row: int) -> int:
        return row_bytes(self, n_per_row)

    def quantize_rows(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return kernels(self.name).quantize_rows(x, importance)

    def dequantize_rows(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        return kernels(self.name).dequantize_rows(data, n_per_row)


def _Facts(  # noqa: N802  (reads as the table's row constructor)
    kernels: str,
    vec_dot: str,
    *,
    uses_importance: bool = False,
    searched: bool = False,
    legacy_search: tuple[int, bool] | None = None,
    native_ops: frozenset[str] = frozenset(),
    kv_cache: bool = False,
    cpu_repack: frozenset[str] = frozenset(),
) -> dict:
    """One row of the table below: the BlockFormat fields beyond ggml's block size and bytes per block."""
    return {
        "kernels": kernels,
        "vec_dot": vec_dot,
        "uses_importance": uses_importance,
        "searched": searched,
        "legacy_search": legacy_search,
        "native_ops": native_ops,
        "kv_cache": kv_cache,
        "cpu_repack": cpu_repack,
    }


_CHECK = frozenset({"check"})  # F32: quantizing to F32 is a copy, done in Python
_FLOAT = frozenset({"quantize", "dequantize", "check"})
_BLOCKS = frozenset({"quantize", "dequantize"})
_KQ = frozenset({"quantize"})  # K-quant dequantizing is numpy (kdequant.py), in both backends
_X86_ARM, _ARM, _AVX512 = frozenset({"avx2", "arm"}), frozenset({"arm"}), frozenset({"avx512"})
_IMP = {"uses_importance": True}
_SEARCH = {"uses_importance": True, "searched": True}
# fmt: off
_TABLE = {
    "F32":    _Facts("fp",      "F32",  native_ops=_CHECK, kv_cache=True),
    "F16":    _Facts("fp",      "F16",  native_ops=_FLOAT, kv_cache=True),
    "Q4_0":   _Facts("legacy",  "Q8_0", **_IMP, legacy_search=(8, False), native_ops=_BLOCKS, kv_cache=True,
                     cpu_repack=_X86_ARM),
    "Q4_1":   _Facts("legacy",  "Q8_1", **_IMP, legacy_search=(15, True), native_ops=_BLOCKS),
    "Q5_0":   _Facts("legacy",  "Q8_0", **_IMP, legacy_search=(16, False), native_ops=_BLOCKS),
    "Q5_1":   _Facts("legacy",  "Q8_1", **_IMP, legacy_search=(31, True), native_ops=_BLOCKS),
    "Q8_0":   _Facts("legacy",  "Q8_0", native_ops=_BLOCKS, kv_cache=True, cpu_repack=_ARM),
    "Q2_K":   _Facts("kquants", "Q8_K", **_SEARCH, native_ops=_KQ, cpu_repack=_AVX512),
    "Q3_K":   _Facts("kquants", "Q8_K", **_SEARCH, native_ops=_KQ),
    "Q4_K":   _Facts("kquants", "Q8_K", **_SEARCH, native_ops=_KQ, cpu_repack=_X86_ARM),
    "Q5_K":   _Facts("kquants", "Q8_K", **_SEARCH, native_ops=_KQ, cpu_repack=_ARM),
    "Q6_K":   _Facts("kquants", "Q8_K", **_SEARCH, native_ops=_KQ, cpu_repack=_ARM),
    "IQ4_NL": _Facts("iq4",     "Q8_0", **_SEARCH, native_ops=_BLOCKS, cpu_repack=_X86_ARM),
    "IQ4_XS": _Facts("iq4",     "Q8_K", **_SEARCH, native_ops=_BLOCKS),
    "BF16":   _Facts("fp",      "BF16", native_ops=_FLOAT, kv_cache=True),
}
# fmt: on


class Kernels(NamedTuple):
    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows


def _format(name: str) -> BlockFormat:
    qt = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return BlockFormat(name=name, ggml_type=qt, block_size=block_size, type_size=type_size, **_TABLE[name])


# every supported format by name, in ggml type-id order
FORMATS: dict[str, BlockFormat] = {
    f.name: f for f in sorted((_format(n) for n in _TABLE), key=lambda f: int(f.ggml_type))
}
_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def names(**facts) -> tuple[str, ...]:
    """The names of the formats whose facts equal the given ones, in ggml type-id order; a fact given as a
    string tests membership for set-valued facts (native_ops="check", cpu_repack="arm")."""

    def match(fmt: BlockFormat) -> bool:
        for key, want in facts.items():
            have = getattr(fmt, key)
            if isinstance(have, frozenset) and not isinstance(want, frozenset):
                if want not in have:
                    return False
            elif have != want:
                return False
        return True

    return tuple(f.name for f in FORMATS.values() if match(f))


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
