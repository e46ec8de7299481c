"""The GGUF reader against hostile input and against gguf-py's own reader.

A small valid GGUF is written with gguf-py's GGUFWriter (every value type, arrays, a quantized tensor);
then every truncation of it and a seeded mutation corpus must give either GGUFError or a read whose
tensors lie inside the file. Hand-built hostile files check each validation rule by name and offset.
The real SmolLM2 file must open and agree with gguf-py's GGUFReader on every KV and tensor.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ggufkit.errors import GGUFError, GgufkitError
from ggufkit.gguf.reader import GGUFModel, open_gguf
from tests.helpers.gguf_build import TOKENS, raw_gguf, write_small_gguf
from tests.helpers.gguf_build import raw_kv as _kv
from tests.helpers.gguf_build import raw_string as _s
from tests.helpers.gguf_build import raw_tensor_info as _ti

EXPECTED_TENSORS = {  # name: (ggml shape, type, bytes)
    "f32.weight": ((32, 4), T.F32, 512),
    "f16.weight": ((64,), T.F16, 128),
    "q8.weight": ((64, 2), T.Q8_0, 136),
    "q4k.weight": ((256, 1), T.Q4_K, 144),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    return path, write_small_gguf(path)


def _reader_value(field):
    """A KV's value as gguf-py's GGUFReader sees it, normalised for comparison."""
    value = field.contents()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return value


def _ours_value(kv):
    v = kv.value
    return v.tolist() if isinstance(v, np.ndarray) else v


def assert_matches_gguf_py(m: GGUFModel, path: Path) -> None:
    """Every KV and tensor-table entry equals what gguf-py's GGUFReader reads from the same file."""
    r = gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    with open(path, "rb") as fh:
        header = fh.read(m.data_offset)
    assert list(m.kv) == list(fields)
    for key, f in fields.items():
        kv = m.kv[key]
        assert kv.type == f.types[0], key
        assert kv.sub_type == (f.types[-1] if f.types[0] == V.ARRAY else None), key
        ours, theirs = _ours_value(kv), _reader_value(f)
        if kv.type == V.FLOAT32 or kv.sub_type == V.FLOAT32:
            np.testing.assert_array_equal(np.float32(ours), np.float32(theirs), err_msg=key)
        else:
            assert ours == theirs, key
        # The raw bytes are the field's bytes in the file, key included.
        raw = header[f.offset : f.offset + sum(p.nbytes for p in f.parts)]
        assert kv.raw == raw, key
    assert [t.name for t in m.tensors] == [t.name for t in r.tensors]
    for ours, theirs in zip(m.tensors, r.tensors):
        assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.ggml_type == theirs.tensor_type, ours.name
        assert ours.n_elements == theirs.n_elements, ours.name
        assert ours.nbytes == theirs.n_bytes, ours.name
        assert m.data_offset + ours.offset == theirs.data_offset, ours.name
    assert m.version == r.fields["GGUF.version"].contents()
    assert m.alignment == r.alignment
    assert m.data_offset == r.data_offset


