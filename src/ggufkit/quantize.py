"""quantize_file(): plan -> stream tensors through the block kernels -> atomic GGUF write (llama-quantize).

The pipeline, one tensor at a time, in llama.cpp's output order (sorted by layer, then name):
  1. the plan (recipes.plan_for_gguf) decides each tensor's type; nothing here chooses types;
  2. a tensor whose type does not change is copied byte for byte;
  3. otherwise its rows are read in chunks (never the whole model, at most CHUNK_ELEMENTS floats at a time),
     widened to float32 (F16/BF16 exactly, quantized inputs only with allow_requantize), checked for
     NaN/Inf, quantized with the tensor's importance vector, and appended to the output.
Each chunk of the input is mapped (no copy) and unmapped when done, so memory stays bounded by a chunk;
the chunks go through quants.rows on raw addresses, which with the native library never imports numpy
(its import would be a third of a small job's start-up).
The output is a GGUF v3 file byte-identical to llama-quantize's (gguf_writer), written to a temporary
file and renamed into place only when complete.

Metadata (llama_model_quantize_impl, `src/llama-quant.cpp`; gguf_set_* removes a key and appends it):
input KVs verbatim and in input order; general.quantization_version = 2 (u32) and general.file_type (u32)
moved to the end; split.no / split.count / split.tensors.count removed; then --override-kv entries in
order (an int is stored as the u32 of its absolute value), then the quantize.imatrix.* entries.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import quants
from .errors import GgufkitError, QuantizeError
from .ggml_types import GGMLQuantizationType, GGUFValueType
from .gguf_file import GGUFModel, open_gguf
from .gguf_writer import GGUFStreamWriter, TensorEntry, copy_kv, kv_bytes
from .quants.rows import Buffer, NonFiniteRow, for_backend, memory

__all__ = ["QuantizeProgress", "QuantizeSummary", "default_output_path", "parse_override_kv", "quantize_file"]

log = logging.getLogger(__name__)

# The numba JIT kernels (the fallback when the native library is unavailable: quants/native.py) run on
# libgomp, which by default spin-waits between parallel regions; when the cores are shared with other
# processes that makes each region 10-20x slower (measured: F16->F32 of 1M values 24 ms spinning vs 1.2 ms
# passive, 2 threads on a loaded 2-core machine). Passive waiting costs nothing measurable otherwise.
# libgomp reads this when numba first starts its pool; the user's value wins. (The native path has no
# OpenMP: its threads are a Python thread pool.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GGML_QNT_VERSION = 2  # ggml.h: written as general.quantization_version
CHUNK_ELEMENTS = 1 << 20  # floats per row chunk (4 MiB of float32): bounds memory, keeps all cores busy
COPY_CHUNK_BYTES = 1 << 22
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


@dataclass(frozen=True)
class QuantizeProgress:
    """Passed to the `progress` callback after each chunk: where the job is, in input bytes."""

    index: int  # 0-based index of the current tensor
    n_tensors: int
    name: str
    bytes_done: int  # input bytes processed so far (all tensors)
    bytes_total: int


@dataclass
class QuantizeSummary:
    """What a quantize job did (or, with dry_run, would do)."""

    src: Path
    dst: Path | None  # None for a dry run
    level: str
    ftype: int
    threads: int
    dry_run: bool
    n_tensors: int
    n_elements: int
    size_before: int  # tensor bytes of the input (llama-quantize's "model size")
    size_after: int  # tensor bytes of the output (its "quant size")
    file_size: int | None  # bytes of the output file, header and padding included
    seconds: float
    plan: object  # recipes.Plan
    fallbacks: list = field(default_factory=list)  # TensorPlans whose type fell back (reason says why)
    imatrix_entries: int = 0
    kernels: str = ""  # "native" (the compiled library) or "jit" (numba's fallback); "" for a dry run

    @property
    def bits_per_weight_before(self) -> float:
        return 8.0 * self.size_before / self.n_elements if self.n_elements else 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_after / self.n_elements if self.n_elements else 0.0


# -- metadata ---------------------------------------------------------------------------------------------


def _atol(text: str) -> int:
    """C atol: optional whitespace and sign, then as many digits as there are; 0 if none."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


