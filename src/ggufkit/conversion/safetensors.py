"""A validating, memory-mapped reader of a Hugging Face checkpoint's safetensors files.

The format (https://github.com/huggingface/safetensors): `u64 N` little-endian, then N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data
area; offsets are relative to the data area's start. Every header is checked before anything is mapped
or allocated, as the safetensors library itself does: N bounded (100 MB) and inside the file, the JSON an
object of well-formed entries, bytes == prod(shape) * itemsize, the ranges neither overlapping nor leaving
a gap and covering the data area exactly. Any lie is one `ConvertError` naming the file and the tensor.

Tensors are read as read-only numpy views of an mmap of each file: nothing is copied until a
consumer converts, and the page cache, not the heap, holds the bytes.

Order (convert_hf_to_gguf.py, `ModelBase.index_tensors` + gguf-py `SafetensorsLocal`): with
`model.safetensors.index.json`, the distinct files its weight_map names, sorted; without it, the folder's
`model*.safetensors` files, sorted. Within a file, names sorted (Python str order). A name in two files
keeps its first position and the later file's data (the reference builds one dict). With an index, the
set of names in the files must equal the set the index names, both ways.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufkit.errors import ConvertError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound on N

# safetensors dtype -> (numpy dtype as read, bytes per element). BF16 is read as its uint16 bit patterns.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}
_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
# Valid safetensors dtypes this converter does not take (named in the error instead of "unknown").
_OTHER_DTYPES = {"F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint: where its bytes are, and what they are."""

    name: str
    dtype: str  # "F32" | "F16" | "BF16"
    shape: tuple[int, ...]  # HF / numpy order
    path: Path
    offset: int  # absolute byte offset in `path`
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


def _fail(path: Path, reason: str) -> ConvertError:
    return ConvertError(f"{path}: {reason}")


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> list[TensorRef]:
    """The validated tensor table of one safetensors file, in file-name order. Raises ConvertError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(path, f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise _fail(path, f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise _fail(path, "file changed while reading its header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")

    data_start = 8 + n
    data_size = size - data_start
    refs: list[TensorRef] = []
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise _fail(path, "__metadata__ is not a map of strings")
            continue
        refs.append(_entry(path, name, meta, data_start, data_size))

    # The ranges, sorted, must tile [0, data_size) exactly: no overlap, no gap, nothing past the end.
    end = 0
    for ref in sorted(refs, key=lambda r: (r.offset, r.nbytes)):
        begin = ref.offset - data_start
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise _fail(path, f"tensor {ref.name!r}: data_offsets begin {begin} {what} (ends at {end})")
        end = begin + ref.nbytes
    if end != data_size:
        raise _fail(path, f"tensors cover {end} bytes of a {data_size}-byte data area")
    refs.sort(key=lambda r: r.name)
    return refs


def _entry(path: Path, name: str, meta, data_start: int, data_size: int) -> TensorRef:
    if not isinstance(meta, dict):
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(path, f"tensor {name!r}: dtype missing or not a string")
    if dtype not in DTYPES:
        kind = "unsupported" if dtype in _OTHER_DTYPES else "unknown"
        raise _fail(path, f"tensor {name!r}: {kind} dtype {dtype[:40]!r} (F32, F16 and BF16 are read)")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise _fail(path, f"tensor {name!r}: data_offsets end {end} is past the {data_size}-byte data area")
    expected = math.prod(shape) * DTYPES[dtype][1]  # Python ints: no overflow
    if end - begin != expected:
        raise _fail(
            path,
            f"tensor {name!r}: {dtype} {tuple(shape)} needs {expected} bytes, offsets give {end - begin}",
        )
    return TensorRef(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _load_json(path: Path, what: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConvertError(f"{path}: {what} is not valid JSON: {str(e)[:200]}") from None


def _part_names(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard file names in the reference's order, and the index's weight map if there is one."""
    index = folder / INDEX_FILE
    if index.is_file():
        doc = _load_json(index, INDEX_FILE)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConvertError(f"{index}: no 'weight_map' object of tensor name -> file name")
        for part in set(weight_map.values()):
            if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
                raise ConvertError(f"{index}: shard name {part!r} is not a file name in the folder")
        return sorted(set(weight_map.values())), weight_map
    try:
        names = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
    except OSError as e:
        raise ConvertError(f"{folder}: cannot list: {e.strerror or e}") from None
    return names, None


