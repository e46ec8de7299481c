"""Tiny GGUF files for the tests: one builder on gguf-py's GGUFWriter, and raw bytes for hostile files.

`write_gguf` writes a valid file with gguf-py (an independent writer, not ggufkit's), so a test states only
what its file holds. The `raw_*` functions assemble a GGUF byte by byte, without gguf-py, so that a file can
break any rule (counts, lengths, types, offsets); the hostile-input tests build theirs with them.
`write_small_gguf` is the small valid file, a KV of every value type, that the reader and inspect tests share.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V


def write_gguf(
    path: str | os.PathLike, arch: str = "llama", kvs: Mapping | None = None, tensors: Mapping | None = None
) -> Path:
    """Write a GGUF with gguf-py's GGUFWriter (general.architecture = arch first) and return its path.

    kvs, written in order: a bare name is gguf-py's own `add_<name>` call, with its key and value type
    ("block_count": 1 is `add_block_count(1)`, "{arch}.block_count" as UINT32); a dotted key is written as
    given by a `(vtype, value)` or `(GGUFValueType.ARRAY, values, sub_type)` tuple.
    tensors, in order: name -> numpy array (its dtype is the tensor's type; numpy shape is ggml's reversed),
    or (raw bytes as uint8 [rows, bytes per row], GGMLQuantizationType) for quantized blocks.
    """
    w = _writer(path, arch, kvs)
    for name, tensor in (tensors or {}).items():
        if isinstance(tensor, tuple):
            w.add_tensor(name, tensor[0], raw_dtype=tensor[1])
        else:
            w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def write_sparse_gguf(path: str | os.PathLike, arch: str, tensors, kvs: Mapping | None = None) -> Path:
    """A GGUF with the given metadata (as write_gguf's) and tensor table, whose data section is a hole
    (a sparse file): a model's plan without its bytes. tensors: (name, ggml shape, GGMLQuantizationType)."""
    w = _writer(path, arch, kvs)
    total = 0
    for name, shape, qt in tensors:
        blck, tsize = gguf.GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(shape)) // blck * tsize
        dtype = np.float16 if qt == T.F16 else np.float32
        w.add_tensor_info(name, list(reversed(shape)), np.dtype(dtype), nbytes, raw_dtype=qt)
        total += -(-nbytes // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    start = -(-os.path.getsize(path) // 32) * 32
    os.truncate(path, start + total)
    return Path(path)


def _writer(path, arch: str, kvs: Mapping | None) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (kvs or {}).items():
        if "." not in key:
            getattr(w, f"add_{key}")(value)
        else:
            vtype, value, *sub_type = value
            w.add_key_value(key, value, vtype, sub_type=sub_type[0] if sub_type else None)
    return w


# ---- raw bytes: a GGUF that can break any rule --------------------------------------------------------


def raw_string(text: str | bytes) -> bytes:
    """A GGUF string: uint64 length, then the bytes."""
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def raw_kv(key, vtype: int, payload: bytes) -> bytes:
    """A KV: key string, uint32 value type, then the payload as given."""
    return raw_string(key) + struct.pack("<I", vtype) + payload


def raw_tensor_info(name, dims, ggml_type: int, offset: int) -> bytes:
    """A tensor info: name string, uint32 dimension count, int64 dims, uint32 type, int64 data offset."""
    return (
        raw_string(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<q", d) for d in dims)
        + struct.pack("<Iq", ggml_type, offset)
    )


def raw_gguf(
    kvs=(), tensors=(), data=b"", *, version=3, n_kv=None, n_tensors=None, align=32, magic=b"GGUF"
) -> bytes:
    """A GGUF assembled byte by byte (no gguf-py), so that it can break any rule."""
    head = magic + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += b"\0" * (-len(body) % align)
    return body + data


# ---- the small valid file ------------------------------------------------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TOKENS = ["<unk>", "<s>", "</s>", "hello", " world", "é", "日本"]


def write_small_gguf(
    path: Path, *, alignment: int | None = None, file_type: int | None = 7, name: str | None = None
) -> bytes:
    """A small valid GGUF: KVs of every value type (scalars and arrays), four tensors (F32, F16, Q8_0,
    Q4_K). Returns the file's bytes."""
    rng = np.random.default_rng(7)
    kvs = {} if alignment is None else {"custom_alignment": alignment}
    kvs |= {
        "test.u8": (V.UINT8, 200),
        "test.i8": (V.INT8, -100),
        "test.u16": (V.UINT16, 60000),
        "test.i16": (V.INT16, -30000),
        "test.u32": (V.UINT32, 4_000_000_000),
        "test.i32": (V.INT32, -2_000_000_000),
        "test.f32": (V.FLOAT32, 0.25),
        "test.bool": (V.BOOL, True),
        "test.str": (V.STRING, "héllo wörld"),
        "test.u64": (V.UINT64, 2**64 - 1),
        "test.i64": (V.INT64, -(2**63)),
        "test.f64": (V.FLOAT64, -1.5e300),
        "test.arr_i16": (V.ARRAY, [1, -2, 3], V.INT16),
        "test.arr_f64": (V.ARRAY, [0.5, 1.5], V.FLOAT64),
        "test.arr_bool": (V.ARRAY, [True, False, True], V.BOOL),
        # NUL bytes inside elements, and lengths whose own bytes hold zeros (256 = 00 01 00 ...): the lazy
        # NUL check counts zero bytes against those of the length fields.
        "test.arr_str": (V.ARRAY, ["a\0b", "", "x" * 256, "\0"], V.STRING),
        "block_count": 2,
        "context_length": 128,
        "embedding_length": 64,
        "head_count": 4,
    }
    if file_type is not None:
        kvs["file_type"] = file_type  # 7 = Q8_0
    if name is not None:
        kvs["name"] = name
    kvs |= {
        "tokenizer_model": "gpt2",
        "token_list": TOKENS,
        "token_types": [2, 3, 3, 1, 1, 1, 1],
        "token_scores": [0.0, -1.0, -1.0, -2.0, -3.0, -4.0, -5.0],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "chat_template": CHAT_TEMPLATE,
    }
    tensors = {
        "f32.weight": rng.standard_normal((4, 32), dtype=np.float32),
        "f16.weight": rng.standard_normal(64).astype(np.float16),
        # Quantized tensors as raw blocks: 2 rows of 2 Q8_0 blocks (34 bytes each); 1 row of 1 Q4_K block.
        "q8.weight": (rng.integers(0, 256, (2, 68), dtype=np.uint8), T.Q8_0),
        "q4k.weight": (rng.integers(0, 256, (1, 144), dtype=np.uint8), T.Q4_K),
    }
    write_gguf(path, "llama", kvs, tensors)
    return path.read_bytes()
