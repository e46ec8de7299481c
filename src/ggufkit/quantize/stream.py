"""The quantize pipeline's data path: the planned tensors, chunk by chunk, from the input to the writer.

Each tensor is cut into chunks of whole rows (never across an expert of a 3-D tensor, whose rows share one
slice of the importance vector). A chunk is read with pread into a reused buffer, checked for NaN/Inf
(F32/F16/BF16 values) unless allowed, and either copied as it is (a tensor whose type does not change) or
widened to float32 and quantized (quants.rows on raw addresses).
The writer gets the chunks in order, so the output is the same whatever runs them:
  - with the native library, chunks run whole on `threads` worker threads (one chunk per thread, its
    kernels single-threaded), a few ahead of the one being written: reading, computing and writing overlap
    and no core waits at a per-chunk join. numpy is never imported;
  - with the numba JIT kernels (which run their own threads), one chunk at a time on this thread.
Memory stays bounded by the chunks in flight (threads + EXTRA_LANES lanes, each a chunk's input, float32
and output: a few MiB each).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..errors import QuantizeError
from ..gguf.types import FLOAT_TYPES, GGMLQuantizationType
from ..quants.pool import pool
from ..quants.registry import FORMATS
from ..quants.rows import ArrayRows, Buffer, NativeRows, NonFiniteRow, for_backend

# Chunk sizes: small enough that every worker has a chunk while the oldest is being written (a K-quant
# chunk costs ~20x a Q8_0 chunk of the same size, so theirs are smaller), large enough that the per-chunk
# overhead stays small (the measurements that chose them: docs/benchmarks.md, "Quantize files").
CHUNK_ELEMENTS = 1 << 19  # values per chunk (2 MiB of float32)
SLOW_CHUNK_ELEMENTS = 1 << 16  # values per chunk for the searched formats (K-quants, IQ4, imatrix legacy)
COPY_CHUNK_BYTES = 1 << 22  # bytes per chunk of a tensor copied as it is
EXTRA_LANES = 2  # chunks in flight beyond one per worker
_SEARCHED = frozenset(f.ggml_type for f in FORMATS.values() if f.costly(importance=False))
_SEARCHED_WITH_IMPORTANCE = frozenset(f.ggml_type for f in FORMATS.values() if f.costly(importance=True))


class Chunk(NamedTuple):
    """Rows [first_row, first_row + n_rows) of plan tensor `index`, at byte `offset` of the input."""

    index: int
    name: str
    src_type: GGMLQuantizationType
    dst_type: GGMLQuantizationType  # == src_type: copied as it is
    offset: int
    nbytes: int  # input bytes
    first_row: int
    n_rows: int
    n_per_row: int
    importance: object  # float32 numpy [n_per_row] or None
    check: bool  # refuse NaN/Inf
    first: bool  # the tensor's first chunk
    last: bool  # the tensor's last chunk


def chunks(model, plan, vectors: dict, *, allow_nonfinite: bool) -> Iterator[Chunk]:
    """Every chunk of the planned tensors, in output order."""
    by_name = {t.name: t for t in model.tensors}
    for index, tp in enumerate(plan.tensors):
        info = by_name[tp.name]
        src_type = GGMLQuantizationType(info.ggml_type)
        dst_type = GGMLQuantizationType(tp.dst_type)
        n_per_row = info.shape[0]
        n_rows = info.n_elements // n_per_row
        row_bytes = info.nbytes // n_rows  # (whole blocks per row: checked by the reader, any ggml type)
        check = src_type in FLOAT_TYPES and not allow_nonfinite
        importance = None
        if src_type == dst_type:
            step = rows_per_slice = max(1, COPY_CHUNK_BYTES // row_bytes)
        else:
            rows_per_slice = info.shape[1] if len(info.shape) > 1 else 1  # one expert of a 3-D tensor
            if tp.use_importance and vectors.get(tp.name) is not None:
                importance = _importance(vectors[tp.name], n_per_row * (n_rows // rows_per_slice))
            slow = dst_type in _SEARCHED or (importance is not None and dst_type in _SEARCHED_WITH_IMPORTANCE)
            step = min(max(1, (SLOW_CHUNK_ELEMENTS if slow else CHUNK_ELEMENTS) // n_per_row), rows_per_slice)
        base = model.data_offset + info.offset
        r = 0
        while r < n_rows:
            k = min(step, n_rows - r, rows_per_slice - r % rows_per_slice)
            imp = None
            if importance is not None:
                e = r // rows_per_slice
                imp = importance[e * n_per_row : (e + 1) * n_per_row]
            yield Chunk(index, tp.name, src_type, dst_type, base + r * row_bytes, k * row_bytes, r, k,
                        n_per_row, imp, check, r == 0, r + k == n_rows)  # fmt: skip
            r += k


def _importance(vector, size: int):
    """The tensor's importance vector as contiguous float32, or None when its size does not match (a
    token_embd entry made for another shape: llama.cpp quantizes without it)."""
    import numpy as np  # (an imatrix's vectors are numpy arrays: numpy is loaded already)

    vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    return vector if vector.size == size else None


class FileSource:
    """Chunks read from a file by their byte offsets (the input GGUF of a quantize job).

    A source is anything with readinto(chunk, view), which fills view (chunk.nbytes bytes) with the chunk's
    rows in chunk.src_type, and may be called from several worker threads at once; ggufkit.conversion's
    source makes them from a checkpoint instead of a file.
    """

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def readinto(self, c: Chunk, view: memoryview) -> None:
        got = 0
        while got < c.nbytes:
            n = os.preadv(self.fd, [view[got:]], c.offset + got)
            if n <= 0:
                raise QuantizeError(f"unexpected end of input at byte {c.offset + got}")
            got += n

    def close(self) -> None:
        os.close(self.fd)


class _Lane:
    """What one chunk in flight needs: its input buffer and the kernels' own buffers."""

    def __init__(self, rows):
        self.input = Buffer()
        self.rows = rows

    def run(self, source, c: Chunk) -> memoryview:
        address = self.input.reserve(max(1, c.nbytes))
        view = self.input.view(c.nbytes)
        source.readinto(c, view)
        try:
            if c.src_type == c.dst_type:
                if c.check:
                    bad = self.rows.first_nonfinite(c.src_type, address, c.n_rows, c.n_per_row)
                    if bad >= 0:
                        raise NonFiniteRow(bad)
                return view
            return self.rows.quantize(c.src_type, c.dst_type, address, c.n_rows, c.n_per_row,
                                      importance=c.importance, check=c.check)  # fmt: skip
        except NonFiniteRow as e:
            raise QuantizeError(
                f"tensor {c.name!r} has non-finite values (NaN or Inf) in row {c.first_row + e.row}; "
                f"llama.cpp refuses such weights (pass allow_nonfinite / --allow-nonfinite to quantize them "
                f"anyway)"
            ) from None


