"""The safetensors reader: values and order against the safetensors library and the reference's index_tensors
rules, every header lie refused by name, and a seeded mutation corpus (each mutant reads correctly or raises
ConvertError, never another exception)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ggufkit.conversion.safetensors import open_checkpoint, read_header
from ggufkit.errors import ConvertError


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.10.mlp.up_proj.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "model.layers.2.input_layernorm.weight": rng.standard_normal(4).astype(np.float16),
        "lm_head.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "model.embed_tokens.weight": rng.standard_normal((3, 4)).astype(np.float16),
    }


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _bf16_file(path: Path) -> np.ndarray:
    bits = np.array([[0x3F80, 0xBF80, 0x7F80], [0x0000, 0x4049, 0xFFC0]], dtype="<u2")
    path.write_bytes(_raw({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, bits.tobytes()))
    return bits


def test_unsharded_values_order_and_dtypes(tmp_path):
    t = _tensors(0)
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "other.safetensors").write_bytes(b"junk")  # not model*: ignored, as the reference does
    with open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt.tensors) == sorted(t)  # Python str order: '10' before '2', 'lm_head' before 'model'
        for name, want in t.items():
            ref = ckpt.tensors[name]
            got = ckpt.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape == ref.shape
            assert np.array_equal(got, want)
            assert not got.flags.writeable
            assert ref.dtype == {np.float32: "F32", np.float16: "F16"}[want.dtype.type]
            assert ref.nbytes == want.nbytes
            with open(ref.path, "rb") as f:  # offset is absolute in the file
                f.seek(ref.offset)
                assert f.read(ref.nbytes) == want.tobytes()
        with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
            assert list(f.keys()) == list(ckpt.tensors)


def test_bf16_is_read_as_bit_patterns(tmp_path):
    bits = _bf16_file(tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ckpt:
        got = ckpt.read("w")
        assert got.dtype == np.uint16 and np.array_equal(got, bits)


def test_shards_without_index_sorted_by_file_name(tmp_path):
    two = {"b": np.ones(2, np.float32), "a": np.zeros(2, np.float32)}
    save_file(two, str(tmp_path / "model-2.safetensors"))
    save_file({"z": np.ones(2, np.float16)}, str(tmp_path / "model-1.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt.tensors) == ["z", "a", "b"]
        assert ckpt.tensors["z"].path.name == "model-1.safetensors"


def _sharded(tmp_path: Path, weight_map: dict[str, str] | None = None) -> Path:
    save_file({"y": np.ones(2, np.float32), "x": np.zeros(3, np.float32)}, str(tmp_path / "s-b.safetensors"))
    save_file({"w": np.ones(4, np.float16)}, str(tmp_path / "s-a.safetensors"))
    wm = weight_map or {"x": "s-b.safetensors", "y": "s-b.safetensors", "w": "s-a.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return tmp_path


def test_index_names_the_shards(tmp_path):
    with open_checkpoint(_sharded(tmp_path)) as ckpt:  # index files need not be named model*
        assert list(ckpt.tensors) == ["w", "x", "y"]
        assert np.array_equal(ckpt.read("x"), np.zeros(3, np.float32))


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"x": "s-b.safetensors", "y": "s-b.safetensors", "w": "s-c.safetensors"}, "s-c.safetensors"),
        (
            {"x": "s-b.safetensors", "y": "s-b.safetensors", "w": "s-a.safetensors", "v": "s-a.safetensors"},
            "'v' ",
        ),
        ({"x": "s-b.safetensors", "w": "s-a.safetensors"}, "'y' is in a shard but not in"),
        ({"x": "../s-b.safetensors"}, "not a file name"),
    ],
)
def test_index_lies_refused(tmp_path, weight_map, message):
    with pytest.raises(ConvertError, match=message):
        open_checkpoint(_sharded(tmp_path, weight_map))


def test_no_checkpoint(tmp_path):
    with pytest.raises(ConvertError, match="no model"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ConvertError, match="not valid JSON"):
        open_checkpoint(tmp_path)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 200_000_000) + b"{}", "exceeds"),
        (struct.pack("<Q", 50) + b"{}", "past the end"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (struct.pack("<Q", 3) + b"[1]", "not an object"),
        (struct.pack("<Q", 2000) + b"[" * 2000, "not valid JSON"),  # nesting bomb
        (_raw({"a": F32_2, "b": F32_2}, bytes(8)), "overlaps"),
        (_raw({"a": {**F32_2, "data_offsets": [0, 8]}}, bytes(12)), "cover 8 bytes of a 12"),
        (_raw({"a": {**F32_2, "data_offsets": [4, 12]}}, bytes(12)), "gap of 4"),
        (_raw({"a": {**F32_2, "data_offsets": [0, 16]}}, bytes(8)), "past the 8-byte data area"),
        (_raw({"a": {**F32_2, "data_offsets": [8, 0]}}, bytes(8)), "begin <= end"),
        (_raw({"a": {**F32_2, "shape": [3]}}, bytes(8)), "needs 12 bytes"),
        (_raw({"a": {**F32_2, "shape": [2**40, 2**40]}}, bytes(8)), "needs"),
        (_raw({"a": {**F32_2, "shape": [-2]}}, bytes(8)), "non-negative"),
        (_raw({"a": {**F32_2, "dtype": "Q9"}}, bytes(8)), "unknown dtype 'Q9'"),
        (_raw({"a": {**F32_2, "dtype": "I64"}}, bytes(8)), "unsupported dtype 'I64'"),
        (_raw({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "data_offsets"),
        (_raw({"__metadata__": {"format": 1}, "a": F32_2}, bytes(8)), "__metadata__"),
        (struct.pack("<Q", 39) + b'{"a":1,"a":{"dtype":"F32","shape":[0]}}', "duplicate"),
    ],
)
def test_header_lies_refused(tmp_path, blob, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ConvertError, match=message):
        open_checkpoint(tmp_path)


def test_empty_tensor_and_metadata_accepted(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(
        _raw(
            {
                "__metadata__": {"format": "pt"},
                "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]},
                "a": F32_2,
            },
            np.array([1.5, -2], np.float32).tobytes(),
        )
    )
    with open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt.tensors) == ["a", "e"]
        assert ckpt.read("e").shape == (0, 3)
        assert ckpt.read("a").tolist() == [1.5, -2.0]


# ---- seeded mutation corpus ---------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes, header_len: int) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = rng.choice(["flip", "truncate", "extend", "length", "json"])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 8 + header_len)
            b[pos] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(0, len(b)) :]
    elif kind == "extend":
        b += bytes(rng.randrange(1, 64))
    elif kind == "length":
        n = rng.choice([0, header_len - 1, header_len + 1, len(b), 2**63, 2**64 - 1, rng.randrange(2**32)])
        b[:8] = struct.pack("<Q", n)
    else:
        header = json.loads(bytes(b[8 : 8 + header_len]))
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets", "drop", "dup"])
        choices = {
            "dtype": ["F32", "F16", "BF16", "I8", "F64", "", 7, None],
            "shape": [[], [0], [1], [4, 4], [-1], [2**62, 4], "x", [1.5], None],
            "data_offsets": [[0, 0], [0, 8], [8, 0], [-4, 4], [0, 2**63], [1], "x", [0.0, 8.0]],
        }
        if field == "drop":
            del header[name]
        elif field == "dup":
            header[name + "_copy"] = dict(header[name])
        else:
            header[name][field] = rng.choice(choices[field])
        h = json.dumps(header).encode()
        return f"json {field}", struct.pack("<Q", len(h)) + h + bytes(b[8 + header_len :])
    return kind, bytes(b)


def test_mutation_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file(_tensors(1), str(src / "model.safetensors"), metadata={"format": "pt"})
    data = (src / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    rng = random.Random(1234)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(600):
        kind, mutated = _mutate(rng, data, header_len)
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(mutated)
        try:
            with open_checkpoint(folder) as ckpt:
                for name, ref in ckpt.tensors.items():
                    arr = ckpt.read(name)
                    assert arr.nbytes == ref.nbytes and 8 <= ref.offset <= ref.offset + ref.nbytes <= len(
                        mutated
                    )
                    assert arr.tobytes() == mutated[ref.offset : ref.offset + ref.nbytes]
            outcomes["ok"] += 1
        except ConvertError:
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the property under test
            pytest.fail(f"mutation {i} ({kind}) raised {type(e).__name__}: {e}")
    assert outcomes["ok"] > 5 and outcomes["refused"] > 200, outcomes


def test_read_header_agrees_with_safetensors_library(tmp_path):
    t = _tensors(2)
    path = tmp_path / "model.safetensors"
    save_file(t, str(path))
    refs = read_header(path)
    with safe_open(str(path), framework="np") as f:
        assert [r.name for r in refs] == list(f.keys())
        for r in refs:
            assert np.array_equal(f.get_tensor(r.name), t[r.name])


# ---- against the reference's own index_tensors, on the synthetic checkpoints ----------------------------

REFERENCE_INDEX = r"""
import hashlib, json, logging, sys
from pathlib import Path
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
logging.disable(logging.CRITICAL)
import gguf, torch
from conversion import get_model_class
out = []
for folder in json.load(sys.stdin):
    d = Path(folder)
    arch = json.load(open(d / "config.json"))["architectures"][0]
    m = get_model_class(arch)(d, gguf.LlamaFileType.MOSTLY_F16, d / "out.gguf", eager=True)
    out.append([[name, hashlib.sha256(gen().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()]
                for name, gen in m.model_tensors.items()])
json.dump(out, sys.stdout)
"""


def test_order_and_bytes_equal_reference_index():
    pytest.importorskip("torch")
    import hashlib
    import subprocess
    import sys

    from tests.helpers.checkpoints import synthetic_checkpoint
    from tests.helpers.llama_programs import source_tree

    folders = [
        synthetic_checkpoint("llama", "BF16", shards=2),
        synthetic_checkpoint("llama", "F16", rope="llama3"),
        synthetic_checkpoint("qwen2", "F16"),
        synthetic_checkpoint("qwen3", "BF16", shards=2),
        synthetic_checkpoint("gemma3", "F32"),
        synthetic_checkpoint("mistral", "F32", shards=2, tied=False),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", REFERENCE_INDEX, str(source_tree())],
        input=json.dumps([str(f) for f in folders]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder, ref in zip(folders, json.loads(proc.stdout)):
        with open_checkpoint(folder) as ckpt:
            ours = [[n, hashlib.sha256(ckpt.read(n).tobytes()).hexdigest()] for n in ckpt.tensors]
        assert ours == ref, folder