def test_small_file_reads_like_gguf_py(small):
    path, data = small
    with open_gguf(path) as m:
        assert m.version == 3 and m.alignment == 32 and m.file_size == len(data)
        assert m.architecture == "llama"
        assert_matches_gguf_py(m, path)
        # Values as written.
        assert m.get("test.u64") == 2**64 - 1 and m.get("test.i64") == -(2**63)
        assert m.get("test.bool") is True and m.get("test.str") == "héllo wörld"
        assert m.kv["test.arr_i16"].sub_type == V.INT16 and list(m.get("test.arr_i16")) == [1, -2, 3]
        # numeric and BOOL arrays decode (on first read) to numpy arrays of the element type, writable
        for key, dtype, values in [
            ("test.arr_i16", "<i2", [1, -2, 3]),
            ("test.arr_f64", "<f8", [0.5, 1.5]),
            ("test.arr_bool", "?", [True, False, True]),
            ("tokenizer.ggml.token_type", "<i4", [2, 3, 3, 1, 1, 1, 1]),
        ]:
            arr = m.get(key)
            assert isinstance(arr, np.ndarray) and arr.dtype == np.dtype(dtype), key
            assert arr.tolist() == values and arr.flags.writeable and m.get(key) is arr, key
        assert m.get("tokenizer.ggml.tokens") == TOKENS
        assert m.get("test.arr_str") == ["a\0b", "", "x" * 256, "\0"] and m.kv["test.arr_str"].has_nul()
        assert not m.kv["tokenizer.ggml.tokens"].has_nul()
        _check_values(m)
        assert m.get("missing", "dflt") == "dflt"
        # The KV raws tile the metadata section exactly, in file order, from the end of the header.
        blob = b"".join(kv.raw for kv in m.kv.values())
        assert data[24 : 24 + len(blob)] == blob
        for t in m.tensors:
            shape, qtype, nbytes = EXPECTED_TENSORS[t.name]
            assert (t.shape, t.ggml_type, t.nbytes) == (shape, qtype, nbytes)
            view = t.data()
            assert view.dtype == np.uint8 and view.shape == (nbytes,) and not view.flags.writeable
            start = m.data_offset + t.offset
            assert view.tobytes() == data[start : start + nbytes]
        # F32 data reads back as written (numpy order (4, 32) = ggml (32, 4)).
        f32 = m.tensor("f32.weight").data().view(np.float32).reshape(4, 32)
        np.testing.assert_array_equal(f32, gguf.GGUFReader(path).tensors[0].data)
        with pytest.raises(KeyError):
            m.tensor("nope")
    with pytest.raises(GGUFError, match="closed"):
        m.tensors[0].data()


def test_custom_alignment(tmp_path):
    path = tmp_path / "a64.gguf"
    write_small_gguf(path, alignment=64)
    with open_gguf(path) as m:
        assert m.alignment == 64 and m.data_offset % 64 == 0
        assert all(t.offset % 64 == 0 for t in m.tensors)
        assert_matches_gguf_py(m, path)


def _fresh(folder: Path, i: int, data: bytes) -> Path:
    """Write a case to a new file (rewriting one file in place costs milliseconds per truncate)."""
    path = folder / f"case{i}.gguf"
    path.write_bytes(data)
    return path


def test_every_truncation_is_a_clean_error(small, tmp_path):
    """Cut anywhere before the last tensor byte -> GGUFError; cut only the final padding -> still reads
    (llama.cpp maps tensors by their own size, so the padding after the last one is not needed)."""
    path, data = small
    r = gguf.GGUFReader(path)
    last_byte = max(t.data_offset + t.n_bytes for t in r.tensors)
    assert last_byte < len(data)  # the writer pads the last tensor: both branches below are exercised
    for n in range(len(data)):
        cut = _fresh(tmp_path, n, data[:n])
        try:
            m = open_gguf(cut)
        except GGUFError as e:
            assert n < last_byte, f"truncation to {n} bytes (only padding cut) was refused: {e}"
            assert e.offset is None or 0 <= e.offset <= n, (n, e)
            assert "\n" not in str(e)
        else:
            assert n >= last_byte, f"truncation to {n} of {len(data)} bytes was read without error"
            assert [t.nbytes for t in m.tensors] == [t.n_bytes for t in r.tensors]
        cut.unlink()


# ---- hand-built hostile files: one rule each ------------------------------------------------------


GOOD_KV = _kv("general.architecture", V.STRING, _s("llama"))
GOOD_T = _ti("w", [32, 2], T.F32, 0)
GOOD_DATA = bytes(256)
U32, U64 = 2**32 - 1, 2**64 - 1