def run(
    source, chunk_list: Iterator[Chunk], writer, *, threads: int, progress: Callable | None = None
) -> None:
    """Read, convert and write every chunk; progress(chunk, input bytes done) after each is written.
    source: the input file's path, or a source object (see FileSource)."""
    rows = for_backend()
    own = not hasattr(source, "readinto")
    if own:
        source = FileSource(source)
    parallel = isinstance(rows, NativeRows) and threads > 1
    if parallel:
        lanes = [_Lane(NativeRows(rows.lib, threads=1)) for _ in range(threads + EXTRA_LANES)]
        workers = pool(threads)
    else:
        lanes, workers = [_Lane(rows if isinstance(rows, NativeRows) else ArrayRows())], None
    free = deque(lanes)
    pending: deque = deque()  # (chunk, lane, task or the output itself), oldest first
    done = 0

    def write_oldest() -> None:
        nonlocal done
        c, lane, task = pending.popleft()
        out = task.result() if workers is not None else task
        if c.first:
            writer.begin_tensor(c.name)
        writer.write(out)
        if c.last:
            writer.end_tensor()
        free.append(lane)
        done += c.nbytes
        if progress:
            progress(c, done)

    try:
        for c in chunk_list:
            if not free:
                write_oldest()
            lane = free.popleft()
            if workers is None:
                pending.append((c, lane, lane.run(source, c)))
            else:
                pending.append((c, lane, workers.submit(lambda lane=lane, c=c: lane.run(source, c))))
            while pending and (workers is None or pending[0][2].done()):
                write_oldest()
        while pending:
            write_oldest()
    finally:
        if workers is not None:
            for _, _, task in pending:  # on an error: the lanes' chunks still use the file and buffers
                task.wait()
        if own:
            source.close()
