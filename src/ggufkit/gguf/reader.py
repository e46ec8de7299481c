"""Open and validate GGUF files: the one reader every ggufkit command uses.

GGUF files come from strangers, so the reader trusts nothing it reads. Every length, count, type, shape
and offset is checked against the file size and the format's rules *before* anything is allocated or
indexed; any violation raises `GGUFError` with the byte offset where reading failed and the reason.
Opening reads only the header, the metadata (KVs) and the tensor table; tensor bytes are mapped lazily
by `TensorInfo.data()`.

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

import array
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING

from ..errors import GGUFError
from .types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

if TYPE_CHECKING:
    import numpy as np

__all__ = ["GGUFError", "GGUFModel", "KV", "TensorInfo", "open_gguf", "GGUF_MAGIC", "DEFAULT_ALIGNMENT"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names must be shorter (ggml stores them NUL-terminated in 64 bytes)
INT64_MAX = (1 << 63) - 1

# Fixed-size scalar types: struct format (little-endian), size in bytes, numpy dtype of arrays.
_SCALAR = {
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
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset


def _show(name: str, limit: int = 80) -> str:
    """A name from the file, safe to put in a one-line message (quoted, escaped, shortened)."""
    text = repr(name[:limit] if len(name) > limit else name)
    return text + ("..." if len(name) > limit else "")


class _Strings:
    """A string array's element lengths, for decoding its KV's raw bytes on first use.

    The reader checks every element's length when it opens the file (that walk is cheap); decoding ~100k
    vocabulary strings is not, and most commands never look at them (quantize copies KVs as raw bytes).
    The elements (each a u64 length and its bytes) are the last `nbytes` bytes of the KV's raw bytes.
    Values decode with errors="surrogateescape", which cannot fail, so a lazy decode raises nothing.
    """

    __slots__ = ("lengths", "nbytes")

    def __init__(self, lengths: list[int], nbytes: int):
        self.lengths = lengths
        self.nbytes = nbytes

    def __len__(self) -> int:
        return len(self.lengths)

    def decode(self, raw: bytes) -> list[str]:
        pos = len(raw) - self.nbytes
        # each element: its 8-byte length, then n bytes; pos ends up just past the element
        return [raw[(pos := pos + 8 + n) - n : pos].decode("utf-8", "surrogateescape") for n in self.lengths]

    def has_nul(self, raw: bytes) -> bool:
        """Whether an element's bytes hold a NUL: the elements' zero bytes are more than their length
        fields'. Lengths under 256 (the usual) have 7 zero bytes, 8 for 0; otherwise count them in native
        u64s (a u64 has as many zero bytes in either byte order)."""
        if not self.lengths:
            return False
        try:
            small = bytearray(self.lengths)
            in_lengths = 7 * len(small) + small.count(0)
        except ValueError:  # a length of 256 or more
            in_lengths = array.array("Q", self.lengths).tobytes().count(0)
        return raw.count(0, len(raw) - self.nbytes) > in_lengths


class _Numbers:
    """A numeric or BOOL array: its elements are the last count x size bytes of the KV's raw bytes,
    decoded to a numpy array on first use (opening a file does not import numpy)."""

    __slots__ = ("sub_type", "count")

    def __init__(self, sub_type: GGUFValueType, count: int):
        self.sub_type = sub_type
        self.count = count

    def __len__(self) -> int:
        return self.count

    def decode(self, raw: bytes) -> np.ndarray:
        import numpy as np

        dtype = np.dtype(_SCALAR[self.sub_type][2])
        offset = len(raw) - self.count * dtype.itemsize
        values = np.frombuffer(raw, dtype=dtype, count=self.count, offset=offset).copy()
        return values.astype(bool) if self.sub_type == GGUFValueType.BOOL else values


class KV:
    """One metadata entry. `raw` is its exact serialized bytes in the file (key included).

    value: int, float, bool or str for scalars; for arrays a list of str (STRING elements) or a numpy
    array (numeric and BOOL elements), with `sub_type` the element type. Strings that are not valid UTF-8
    keep their bytes as lone surrogates (str.encode("utf-8", "surrogateescape") gives them back). The
    elements of an array read from a file are decoded from `raw` the first time `value` is read.
    """

    __slots__ = ("key", "type", "sub_type", "raw", "_value", "_lazy")

    def __init__(
        self,
        key: str,
        type: GGUFValueType,
        value: object,
        sub_type: GGUFValueType | None = None,
        raw: bytes = b"",
    ):
        self.key = key
        self.type = type
        self.sub_type = sub_type
        self.raw = raw
        self._value = value
        self._lazy: _Strings | _Numbers | None = None

    @classmethod
    def _array(cls, key: str, sub_type: GGUFValueType, elements: _Strings | _Numbers, raw: bytes) -> KV:
        kv = cls(key, GGUFValueType.ARRAY, None, sub_type, raw)
        kv._lazy = elements
        return kv

    @property
    def value(self) -> object:
        if self._lazy is not None:
            self._value = self._lazy.decode(self.raw)
            self._lazy = None
        return self._value

    def has_nul(self) -> bool:
        """Whether the string value, or an element of a string array value, holds a NUL byte."""
        if self.type == GGUFValueType.STRING:
            return "\0" in self.value
        if self.type == GGUFValueType.ARRAY and self.sub_type == GGUFValueType.STRING:
            if isinstance(self._lazy, _Strings):
                return self._lazy.has_nul(self.raw)
            return any("\0" in v for v in self.value)
        return False

    def __repr__(self) -> str:
        sub = f", sub_type={self.sub_type!r}" if self.sub_type is not None else ""
        if self._lazy is not None:
            value = f"<{len(self._lazy)} {self.sub_type.name} elements, decoded on first use>"
            return f"KV(key={self.key!r}, type={self.type!r}, value={value}{sub})"
        return f"KV(key={self.key!r}, type={self.type!r}, value={self._value!r}{sub})"


@dataclass(eq=False)
class TensorInfo:
    """One tensor table entry. `shape` is in ggml order: shape[0] = ne0 = row length."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # relative to the data section
    nbytes: int
    n_elements: int
    _model: GGUFModel | None = field(default=None, repr=False, compare=False)

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