HOSTILE = {
    "bad magic": (raw_gguf(magic=b"GGML"), "not a GGUF file", 0),
    "version 1": (raw_gguf(version=1), "version 1 is no longer supported", 4),
    "big-endian": (raw_gguf(version=0x03000000), "big-endian", 4),
    "version 4": (raw_gguf(version=4), "unsupported GGUF version 4", 4),
    "huge tensor count": (raw_gguf(n_tensors=2**63), "tensor count", 8),
    "huge KV count": (raw_gguf([GOOD_KV], n_kv=U64), "KV count", 16),
    "KV count past end": (raw_gguf([GOOD_KV], n_kv=2), "KV 1 key length needs 8 bytes but only 0 remain", 69),
    "huge key length": (raw_gguf([struct.pack("<Q", U64) + b"k" * 20]), "key length", 24),
    "empty key": (raw_gguf([_kv("", V.UINT8, b"\1"), GOOD_KV]), "empty key", 24),
    "key not UTF-8": (raw_gguf([_kv(b"\xff\xfe", V.UINT8, b"\1")]), "UTF-8", 32),
    "duplicate key": (raw_gguf([GOOD_KV, GOOD_KV]), "duplicate key", 24 + len(GOOD_KV)),
    "unknown value type": (raw_gguf([_kv("k", 13, b"\0" * 8)]), "value type", 33),
    "bool not 0/1": (raw_gguf([_kv("k", V.BOOL, b"\2")]), "bool", 37),
    "huge string value": (raw_gguf([_kv("k", V.STRING, struct.pack("<Q", 2**40) + b"x")]), "length", 37),
    "huge numeric array": (raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQ", V.FLOAT64, U64))]), "remain", 41),
    "huge string array": (raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2**62))]), "remain", 41),
    "array of arrays": (
        raw_gguf([_kv("k", V.ARRAY, struct.pack("<IIQ", V.ARRAY, V.UINT8, 1))]),
        "arrays",
        37,
    ),
    "unknown array type": (raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQ", 99, 1))]), "value type", 37),
    "bool array not 0/1": (
        raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQ", V.BOOL, 4) + b"\1\0\3\2")]),
        r"KV 'k' element 2 is a bool stored as 3 \(must be 0 or 1\)",
        49 + 2,
    ),
    # String arrays: the fast walk has no per-element checks; the error comes from the careful one.
    "last string past end": (
        raw_gguf(
            [_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _s("ab") + struct.pack("<Q", 100) + b"xy")]
        ),
        "KV 'k' element 1 length 100 exceeds the 2 bytes left in the file",
        59,
    ),
    "string past end, not last": (
        raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQQ", V.STRING, 3, 2**40) + b"x" * 20)]),
        "KV 'k' element 0 length 1099511627776 exceeds the 20 bytes left in the file",
        49,
    ),
    "string length 2^64-1": (
        raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQQ", V.STRING, 2, U64) + b"x" * 10)]),
        f"KV 'k' element 0 length {U64} exceeds the 10 bytes left in the file",
        49,
    ),
    "string length cut": (
        raw_gguf([_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _s("abcdefgh") + b"\1\0\0")]),
        "KV 'k' element 1 length needs 8 bytes but only 3 remain",
        65,
    ),
    "alignment not u32": (
        raw_gguf([_kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]),
        "UINT32",
        24,
    ),
    "alignment not 2^n": (raw_gguf([_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "power", 24),
    "alignment zero": (raw_gguf([_kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "power", 24),
    "5 dims": (raw_gguf([], [_ti("w", [32, 1, 1, 1, 1], T.F32, 0)], GOOD_DATA), "5 dimensions", 33),
    "0 dims": (raw_gguf([], [_ti("w", [], T.F32, 0)], GOOD_DATA), "0 dimensions", 33),
    "zero dim": (raw_gguf([], [_ti("w", [32, 0], T.F32, 0)], GOOD_DATA), "must be positive", 45),
    "negative dim": (raw_gguf([], [_ti("w", [-32], T.F32, 0)], GOOD_DATA), "must be positive", 37),
    "dims overflow": (raw_gguf([], [_ti("w", [2**40, 2**40], T.F32, 0)], GOOD_DATA), "overflows", 45),
    "unknown ggml type 4": (raw_gguf([], [_ti("w", [32], 4, 0)], GOOD_DATA), "unknown ggml type 4", 45),
    "unknown ggml type big": (raw_gguf([], [_ti("w", [32], U32, 0)], GOOD_DATA), "unknown ggml type", 45),
    "row vs block": (raw_gguf([], [_ti("w", [33, 2], T.Q8_0, 0)], GOOD_DATA), "block size 32", 37),
    "unaligned offset": (raw_gguf([], [_ti("w", [8], T.F32, 16)], GOOD_DATA), "alignment", 49),
    "offset past end": (raw_gguf([], [_ti("w", [8], T.F32, 2**40)], GOOD_DATA), "past the end", 49),
    "data past end": (raw_gguf([], [GOOD_T], GOOD_DATA[:255]), "past the end", 57),
    "huge offset": (raw_gguf([], [_ti("w", [8], T.F32, 2**63 - 32)], GOOD_DATA), "past the end", 49),
    "overlap": (
        raw_gguf([], [_ti("a", [64], T.F32, 0), _ti("b", [64], T.F32, 128)], GOOD_DATA),
        "overlaps",
        57 + 25,
    ),
    "duplicate tensor": (
        raw_gguf([], [GOOD_T, _ti("w", [8], T.F32, 256)], GOOD_DATA * 2),
        "duplicate tensor name",
        24 + len(GOOD_T),
    ),
    "long tensor name": (raw_gguf([], [_ti("x" * 64, [8], T.F32, 0)], GOOD_DATA), "allows < 64", 24),
    "name not UTF-8": (raw_gguf([], [_ti(b"\xc3(", [8], T.F32, 0)], GOOD_DATA), "UTF-8", 32),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_names_rule_and_offset(case, tmp_path):
    data, reason, offset = HOSTILE[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=reason) as e:
        open_gguf(path)
    assert isinstance(e.value, GgufkitError) and e.value.path == str(path)
    if offset is not None:
        assert e.value.offset == offset, str(e.value)
    assert "\n" not in str(e.value)


def test_hand_built_valid_files_open(tmp_path):
    """The builder above makes readable files, so the hostile cases fail for their one broken rule."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(
        raw_gguf([GOOD_KV, _kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 0))], [GOOD_T], GOOD_DATA)
    )
    with open_gguf(path) as m:
        assert m.architecture == "llama" and m.get("k") == [] and m.tensor("w").nbytes == 256
    path.write_bytes(raw_gguf(version=2))  # v2: same layout, no tensors, no KVs
    assert open_gguf(path).version == 2


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="No such file"):
        open_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        open_gguf(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file"):
        open_gguf(tmp_path / "empty.gguf")


# ---- seeded mutation corpus -------------------------------------------------------------------------

N_MUTATIONS = 12_000
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    12,
    13,
    31,
    32,
    33,
    63,
    64,
    255,
    256,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


def _scalar_fields(path: Path) -> list[tuple[int, int]]:
    """(offset, width) of every 4- or 8-byte integer field of the file's header, located with gguf-py's
    reader: lengths, counts, value and ggml types, dims, offsets, and scalar values."""
    r = gguf.GGUFReader(path)
    out = []
    for f in list(r.fields.values()) + [t.field for t in r.tensors]:
        pos = f.offset
        for part in f.parts:
            if part.size == 1 and part.dtype.itemsize in (4, 8) and part.dtype.kind in "ui":
                out.append((pos, part.dtype.itemsize))
            elif part.dtype.kind in "ui" and part.dtype.itemsize == 8:  # dims: one array of u64
                out += [(pos + 8 * i, 8) for i in range(part.size)]
            pos += part.nbytes
    return out


def _mutate(rng: random.Random, data: bytes, fields, header_end: int) -> tuple[str, bytes]:
    buf = bytearray(data)
    kind = rng.randrange(7)
    if kind <= 1:  # one or two integer fields set to an interesting or random value
        for _ in range(kind + 1):
            pos, width = rng.choice(fields)
            old = int.from_bytes(buf[pos : pos + width], "little")
            value = rng.choice(
                INTERESTING
                + [len(data), len(data) + 1, old + 1, old - 1, old * 2, rng.getrandbits(8 * width)]
            )
            buf[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        return f"fields={kind + 1}", bytes(buf)
    if kind == 2:  # random byte changes, mostly in the header
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(header_end if rng.random() < 0.9 else len(buf))
            buf[pos] = rng.randrange(256)
        return "bytes", bytes(buf)
    if kind == 3:  # one bit flip
        pos = rng.randrange(header_end)
        buf[pos] ^= 1 << rng.randrange(8)
        return "bit", bytes(buf)
    if kind == 4:  # delete or insert a chunk in the header
        pos = rng.randrange(header_end)
        n = rng.randint(1, 16)
        if rng.random() < 0.5:
            del buf[pos : pos + n]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(n))
        return "splice", bytes(buf)
    if kind == 5:  # copy one header span over another
        a, b = rng.randrange(header_end), rng.randrange(header_end)
        n = rng.randint(1, 32)
        buf[b : b + n] = data[a : a + n]
        return "copy", bytes(buf[: len(data)])
    pos, width = rng.choice(fields)  # a field mutation and a truncation
    buf[pos : pos + width] = rng.choice(INTERESTING).to_bytes(8, "little")[:width]
    return "field+truncate", bytes(buf[: rng.randrange(len(buf))])


def _check_successful_read(m: GGUFModel, data: bytes) -> None:
    assert m.file_size == len(data) and m.data_offset <= len(data)
    spans = sorted((m.data_offset + t.offset, t.nbytes) for t in m.tensors)
    for (start, n), nxt in zip(spans, spans[1:] + [(len(data), 0)]):
        assert start % m.alignment == 0 and start + n <= nxt[0] <= len(data)
    for t in m.tensors:
        assert t.nbytes > 0 and t.data().size == t.nbytes
    blob = b"".join(kv.raw for kv in m.kv.values())
    assert data[24 : 24 + len(blob)] == blob
    _check_values(m)


def _check_values(m: GGUFModel) -> None:
    """Every value reads (string arrays decode on first use) and each lazy NUL check agrees with the
    decoded strings; re-encoding a string array gives back its raw bytes."""
    for kv in m.kv.values():
        lazy = kv.has_nul()  # before the first decode: from the raw bytes
        value = kv.value
        if kv.type == V.STRING:
            assert lazy == ("\0" in value), kv.key
        elif kv.type == V.ARRAY and kv.sub_type == V.STRING:
            assert isinstance(value, list) and lazy == any("\0" in v for v in value), kv.key
            elements = b"".join(
                struct.pack("<Q", len(b)) + b for b in (v.encode("utf-8", "surrogateescape") for v in value)
            )
            assert kv.raw.endswith(elements) and kv.has_nul() == lazy, kv.key


def test_mutation_corpus(small, tmp_path):
    path, data = small
    fields = _scalar_fields(path)
    with open_gguf(path) as m:
        header_end = m.data_offset
    assert len(fields) > 50
    rng = random.Random(20260101)
    outcomes = {"error": 0, "read": 0}
    for i in range(N_MUTATIONS):
        kind, mutated = _mutate(rng, data, fields, header_end)
        target = _fresh(tmp_path, i, mutated)
        try:
            m = open_gguf(target)
        except GGUFError as e:
            outcomes["error"] += 1
            assert e.offset is None or 0 <= e.offset <= len(mutated), (i, kind, e)
            assert "\n" not in str(e), (i, kind)
            continue
        except Exception as e:  # noqa: BLE001 - anything else is the bug this test hunts
            pytest.fail(f"mutation {i} ({kind}) raised {type(e).__name__}: {e}")
        outcomes["read"] += 1
        with m:
            _check_successful_read(m, mutated)
        target.unlink()
    # Both outcomes must be exercised, or the corpus is not testing what it claims.
    assert outcomes["error"] > N_MUTATIONS // 4 and outcomes["read"] > N_MUTATIONS // 20, outcomes


# ---- the real file ------------------------------------------------------------------------------------


def test_smollm2_opens_and_matches_gguf_py(smollm2_path):
    with open_gguf(smollm2_path) as m:
        assert m.architecture == "llama"
        assert_matches_gguf_py(m, Path(smollm2_path))
        assert len(m.get("tokenizer.ggml.tokens")) == 49152
        r = gguf.GGUFReader(smollm2_path)
        for ours, theirs in zip(m.tensors[:3], r.tensors[:3]):  # same bytes, lazily mapped
            np.testing.assert_array_equal(ours.data(), np.asarray(theirs.data).view(np.uint8).reshape(-1))


# ---- quantizing needs no numpy ---------------------------------------------------------------------

NO_NUMPY_SCRIPT = """
import sys
from ggufkit.gguf.types import GGMLQuantizationType as T, GGUFValueType as V
from ggufkit.gguf.reader import open_gguf
from ggufkit.gguf.writer import GGUFStreamWriter, TensorEntry, copy_kv, header_bytes, kv_bytes
from ggufkit.quantize.plan import plan_for_gguf

*models, small, out = sys.argv[1:]
for path in [*models, small]:
    with open_gguf(path) as m:
        kvs = [copy_kv(kv) for kv in m.kv.values()]
        assert [kv.raw for kv in m.kv.values() if not kv.has_nul()] == [
            b for kv, b in zip(m.kv.values(), kvs) if not kv.has_nul()
        ]
        scalars = {k: kv.value for k, kv in m.kv.items() if kv.type != V.ARRAY}
        assert scalars["general.architecture"] == "llama"
        if path == small:  # a string array with NULs: copy_kv re-serializes it
            nul = m.kv["test.arr_str"]
            assert nul.has_nul() and copy_kv(nul) != nul.raw
            continue
        plan = plan_for_gguf(m, "Q4_K_M")
        assert {t.dst_type for t in plan.tensors} >= {T.Q4_K, T.Q6_K}, plan.tensors
        entries = [TensorEntry(t.name, t.shape, t.dst_type) for t in plan.tensors]
        header, offsets = header_bytes(kvs, entries)
        assert header.startswith(b"GGUF") and len(offsets) == len(entries)
kvs = [kv_bytes("general.architecture", V.STRING, "llama")]
kvs.append(kv_bytes("k", V.ARRAY, ["a", "b"], sub_type=V.STRING))
with GGUFStreamWriter(out, kvs, [TensorEntry("w", (32, 2), T.F32)]) as w:
    w.begin_tensor("w")
    for chunk in (bytes(100), bytearray(100), memoryview(bytes(56))):
        w.write(chunk)
    w.end_tensor()
    w.commit()
with open_gguf(out) as m:
    assert m.get("k") == ["a", "b"] and m.tensor("w").nbytes == 256
print(sorted(name for name in sys.modules if name.split(".")[0] == "numpy"))
assert "numpy" not in sys.modules, "numpy was imported"
"""


def _run_no_numpy(prefix: str, *args) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", prefix + NO_NUMPY_SCRIPT, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_reading_planning_and_writing_import_no_numpy(synthetic_f32, smollm2_path, small, tmp_path):
    """What `ggufkit quantize` does around the kernels (open, copy the KVs, plan Q4_K_M, write a file)
    runs in a fresh interpreter without importing numpy (~45 ms of a small quantize job)."""
    path, _ = small
    run = _run_no_numpy("", synthetic_f32, smollm2_path, path, tmp_path / "out.gguf")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"
    # The check is live: the same script with numpy imported first fails on its last line.
    run = _run_no_numpy("import numpy", synthetic_f32, smollm2_path, path, tmp_path / "out2.gguf")
    assert run.returncode != 0 and "numpy was imported" in run.stderr, run.stderr[-3000:]


# ---- ggufkit's own copy of gguf-py's constants ------------------------------------------------------


def test_ggml_types_match_gguf_py():
    """ggufkit.gguf.types (used so that reading/writing files needs no gguf-py import) holds exactly gguf-py's
    type ids, value types and block sizes."""
    from ggufkit.gguf import types as ours

    assert [(m.name, m.value) for m in ours.GGUFValueType] == [(m.name, m.value) for m in V]
    assert [(m.name, m.value) for m in ours.GGMLQuantizationType] == [(m.name, m.value) for m in T]
    assert {int(k): v for k, v in ours.GGML_QUANT_SIZES.items()} == {
        int(k): tuple(v) for k, v in gguf.GGML_QUANT_SIZES.items()
    }
    # interchangeable with gguf-py's enums as values and dict keys
    assert ours.GGMLQuantizationType.Q4_K == T.Q4_K and gguf.GGML_QUANT_SIZES[ours.GGMLQuantizationType.Q4_K]
