"""Write GGUF v3 files byte for byte as llama.cpp's gguf.cpp writes them, streamed and crash-safe.

Layout (little-endian; `ggml/src/gguf.cpp` gguf_write_out):
    "GGUF"  u32 version=3  i64 n_tensors  i64 n_kv
    n_kv x     KV:     string key, i32 value type, value (arrays: i32 element type, u64 count, elements)
    n_tensors x info:  string name, u32 n_dims, i64 ne[n_dims], i32 ggml type, u64 offset
    zero padding to 32 bytes, then each tensor's data zero-padded to a multiple of 32.
A string is a u64 byte length and the bytes. n_dims is ggml_n_dims: trailing 1s are dropped (at least 1).
Offsets are the cumulative padded sizes, starting at 0. The alignment is always 32 (GGUF_DEFAULT_ALIGNMENT)
because llama-quantize starts from an empty context: a `general.alignment` KV copied from the input does not
change it (a quirk kept on purpose, so the bytes match).

All sizes are known from the plan before any data exists, so the header is written first and the tensors
follow one at a time; each tensor's byte count is checked against its info as it ends.

Crash safety is ggufkit.cache.AtomicFile's: a locked temporary file in the destination folder, fsync'ed
and renamed over the destination only when complete, then the folder fsync'ed; any error (or SIGINT/SIGTERM,
which arrive as exceptions) removes it, and a SIGKILL'ed run's temporary is deleted by the next run. While
the file is written, each finished stretch of WRITEBACK_BYTES is handed to the kernel's writeback (Linux
sync_file_range, a hint that returns at once), so the disk works while the tensors are computed and the
fsync at the end, which alone makes the file durable, has little left to wait for.
KV entries are encoded by gguf/values.py; sizes and padding come from gguf/layout.py.

Nothing here imports numpy (~45 ms of a small `ggufkit quantize` job): numpy arrays are accepted where
values or tensor data may be arrays, and recognized only if numpy is already loaded (if it is not, no
value can be a numpy array).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from ..cache import TEMP_MARK, AtomicFile, WriteInterrupted, remove_stale_temporaries
from .layout import ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, I32, I64, U32, U64, n_dims, pad, tensor_nbytes
from .types import GGMLQuantizationType
from .values import copy_kv, encode_string, kv_bytes, numpy_array

__all__ = [
    "ALIGNMENT",
    "GGUF_VERSION",
    "TEMP_MARK",
    "GGUFStreamWriter",
    "TensorEntry",
    "WriteInterrupted",
    "copy_kv",
    "header_bytes",
    "kv_bytes",
    "n_dims",
    "pad",
    "remove_stale_temporaries",
    "tensor_nbytes",
]

WRITEBACK_BYTES = 8 << 20  # start writing back every 8 MiB written


class TensorEntry(NamedTuple):
    """One tensor of the output: name, shape in ggml order (shape[0] = row length), type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


def header_bytes(kvs: Sequence[bytes], tensors: Sequence[TensorEntry]) -> tuple[bytes, list[int]]:
    """The metadata section (header, KVs, tensor infos, padding) and each tensor's data offset."""
    offsets, offset = [], 0
    for t in tensors:
        offsets.append(offset)
        offset += pad(t.nbytes)
    parts = [GGUF_MAGIC, U32.pack(GGUF_VERSION), I64.pack(len(tensors)), I64.pack(len(kvs)), *kvs]
    for t, off in zip(tensors, offsets):
        nd = n_dims(t.shape)
        parts.append(encode_string(t.name))
        parts.append(U32.pack(nd))
        parts += [I64.pack(int(s)) for s in t.shape[:nd]]
        parts.append(I32.pack(int(t.ggml_type)))
        parts.append(U64.pack(off))
    meta = b"".join(parts)
    return meta + bytes(pad(len(meta)) - len(meta)), offsets


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages in the range, do not wait
_sync_file_range = None  # libc's sync_file_range, looked up on first use; False where there is none