class _Parser:
    """Reads GGUF structures from a buffer, checking every size against what is left before using it."""

    def __init__(self, buf, size: int, path):
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, reason: str, offset: int | None = None):
        raise GGUFError(reason, offset=self.pos if offset is None else offset, path=self.path)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain (file truncated?)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def i64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _I64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, *, strict: bool) -> str:
        """A u64-length-prefixed UTF-8 string. Keys and names are strict; values keep undecodable bytes
        as lone surrogates (errors="surrogateescape") so they re-encode to the exact bytes."""
        start = self.pos
        n = self.u64(f"{what} length")
        if n > self.size - self.pos:
            self.fail(f"{what} length {n} exceeds the {self.size - self.pos} bytes left in the file", start)
        raw = self.buf[self.pos : self.pos + n]
        try:
            text = raw.decode("utf-8", "strict" if strict else "surrogateescape")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e.reason})", self.pos + e.start)
        self.pos += n
        return text

    def value_type(self, what: str) -> GGUFValueType:
        start = self.pos
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            self.fail(f"{what} {t} is not a known GGUF value type", start)

    def scalar(self, vtype: GGUFValueType, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what, strict=False)
        fmt, size, _ = _SCALAR[vtype]
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        if vtype == GGUFValueType.BOOL:
            if v > 1:
                self.fail(f"{what} is a bool stored as {v} (must be 0 or 1)")
            v = bool(v)
        self.pos += size
        return v

    def array(self, what: str) -> tuple[GGUFValueType, _Strings | _Numbers]:
        """(element type, elements): checked here, decoded from the KV's raw bytes when first read."""
        sub = self.value_type(f"{what} element type")
        if sub == GGUFValueType.ARRAY:
            self.fail(f"{what} is an array of arrays (not supported by ggml)", self.pos - 4)
        count_at = self.pos
        count = self.u64(f"{what} count")
        left = self.size - self.pos
        if sub == GGUFValueType.STRING:
            if count > left // 8:  # each element has at least its 8-byte length
                self.fail(f"{what} has {count} strings but only {left} bytes remain", count_at)
            return sub, self._string_array(count, what)
        size = _SCALAR[sub][1]
        if count > left // size:
            self.fail(f"{what} has {count} x {size}-byte elements but only {left} bytes remain", count_at)
        if sub == GGUFValueType.BOOL:
            elements = self.buf[self.pos : self.pos + count]
            bad = elements.translate(None, b"\0\1")  # the bytes that are neither 0 nor 1, in order
            if bad:
                i = elements.index(bad[:1])  # the first byte of that value is the first bad one
                self.fail(f"{what} element {i} is a bool stored as {bad[0]} (must be 0 or 1)", self.pos + i)
        self.pos += count * size
        return sub, _Numbers(sub, count)

    def _string_array(self, count: int, what: str) -> _Strings:
        # The hot loop of opening a file (tokenizer vocabularies and merges: ~50k-250k strings). One pass
        # reads each length and steps past its element, with no per-element check: an element that runs
        # past the end makes the next read fail (struct.error, or OverflowError beyond 2^63), or leaves pos
        # past the end after the last one. Then the careful walk finds the element and names it. Only the
        # lengths are kept: values cannot fail to decode (surrogateescape) and are decoded when first read.
        buf, first, pos = self.buf, self.pos, self.pos
        unpack = _U64.unpack_from
        try:
            # pos + 8 + n is positive, so `and n` keeps the length just read
            lengths = [(pos := pos + 8 + (n := unpack(buf, pos)[0])) and n for _ in repeat(None, count)]
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size or len(buf) != self.size:
            lengths, pos = self._string_array_checked(count, what)
        self.pos = pos
        return _Strings(lengths, pos - first)

    def _string_array_checked(self, count: int, what: str) -> tuple[list[int], int]:
        """The element lengths and the end, each length checked against what is left before the next is
        read (slower; the error names the element and its offset)."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        lengths = []
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.fail(f"{what} element {i} length needs 8 bytes but only {size - pos} remain")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.fail(
                    f"{what} element {i} length {n} exceeds the {size - pos} bytes left in the file", pos - 8
                )
            lengths.append(n)
            pos += n
        return lengths, pos


def _parse(buf, size: int, path) -> GGUFModel:
    p = _Parser(buf, size, path)

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
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            p.fail(f"{what} has unknown ggml type {t}", type_at)
        if block_size < 1 or shape[0] % block_size:
            p.fail(
                f"{what} of type {ggml_type.name} has rows of {shape[0]} elements, not a multiple of "
                f"the block size {block_size}",
                dims_at + 4,
            )
        nbytes = n_elements // block_size * type_size
        off_at = p.pos
        offset = p.u64(f"{what} data offset")
        if offset % alignment:
            p.fail(f"{what} data offset {offset} is not a multiple of the alignment {alignment}", off_at)
        tensors.append(TensorInfo(name, tuple(shape), ggml_type, offset, nbytes, n_elements))
        offset_at[name] = off_at

    # Data section: starts at the next alignment boundary (ggml pads only when there are tensors).
    data_offset = p.pos
    if n_tensors and data_offset % alignment:
        data_offset += alignment - data_offset % alignment
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