def _atof(text: str) -> float:
    m = re.match(r"\s*([+-]?(?:inf(?:inity)?|nan|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))", text, re.I)
    return float(m.group(1)) if m else 0.0


def parse_override_kv(spec: str) -> tuple[str, GGUFValueType, object]:
    """KEY=TYPE:VALUE as llama.cpp's string_parse_kv_override reads it, typed as llama-quantize stores it.

    int -> UINT32 of |value| (mod 2^32), float -> FLOAT32, bool (true/false) -> BOOL, str (<= 127 bytes).
    """
    key, sep, rest = spec.partition("=")
    if not sep or not key or len(key.encode()) >= 128:
        raise QuantizeError(f"malformed --override-kv {spec!r} (expected KEY=TYPE:VALUE, key < 128 bytes)")
    kind, _, value = rest.partition(":")
    if kind == "int" and rest.startswith("int:"):
        return key, GGUFValueType.UINT32, abs(_atol(value)) & 0xFFFFFFFF
    if kind == "float" and rest.startswith("float:"):
        return key, GGUFValueType.FLOAT32, struct.unpack("<f", struct.pack("<f", _atof(value)))[0]
    if kind == "bool" and rest.startswith("bool:"):
        if value not in ("true", "false"):
            raise QuantizeError(f"--override-kv {spec!r}: a bool must be true or false")
        return key, GGUFValueType.BOOL, value == "true"
    if kind == "str" and rest.startswith("str:"):
        if len(value.encode()) > _KV_STR_MAX:
            raise QuantizeError(f"--override-kv {spec!r}: a string value cannot exceed {_KV_STR_MAX} bytes")
        return key, GGUFValueType.STRING, value
    raise QuantizeError(f"--override-kv {spec!r}: type must be int, float, bool or str")


def _truncated(text: str) -> bytes:
    """strncpy(val_str, text, 127): at most 127 bytes, cut wherever byte 127 falls."""
    return os.fsencode(text)[:_KV_STR_MAX]


def output_kvs(model: GGUFModel, ftype: int, overrides: Sequence[tuple[str, GGUFValueType, object]]) -> list:
    """The output KV entries (serialized), in llama-quantize's order."""
    entries: dict[str, bytes] = {}  # dicts keep insertion order; set = remove + append

    def set_(key: str, data: bytes) -> None:
        entries.pop(key, None)
        entries[key] = data

    for kv in model.kv.values():
        set_(kv.key, copy_kv(kv))
    set_(
        "general.quantization_version",
        kv_bytes("general.quantization_version", GGUFValueType.UINT32, GGML_QNT_VERSION),
    )
    set_("general.file_type", kv_bytes("general.file_type", GGUFValueType.UINT32, ftype))
    for key in _SPLIT_KEYS:
        entries.pop(key, None)
    for key, vtype, value in overrides:
        set_(key, kv_bytes(key, vtype, value))
    return list(entries.values())


def _imatrix_overrides(meta: dict) -> list[tuple[str, GGUFValueType, object]]:
    """quantize.imatrix.* as llama-quantize appends them (tools/quantize/quantize.cpp)."""
    out = [("quantize.imatrix.file", GGUFValueType.STRING, _truncated(str(meta["file"])))]
    if meta.get("dataset") is not None:
        out.append(("quantize.imatrix.dataset", GGUFValueType.STRING, _truncated(meta["dataset"])))
    out.append(("quantize.imatrix.entries_count", GGUFValueType.UINT32, int(meta["entries_count"])))
    if meta.get("chunks_count", 0) > 0:
        out.append(("quantize.imatrix.chunks_count", GGUFValueType.UINT32, int(meta["chunks_count"])))
    return out


# -- paths ------------------------------------------------------------------------------------------------