def _find_sync_file_range():
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing [offset, offset + nbytes) of fd to disk, without waiting. Only a
    hint: its result is ignored, and where sync_file_range does not exist nothing happens."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _find_sync_file_range()
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class GGUFStreamWriter:
    """Write one GGUF file atomically, tensor by tensor, in the order of `tensors`.

        with GGUFStreamWriter(dst, kvs, tensors) as w:
            for t in tensors:
                w.begin_tensor(t.name)
                w.write(chunk) ...        # any number of chunks; bytes or uint8 arrays
                w.end_tensor()            # checks the byte count, writes the zero padding
            w.commit()                    # fsync, rename over dst, fsync the folder

    Leaving the block without commit() (an exception, SIGINT, SIGTERM) removes the temporary file.
    `write_hook(fd, data) -> int` replaces os.write (keyword-only; tests inject disk-full errors with it).
    """

    def __init__(
        self,
        dst: str | os.PathLike,
        kvs: Iterable[bytes],
        tensors: Sequence[TensorEntry],
        *,
        write_hook: Callable[[int, memoryview], int] | None = None,
    ):
        self.dst = Path(dst)
        self.kvs = list(kvs)
        self.tensors = list(tensors)
        self._write_fn = write_hook or os.write
        self._file = AtomicFile(self.dst)
        self._next = 0  # index of the next tensor to begin
        self._current: TensorEntry | None = None
        self._written = 0  # bytes of the current tensor so far
        self._pos = 0  # bytes written to the file
        self._flushed = 0  # bytes handed to writeback
        self.header, self.offsets = header_bytes(self.kvs, self.tensors)
        self.file_size = len(self.header) + sum(pad(t.nbytes) for t in self.tensors)

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def temp_path(self) -> Path | None:
        """The temporary file being written (None once committed or removed)."""
        return self._file.temp_path

    def __enter__(self) -> GGUFStreamWriter:
        self._file.__enter__()
        try:
            self._write_all(self.header)
        except BaseException as e:
            self._file.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.__exit__(exc_type, exc, tb)

    # -- writing ---------------------------------------------------------------------------------------
    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._write_fn(self._file.fd, view)
            if n <= 0:  # a write that makes no progress: treat as a full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.temp_path))
            view = view[n:]
            self._pos += n
        if self._pos - self._flushed >= WRITEBACK_BYTES:
            _start_writeback(self._file.fd, self._flushed, self._pos - self._flushed)
            self._flushed = self._pos

    def begin_tensor(self, name: str) -> None:
        if self._current is not None:
            raise RuntimeError(f"tensor {self._current.name!r} was not ended before {name!r}")
        if self._next >= len(self.tensors):
            raise RuntimeError(f"tensor {name!r} is beyond the {len(self.tensors)} tensors of the header")
        t = self.tensors[self._next]
        if t.name != name:
            raise RuntimeError(f"tensor {name!r} written where the header has {t.name!r}")
        self._current, self._written = t, 0

    def write(self, data) -> None:
        """Append bytes (bytes, memoryview, or a C-contiguous numpy array) to the current tensor."""
        if self._current is None:
            raise RuntimeError("write() outside begin_tensor()/end_tensor()")
        if (np := numpy_array(data)) is not None:
            data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        n = memoryview(data).nbytes
        if self._written + n > self._current.nbytes:
            raise RuntimeError(
                f"tensor {self._current.name!r}: {self._written + n} bytes written, its info says "
                f"{self._current.nbytes}"
            )
        self._write_all(data)
        self._written += n

    def end_tensor(self) -> None:
        t = self._current
        if t is None:
            raise RuntimeError("end_tensor() without begin_tensor()")
        if self._written != t.nbytes:
            raise RuntimeError(f"tensor {t.name!r}: {self._written} bytes written, its info says {t.nbytes}")
        self._write_all(bytes(pad(t.nbytes) - t.nbytes))
        self._current = None
        self._next += 1

    def commit(self) -> Path:
        """Make the file durable and visible under its destination name (replacing any old file)."""
        if self._next != len(self.tensors) or self._current is not None:
            raise RuntimeError(f"commit() after {self._next} of {len(self.tensors)} tensors")
        size = os.fstat(self._file.fd).st_size
        if size != self.file_size:
            raise RuntimeError(f"{self.temp_path}: {size} bytes written, expected {self.file_size}")
        return self._file.commit()
