"""Open and validate GGUF files: the one reader every ggufkit command uses.

GGUF files come from strangers, so the reader trusts nothing it reads. Every length, count, type, shape
and offset is checked against the file size and the format's rules *before* anything is allocated or
indexed; any violation raises `GGUFError` with the byte offset where reading failed and the reason.
Opening reads only the header, the metadata (KVs) and the tensor table; tensor bytes are mapped lazily
by `TensorInfo.data()`. This module parses the header and the tensor table; the checked reads it uses and
the KV values they produce are gguf/values.py's, sizes and padding gguf/layout.py's.

Layout (little-endian, versions 2 and 3; version 1 used 32-bit counts and is refused):
    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv x     KV:     string key, u32 value type, value
    n_tensors x info:  string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset
    zero padding to `general.alignment` (default 32), then the data section; offsets are relative to it.
A string is a u64 byte length and that many UTF-8 bytes; an array value is u32 element type, u64 count,
then the elements. The checks mirror ggml's own gguf.cpp (duplicate keys and names, alignment must be a
u32 power of two, <= 4 dims, rows a whole number of blocks, names < 64 bytes) and add what a lazy reader
needs: every tensor aligned, inside the file, and not overlapping another.

gguf-py's GGUFReader is not used for parsing: on hostile input it raises assorted exceptions
(ValueError, IndexError, OverflowError, KeyError...) and builds a numpy view per field, which makes it
slow on 49k-token vocabularies. gguf-py's constants (value types, ggml types, block sizes) are the source
of truth for what is known, through ggufkit.gguf.types (a copy checked against them, so that opening a
file does not import gguf-py).

Opening a file does not import numpy either (~45 ms, a quarter of a small `ggufkit quantize` job, which
copies the KVs as raw bytes): array values are checked at open and decoded from their raw bytes the first
time they are read (numeric arrays to numpy then), and tensor data is mapped with numpy on first use.
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import TYPE_CHECKING

from ..errors import GGUFError
from .layout import ALIGNMENT as DEFAULT_ALIGNMENT
from .layout import GGUF_MAGIC, pad, tensor_nbytes
from .types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from .values import KV, Parser
from .values import show_name as _show

if TYPE_CHECKING:
    import numpy as np

__all__ = ["GGUFError", "GGUFModel", "KV", "TensorInfo", "open_gguf", "GGUF_MAGIC", "DEFAULT_ALIGNMENT"]

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names must be shorter (ggml stores them NUL-terminated in 64 bytes)
INT64_MAX = (1 << 63) - 1
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset


class TensorInfo:
    """One tensor table entry. `shape` is in ggml order: shape[0] = ne0 = row length. (A plain class: a
    record type a quantize process builds on import costs a tenth of a dataclass's creation.)"""

    __slots__ = ("name", "shape", "ggml_type", "offset", "nbytes", "n_elements", "_model")

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        ggml_type: GGMLQuantizationType,
        offset: int,  # relative to the data section
        nbytes: int,
        n_elements: int,
        _model: GGUFModel | None = None,
    ):
        self.name, self.shape, self.ggml_type = name, shape, ggml_type
        self.offset, self.nbytes, self.n_elements, self._model = offset, nbytes, n_elements, _model

    def __repr__(self) -> str:
        return (
            f"TensorInfo(name={self.name!r}, shape={self.shape!r}, ggml_type={self.ggml_type!r}, "
            f"offset={self.offset!r}, nbytes={self.nbytes!r}, n_elements={self.n_elements!r})"
        )

    @property
    def abs_offset(self) -> int:
        return self._model.data_offset + self.offset

    def data(self) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 1-D view (np.memmap) of the file, mapped on first use
        (numpy is imported then)."""
        if self._model is None:
            raise GGUFError(f"tensor {_show(self.name)} is not attached to an open file")
        return self._model._tensor_bytes(self)


class GGUFModel:
    """A validated GGUF file: header facts, metadata (`kv`, file order) and tensor table (file order)."""

    def __init__(
        self,
        path,
        version: int,
        alignment: int,
        data_offset: int,
        file_size: int,
        kv: dict[str, KV],
        tensors: list[TensorInfo],
    ):
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.file_size = file_size
        self.kv = kv
        self.tensors = tensors
        self._by_name = {t.name: t for t in tensors}
        self._map = None  # np.memmap of the whole file, made by the first TensorInfo.data()
        self._closed = False
        for t in tensors:
            t._model = self

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, key: str, default=None):
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    @property
    def architecture(self) -> str | None:
        arch = self.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def _tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        if self._closed:
            raise GGUFError(f"tensor {_show(t.name)}: the file is closed", path=self.path)
        if self._map is None:
            try:
                size = os.path.getsize(self.path)
            except OSError as e:
                raise GGUFError(f"cannot reopen the file: {e.strerror or e}", path=self.path) from None
            if size != self.file_size:
                raise GGUFError(
                    f"the file changed size since it was opened ({self.file_size} -> {size} bytes)",
                    path=self.path,
                )
            import numpy as np

            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.file_size,))
            except OSError as e:
                raise GGUFError(f"cannot map the file: {e.strerror or e}", path=self.path) from None
        start = self.data_offset + t.offset
        return self._map[start : start + t.nbytes]

    def close(self) -> None:
        """Drop the file mapping (views already handed out stay valid until they are released)."""
        self._map = None
        self._closed = True

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFModel({str(self.path)!r}, v{self.version}, {len(self.kv)} KVs, {len(self.tensors)} tensors)"
        )


def _parse(buf, size: int, path) -> GGUFModel:
    p = Parser(buf, size, path)

    # Header.
    p.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        p.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    p.pos = 4
    version = p.u32("version")
    if version == 1:
        p.fail("GGUF version 1 is no longer supported (ggml dropped it; convert the model again)", 4)
    if version != 0 and version & 0xFFFF == 0 and (version >> 24) in (2, 3):
        p.fail(
            f"big-endian GGUF file (version field {version:#010x}); only little-endian files are supported", 4
        )
    if version not in (2, 3):
        p.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
    n_tensors = p.u64("tensor count")
    if n_tensors > (size - p.pos) // _MIN_TENSOR_INFO_BYTES:
        p.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file", 8)
    n_kv = p.u64("KV count")
    if n_kv > (size - p.pos) // _MIN_KV_BYTES:
        p.fail(f"KV count {n_kv} cannot fit in a {size}-byte file", 16)

    # Metadata.
    kv: dict[str, KV] = {}
    kv_at: dict[str, int] = {}
    for i in range(n_kv):
        start = p.pos
        key = p.string(f"KV {i} key", strict=True)
        if not key:
            p.fail(f"KV {i} has an empty key", start)
        if key in kv:
            p.fail(f"duplicate key {_show(key)} (KV {i})", start)
        what = f"KV {_show(key)}"
        vtype = p.value_type(f"{what} value type")
        if vtype == GGUFValueType.ARRAY:
            sub, elements = p.array(what)
            kv[key] = KV._array(key, sub, elements, bytes(buf[start : p.pos]))
        else:
            value = p.scalar(vtype, f"{what} value")
            kv[key] = KV(key, vtype, value, None, bytes(buf[start : p.pos]))
        kv_at[key] = start

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.type != GGUFValueType.UINT32:
            p.fail(f"general.alignment must be UINT32, not {a.type.name}", kv_at[a.key])
        if a.value == 0 or a.value & (a.value - 1):
            p.fail(f"general.alignment {a.value} is not a power of two", kv_at[a.key])
        alignment = a.value

    # Tensor table.
    tensors: list[TensorInfo] = []
    offset_at: dict[str, int] = {}  # where each tensor's offset field is, for placement errors
    names: set[str] = set()
    for i in range(n_tensors):
        start = p.pos
        name = p.string(f"tensor {i} name", strict=True)
        if len(name.encode()) >= MAX_NAME:
            p.fail(
                f"tensor {i} name {_show(name)} is {len(name.encode())} bytes (ggml allows < {MAX_NAME})",
                start,
            )
        if name in names:
            p.fail(f"duplicate tensor name {_show(name)} (tensor {i})", start)
        names.add(name)
        what = f"tensor {_show(name)}"
        dims_at = p.pos
        n_dims = p.u32(f"{what} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            p.fail(f"{what} has {n_dims} dimensions (must be 1..{MAX_DIMS})", dims_at)
        shape = []
        n_elements = 1
        for d in range(n_dims):
            at = p.pos
            ne = p.i64(f"{what} dimension {d}")
            if ne < 1:
                p.fail(f"{what} dimension {d} is {ne} (must be positive)", at)
            n_elements *= ne
            if n_elements > INT64_MAX:
                p.fail(f"{what} has more than 2^63-1 elements (shape overflows)", at)
            shape.append(ne)
        type_at = p.pos
        t = p.u32(f"{what} type")
        try:
            ggml_type = GGMLQuantizationType(t)
            block_size = GGML_QUANT_SIZES[ggml_type][0]
        except (ValueError, KeyError):
            p.fail(f"{what} has unknown ggml type {t}", type_at)
        if block_size < 1 or shape[0] % block_size:
            p.fail(
                f"{what} of type {ggml_type.name} has rows of {shape[0]} elements, not a multiple of "
                f"the block size {block_size}",
                dims_at + 4,
            )
        nbytes = tensor_nbytes(shape, ggml_type)
        off_at = p.pos
        offset = p.u64(f"{what} data offset")
        if offset % alignment:
            p.fail(f"{what} data offset {offset} is not a multiple of the alignment {alignment}", off_at)
        tensors.append(TensorInfo(name, tuple(shape), ggml_type, offset, nbytes, n_elements))
        offset_at[name] = off_at

    # Data section: starts at the next alignment boundary (ggml pads only when there are tensors).
    data_offset = p.pos
    if n_tensors:
        data_offset = pad(data_offset, alignment)
    data_size = size - data_offset
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            p.fail(
                f"tensor {_show(t.name)} data [{t.offset}, {t.offset + t.nbytes}) overlaps the previous "
                f"tensor's (which ends at {end})",
                offset_at[t.name],
            )
        if t.offset > data_size or t.nbytes > data_size - t.offset:
            p.fail(
                f"tensor {_show(t.name)} data [{t.offset}, {t.offset + t.nbytes}) extends past the end of "
                f"the data section ({max(data_size, 0)} bytes; file truncated?)",
                offset_at[t.name],
            )
        end = t.offset + t.nbytes

    return GGUFModel(path, version, alignment, data_offset, size, kv, tensors)


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open and validate a GGUF file; reads the header, metadata and tensor table, not the tensor data.

    Raises GGUFError (with the byte offset and the reason) for anything malformed or unsupported,
    including files that cannot be opened. Usable as a context manager.
    """
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device could block or never end
            raise GGUFError("not a regular file", path=path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError("empty file, not a GGUF file", offset=0, path=path)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, size, path)
    except OSError as e:
        raise GGUFError(f"cannot read the file: {e.strerror or e}", path=path) from None