def default_output_path(src: str | os.PathLike, level_name: str) -> Path:
    """<input stem>-<TYPE>.gguf beside the input."""
    src = Path(src)
    return src.with_name(f"{src.stem}-{level_name}.gguf")


def _check_paths(src: Path, dst: Path) -> None:
    if dst.exists() and dst.is_dir():
        raise QuantizeError(f"output {dst} is a directory")
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and dst.exists():
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            pass
    if same:
        raise QuantizeError(f"input and output are the same file: {src} (the input is never overwritten)")
    if not dst.parent.is_dir():
        raise QuantizeError(f"output folder {dst.parent} does not exist")


# -- tensor data ------------------------------------------------------------------------------------------


_PAGE = mmap.ALLOCATIONGRANULARITY
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
# mapped pages are filled in one call rather than faulted in one by one (Linux; read-only, so no copy)
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class _Source:
    """The input's bytes, one window at a time: mapped read-only and unmapped when the window closes (no
    copy, and only the window counts in the process's memory); read with pread into a reused buffer where
    the file cannot be mapped."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._buffer: Buffer | None = None

    def window(self, offset: int, nbytes: int) -> _Window:
        start = offset - offset % _PAGE
        length = offset - start + nbytes
        base = _libc.mmap(None, length, mmap.PROT_READ, _MAP_FLAGS, self.fd, start) if nbytes else None
        if base is not None and base != _MAP_FAILED:
            return _Window(base + offset - start, nbytes, lambda: _libc.munmap(base, length))
        if self._buffer is None:
            self._buffer = Buffer()
        address = self._buffer.reserve(max(1, nbytes))
        view = self._buffer.view(nbytes)
        got = 0
        while got < nbytes:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise QuantizeError(f"unexpected end of input at byte {offset + got}")
            got += n
        return _Window(address, nbytes, None)

    def close(self) -> None:
        os.close(self.fd)


class _Window:
    """nbytes of the input at `address` (and as a memoryview, `view()`), valid until the with-block ends."""

    def __init__(self, address: int, nbytes: int, release):
        self.address, self.nbytes, self._release = address, nbytes, release

    def view(self) -> memoryview:
        return memory(self.address, self.nbytes)

    def __enter__(self) -> _Window:
        return self

    def __exit__(self, *exc) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def _nonfinite(name: str, row: int) -> QuantizeError:
    return QuantizeError(
        f"tensor {name!r} has non-finite values (NaN or Inf) in row {row}; llama.cpp refuses such "
        f"weights (pass allow_nonfinite / --allow-nonfinite to quantize them anyway)"
    )


def _rows_per_chunk(n_per_row: int, rows_per_slice: int) -> int:
    rows = max(1, CHUNK_ELEMENTS // max(1, n_per_row))
    return min(rows, rows_per_slice)


# -- the job ----------------------------------------------------------------------------------------------


def _set_threads(threads: int | None) -> tuple[int, Callable[[], None]]:
    want = threads if threads and threads > 0 else quants.max_threads()
    use = max(1, min(int(want), quants.max_threads()))
    old = quants.set_threads(use)
    return use, lambda: quants.set_threads(old)


def _load_imatrix(path, include_weights, exclude_weights):
    """(vectors by tensor name, metadata for quantize.imatrix.*), through ggufkit.imatrix."""
    from . import imatrix as imx

    return imx.load_for_quantize(path, include=tuple(include_weights), exclude=tuple(exclude_weights))


def _check_imatrix(vectors: dict, model: GGUFModel, path) -> None:
    """An imatrix none of whose entries names a tensor of the model was made for another model. (Entries
    whose size differs from their tensor's rows are refused by the plan, as llama-quantize refuses them.)"""
    names = {t.name for t in model.tensors}
    if vectors and not any(n in names for n in vectors):
        some = ", ".join(sorted(vectors)[:3])
        raise QuantizeError(
            f"imatrix {path} was made for another model: none of its entries ({some}, ...) is a tensor "
            f"of {model.path}"
        )


def _fallbacks(plan) -> list:
    return [tp for tp in plan.tensors if tp.kind == "fallback"]


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    qtype: str | None = None,
    *,
    threads: int | None = None,
    imatrix: str | os.PathLike | None = None,
    include_weights: Iterable[str] = (),
    exclude_weights: Iterable[str] = (),
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Iterable[str | tuple[str, str]] = (),
    pure: bool = False,
    leave_output_tensor: bool = False,
    allow_requantize: bool = False,
    override_kv: Iterable[str] = (),
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    progress: Callable[[QuantizeProgress], None] | None = None,
    _write_hook=None,
) -> QuantizeSummary:
    """Quantize the GGUF file `src` to the llama-quantize level `qtype` (e.g. "Q4_K_M"), writing `dst`
    (default: <src stem>-<TYPE>.gguf beside src). The output is byte-identical to llama-quantize's with the
    same options. Raises QuantizeError / GGUFError (GgufkitError) for anything that cannot be done as asked;
    on any error or interrupt the destination is left as it was. Returns a QuantizeSummary.
    """
    from . import recipes

    t0 = time.perf_counter()
    if qtype is None:
        raise QuantizeError("no quantization type given (e.g. Q4_K_M)")
    try:
        level = recipes.level(str(qtype))
    except GgufkitError:
        raise
    except (KeyError, ValueError) as e:
        raise QuantizeError(f"unknown quantization type {qtype!r}: {e}") from None
    include_weights, exclude_weights = list(include_weights), list(exclude_weights)
    if include_weights and exclude_weights:
        raise QuantizeError("--include-weights and --exclude-weights cannot be used together")
    overrides = [parse_override_kv(s) for s in override_kv]
    src = Path(src)
    dst_path = None if dry_run else Path(dst) if dst is not None else default_output_path(src, level.name)
    if dst_path is not None:
        _check_paths(src, dst_path)

    with open_gguf(src) as model:
        vectors, imeta = {}, None
        if imatrix is not None:
            vectors, imeta = _load_imatrix(imatrix, include_weights, exclude_weights)
            _check_imatrix(vectors, model, imatrix)
        plan = recipes.plan_for_gguf(
            model,
            level.name,
            imatrix=vectors if vectors else None,
            output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type,
            tensor_types=tuple(tensor_types),
            pure=pure,
            leave_output_tensor=leave_output_tensor,
        )
        if vectors:
            overrides += _imatrix_overrides(imeta)
        if not dry_run:
            plan.check_imatrix_requirement()
        if not allow_requantize:
            for tp in plan.tensors:
                if tp.quantize and GGMLQuantizationType(tp.src_type) not in _FLOAT_TYPES:
                    have = GGMLQuantizationType(tp.src_type).name
                    raise QuantizeError(
                        f"{src} is already quantized (tensor {tp.name} is {have}); requantizing loses "
                        f"quality, pass allow_requantize / --allow-requantize to do it anyway"
                    )
        by_name = {t.name: t for t in model.tensors}
        n_elements = sum(t.n_elements for t in model.tensors)
        size_before = sum(by_name[tp.name].nbytes for tp in plan.tensors)
        size_after = sum(tp.nbytes for tp in plan.tensors)
        summary = QuantizeSummary(
            src=src,
            dst=dst_path,
            level=level.name,
            ftype=int(level.ftype_id),
            threads=0,
            dry_run=dry_run,
            n_tensors=len(plan.tensors),
            n_elements=n_elements,
            size_before=size_before,
            size_after=size_after,
            file_size=None,
            seconds=0.0,
            plan=plan,
            fallbacks=_fallbacks(plan),
            imatrix_entries=len(vectors),
        )
        if dry_run:
            summary.seconds = time.perf_counter() - t0
            return summary

        kvs = output_kvs(model, int(level.ftype_id), overrides)
        entries = [
            TensorEntry(tp.name, tuple(tp.shape), GGMLQuantizationType(tp.dst_type)) for tp in plan.tensors
        ]
        n_threads, restore = _set_threads(threads)
        summary.threads = n_threads
        summary.kernels = quants.backend()  # loads (or, the first time, builds) them before any output
        rows = for_backend()
        source = _Source(src)
        try:
            with GGUFStreamWriter(dst_path, kvs, entries, write_hook=_write_hook) as writer:
                _stream(model, plan, by_name, vectors, source, rows, writer, allow_nonfinite, progress)
                writer.commit()
                summary.file_size = writer.file_size
        except OSError as e:
            raise QuantizeError(f"cannot write {dst_path}: {e.strerror or e}") from None
        finally:
            source.close()
            restore()
    summary.seconds = time.perf_counter() - t0
    return summary


