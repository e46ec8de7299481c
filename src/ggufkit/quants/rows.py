"""Chunks of a tensor's rows in raw memory: widen to float32, refuse NaN/Inf, quantize (for the pipeline).

The pipeline maps each chunk of its input and hands over the address; the output lands in a buffer that is
reused from chunk to chunk. Two implementations share one interface:
  - NativeRows runs the native library on the addresses (quants/native.py: convert_rows,
    first_nonfinite_row); numpy is never imported, which is a third of a small quantize job's start-up;
  - ArrayRows wraps the same memory in numpy arrays for the registry's kernels: the numba JIT fallback, and
    the source types the library cannot widen (K-quant inputs when requantizing).
Both give the same bytes and refuse the same first row.

    rows = for_backend()
    rows.first_nonfinite(src_type, address, n_rows, n_per_row) -> first row with a NaN/Inf, or -1
    rows.quantize(src_type, dst_type, address, n_rows, n_per_row, importance=None, check=True) -> memoryview
        (raises NonFiniteRow when check finds a NaN or an infinity; importance: float32 numpy [n_per_row])
"""

from __future__ import annotations

import ctypes

from . import native, registry

_F32 = registry.FORMATS["F32"].ggml_type
_NATIVE_WIDENS = frozenset(int(registry.FORMATS[n].ggml_type) for n in ("F32", *native.DEQUANTIZE_TYPES))
_NATIVE_CHECKS = frozenset(int(registry.FORMATS[n].ggml_type) for n in native.CHECK_TYPES)


class NonFiniteRow(Exception):
    """A row of the chunk holds a NaN or an infinity (row: its index in the chunk)."""

    def __init__(self, row: int):
        super().__init__(f"row {row} holds a NaN or an infinity")
        self.row = row


def memory(address: int, nbytes: int) -> memoryview:
    """nbytes of memory at address as a byte memoryview (the caller keeps the memory alive)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class Buffer:
    """A byte buffer with a fixed address, reallocated only to grow."""

    def __init__(self):
        self._data = bytearray()
        self._export = None
        self.address = 0

    def reserve(self, nbytes: int) -> int:
        """The address of at least nbytes (contents undefined)."""
        if nbytes > len(self._data):
            self._export = None  # release the old buffer before replacing it
            self._data = bytearray(nbytes)
            self._export = (ctypes.c_char * nbytes).from_buffer(self._data)
            self.address = ctypes.addressof(self._export)
        return self.address

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self._data)[:nbytes]


class ArrayRows:
    """numpy views of the chunk and the registry's kernels (JIT or native, whichever the backend is)."""

    def _floats(self, src_type, address: int, n_rows: int, n_per_row: int):
        import numpy as np

        raw = np.frombuffer(memory(address, n_rows * registry.row_bytes(src_type, n_per_row)), np.uint8)
        if src_type == _F32:
            return raw.view(np.float32).reshape(n_rows, n_per_row)
        return registry.dequantize(raw, src_type, (n_rows, n_per_row))

    @staticmethod
    def _first_nonfinite(x) -> int:
        import numpy as np

        # A NaN or an infinity makes the sum non-finite, so a finite sum clears the chunk in one pass
        # without a mask; a non-finite sum (or one that overflowed) is looked at row by row.
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(x, axis=None)):
                return -1
        ok = np.isfinite(x).all(axis=1)
        return -1 if ok.all() else int(np.argmin(ok))

    def first_nonfinite(self, src_type, address: int, n_rows: int, n_per_row: int) -> int:
        return self._first_nonfinite(self._floats(src_type, address, n_rows, n_per_row))

    def quantize(self, src_type, dst_type, address, n_rows, n_per_row, *, importance=None, check=True):
        x = self._floats(src_type, address, n_rows, n_per_row)
        if check:
            bad = self._first_nonfinite(x)
            if bad >= 0:
                raise NonFiniteRow(bad)
        return memoryview(registry.quantize(x, dst_type, importance=importance)).cast("B")


class NativeRows:
    """The native library on raw addresses; reused buffers (float32 scratch for F16/BF16 inputs, output).
    threads: how many threads share each call's rows (default get_threads(); 1 = the calling thread only,
    for callers that run several chunks at once)."""

    def __init__(self, lib, *, threads: int | None = None):
        self.lib = lib
        self.threads = threads
        self._scratch = Buffer()
        self._out = Buffer()
        self._arrays = ArrayRows()

    def first_nonfinite(self, src_type, address: int, n_rows: int, n_per_row: int) -> int:
        if int(src_type) not in _NATIVE_CHECKS:
            return self._arrays.first_nonfinite(src_type, address, n_rows, n_per_row)
        return native.first_nonfinite_row(
            self.lib, int(src_type), address, n_rows, n_per_row, threads=self.threads
        )

    def quantize(self, src_type, dst_type, address, n_rows, n_per_row, *, importance=None, check=True):
        src_type, dst_type = int(src_type), int(dst_type)
        fmt = registry.get_format(dst_type)
        if src_type not in _NATIVE_WIDENS or fmt.name not in native.QUANTIZE_TYPES:
            return self._arrays.quantize(
                src_type, dst_type, address, n_rows, n_per_row, importance=importance, check=check
            )
        if importance is not None and fmt.uses_importance:
            if (
                importance.dtype != "float32"
                or importance.shape != (n_per_row,)
                or not importance.flags.c_contiguous
            ):
                raise ValueError(f"{fmt.name}: importance must be contiguous float32 of shape ({n_per_row},)")
            imp = importance.ctypes.data
        else:
            imp = None
        nbytes = n_rows * fmt.row_bytes(n_per_row)
        dst = self._out.reserve(nbytes)
        scratch = self._scratch.reserve(4 * n_rows * n_per_row) if src_type != _F32 else 0
        bad = native.convert_rows(
            self.lib, src_type, dst_type, address, n_rows, n_per_row,
            importance=imp, scratch=scratch, dst=dst, check=check, threads=self.threads,
        )  # fmt: skip
        if bad >= 0:
            raise NonFiniteRow(bad)
        return self._out.view(nbytes)


def for_backend() -> NativeRows | ArrayRows:
    """The implementation for the current kernel backend (resolving "auto" may build the library)."""
    if registry.backend() == "native":
        return NativeRows(native.library())
    return ArrayRows()