class Checkpoint:
    """The tensors of a checkpoint folder, memory-mapped. Use as a context manager or call close()."""

    def __init__(self, folder: Path, tensors: dict[str, TensorRef]):
        self.folder = folder
        self.tensors = tensors
        self._maps: dict[Path, mmap.mmap] = {}

    def read(self, name: str) -> np.ndarray:
        """The data as stored (float32, float16, or uint16 bit patterns for BF16): a read-only view."""
        ref = self.tensors[name]
        mm = self._maps.get(ref.path)
        if mm is None:
            if ref.nbytes == 0:
                return np.zeros(ref.shape, DTYPES[ref.dtype][0])
            try:
                with open(ref.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ConvertError(f"{ref.path}: cannot map: {e}") from None
            self._maps[ref.path] = mm
        if ref.offset + ref.nbytes > len(mm):
            raise ConvertError(f"{ref.path}: file shrank below tensor {name!r}'s data")
        if _WILLNEED is not None:  # start reading the whole range ahead: faulting page by page is slower
            start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
            mm.madvise(_WILLNEED, start, ref.offset + ref.nbytes - start)
        dtype = DTYPES[ref.dtype][0]
        return np.frombuffer(mm, dtype, ref.nbytes // dtype.itemsize, ref.offset).reshape(ref.shape)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop the tensor's pages (or those of its bytes [begin, end)) from this process's map
        (MADV_DONTNEED): the page cache keeps them and a later read maps them again, so nothing changes but
        the resident size, which then grows with the rows in use instead of with every page read so far.
        A part releases only the pages wholly inside it (its neighbours may be in use); the whole tensor
        also its first and last page, which a neighbouring tensor may share: that costs it a page fault,
        not a byte."""
        ref = self.tensors[name]
        mm = self._maps.get(ref.path)
        if mm is None or _DONTNEED is None or ref.nbytes == 0:
            return
        page = mmap.PAGESIZE
        if begin <= 0 and (end is None or end >= ref.nbytes):
            start, stop = ref.offset - ref.offset % page, ref.offset + ref.nbytes
        else:
            start = -(-(ref.offset + max(begin, 0)) // page) * page
            stop = (ref.offset + min(ref.nbytes if end is None else end, ref.nbytes)) // page * page
        if stop > start:
            mm.madvise(_DONTNEED, start, stop - start)

    def close(self) -> None:
        # Arrays handed out hold a buffer export of their map, which keeps it alive; the OS unmaps it when the
        # last one goes. Closing it here would fail (BufferError) while any is in use.
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.folder)!r}, {len(self.tensors)} tensors)"


def open_checkpoint(folder) -> Checkpoint:
    """Index every tensor of the safetensors checkpoint in `folder`, checking each header (ConvertError)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder")
    parts, weight_map = _part_names(folder)
    if not parts:
        raise ConvertError(f"{folder}: no model*.safetensors files (and no {INDEX_FILE})")
    tensors: dict[str, TensorRef] = {}
    found: set[str] = set()
    for part in parts:
        path = folder / part
        if not path.is_file():
            raise ConvertError(f"{path}: shard named by {INDEX_FILE} is absent")
        for ref in read_header(path):
            tensors[ref.name] = ref
            found.add(ref.name)
    if weight_map is not None:
        missing = sorted(set(weight_map) - found)
        extra = sorted(found - set(weight_map))
        if missing:
            name = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConvertError(
                f"{folder}: tensor {name!r} named by {INDEX_FILE} is missing from its shard "
                f"{weight_map[name]!r}{more}"
            )
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ConvertError(f"{folder}: tensor {extra[0]!r} is in a shard but not in {INDEX_FILE}{more}")
    return Checkpoint(folder, tensors)