def _stream(model, plan, by_name, vectors, source, rows, writer, allow_nonfinite, progress) -> None:
    total = sum(by_name[tp.name].nbytes for tp in plan.tensors)
    done = 0
    n = len(plan.tensors)
    for i, tp in enumerate(plan.tensors):
        info = by_name[tp.name]
        src_type = GGMLQuantizationType(info.ggml_type)
        dst_type = GGMLQuantizationType(tp.dst_type)
        writer.begin_tensor(tp.name)
        base = model.data_offset + info.offset
        if src_type == dst_type:
            check = src_type in _FLOAT_TYPES and not allow_nonfinite
            row_bytes = quants.row_bytes(src_type, info.shape[0])
            step = max(1, COPY_CHUNK_BYTES // row_bytes)
            n_rows = info.nbytes // row_bytes
            for r in range(0, n_rows, step):
                k = min(step, n_rows - r)
                with source.window(base + r * row_bytes, k * row_bytes) as w:
                    if check:
                        bad = rows.first_nonfinite(src_type, w.address, k, info.shape[0])
                        if bad >= 0:
                            raise _nonfinite(tp.name, r + bad)
                    writer.write(w.view())
                done += k * row_bytes
                if progress:
                    progress(QuantizeProgress(i, n, tp.name, done, total))
        else:
            importance = vectors.get(tp.name) if tp.use_importance else None
            done = _quantize_tensor(
                tp, info, src_type, dst_type, importance, base, source, rows, writer,
                allow_nonfinite, progress, i, n, done, total,
            )  # fmt: skip
        writer.end_tensor()


def _quantize_tensor(
    tp, info, src_type, dst_type, importance, base, source, rows, writer, allow_nonfinite, progress, i, n,
    done, total,
) -> int:  # fmt: skip
    n_per_row = info.shape[0]
    rows_per_slice = info.shape[1] if len(info.shape) > 1 else 1  # one expert of a 3-D tensor
    n_rows = info.n_elements // n_per_row
    src_row = quants.row_bytes(src_type, n_per_row)
    if importance is not None:
        import numpy as np  # (an imatrix's vectors are numpy arrays: numpy is loaded already)

        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.size != n_per_row * (n_rows // rows_per_slice):
            importance = None  # token_embd with a mismatched entry: llama.cpp quantizes without it
    step = _rows_per_chunk(n_per_row, rows_per_slice)
    r = 0
    while r < n_rows:
        # never cross an expert boundary: each expert has its own slice of the importance vector
        k = min(step, n_rows - r, rows_per_slice - r % rows_per_slice)
        imp = None
        if importance is not None:
            e = r // rows_per_slice
            imp = importance[e * n_per_row : (e + 1) * n_per_row]
        with source.window(base + r * src_row, k * src_row) as w:
            try:
                out = rows.quantize(
                    src_type, dst_type, w.address, k, n_per_row, importance=imp, check=not allow_nonfinite
                )
            except NonFiniteRow as e:
                raise _nonfinite(tp.name, r + e.row) from None
        writer.write(out)
        r += k
        done += k * src_row
        if progress:
            progress(QuantizeProgress(i, n, tp.name, done, total))
    return done
