"""GGUF metadata values: the checked reads every structure of a file is parsed with, the KV entries they
produce (array elements decoded lazily from the KV's raw bytes), and KV entries serialized as gguf.cpp writes
them.

A KV on disk: string key, u32 value type, value. A string is a u64 byte length and that many UTF-8 bytes;
an array value is u32 element type, u64 count, then the elements; scalars are little-endian (layout.SCALAR).
"""

from __future__ import annotations

import array
import struct
import sys
from itertools import repeat
from typing import TYPE_CHECKING

from ..errors import GGUFError
from .layout import I32, I64, SCALAR, U32, U64
from .types import GGUFValueType

if TYPE_CHECKING:
    import numpy as np

__all__ = ["KV", "Parser", "copy_kv", "encode_string", "kv_bytes", "show_name"]


def show_name(name: str, limit: int = 80) -> str:
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

        dtype = np.dtype(SCALAR[self.sub_type][2])
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


class Parser:
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
        (v,) = U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def i64(self, what: str) -> int:
        self.need(8, what)
        (v,) = I64.unpack_from(self.buf, self.pos)
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
        fmt, size, _ = SCALAR[vtype]
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
        size = SCALAR[sub][1]
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
        unpack = U64.unpack_from
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
        unpack = U64.unpack_from
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


def numpy_array(value):
    """numpy, if `value` is a numpy array (without importing numpy: an array means it is loaded)."""
    np = sys.modules.get("numpy")
    return np if np is not None and isinstance(value, np.ndarray) else None


def encode_string(s: str | bytes) -> bytes:
    # gguf.cpp stores std::string built from a C string: everything after an embedded NUL is lost.
    raw = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    raw = raw.split(b"\0", 1)[0]
    return U64.pack(len(raw)) + raw


def kv_bytes(key: str, vtype: GGUFValueType, value, *, sub_type: GGUFValueType | None = None) -> bytes:
    """One KV entry serialized as gguf.cpp writes it (strings may be str or raw bytes)."""
    vtype = GGUFValueType(vtype)
    out = [encode_string(key)]
    if vtype == GGUFValueType.ARRAY:
        sub = GGUFValueType(sub_type)
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"KV {key!r}: arrays of arrays are not supported by gguf")
        if sub == GGUFValueType.STRING:
            values = list(value)
            elements = b"".join([encode_string(v) for v in values])
        elif (np := numpy_array(value)) is not None:
            values = np.asarray(value, dtype=np.dtype(SCALAR[sub][0])).reshape(-1)
            elements = values.tobytes()
        else:
            values = list(value)
            elements = struct.pack(f"<{len(values)}{SCALAR[sub][0][1:]}", *values)
        out += [I32.pack(int(vtype)), I32.pack(int(sub)), U64.pack(len(values)), elements]
    elif vtype == GGUFValueType.STRING:
        out += [I32.pack(int(vtype)), encode_string(value)]
    else:
        out += [I32.pack(int(vtype)), struct.pack(SCALAR[vtype][0], value)]
    return b"".join(out)


def copy_kv(kv: KV) -> bytes:
    """An input KV as llama-quantize copies it: its exact bytes, unless a string holds a NUL (then cut)."""
    if kv.raw and not kv.has_nul():
        return kv.raw
    return kv_bytes(kv.key, kv.type, kv.value, sub_type=kv.sub_type)
