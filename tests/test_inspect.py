"""`ggufkit inspect`: facts checked against gguf-py's reader and llama.cpp's own constants, hostile text
kept off the terminal, and the CLI's one-line error with exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import pytest
from gguf import GGMLQuantizationType as T

from ggufkit.inspect import FTYPE_NAMES, format_inspect, inspect_gguf
from tests.helpers.gguf_build import CHAT_TEMPLATE, raw_gguf, raw_tensor_info, write_small_gguf

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-m", "ggufkit", "inspect", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def smollm2_info(smollm2_path):
    return inspect_gguf(smollm2_path, tensors=True)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path):
    return gguf.GGUFReader(smollm2_path)


def test_smollm2_facts_match_gguf_py(smollm2_info, smollm2_reader):
    info, r = smollm2_info, smollm2_reader
    assert info["architecture"] == "llama" == r.fields["general.architecture"].contents()
    layers = {int(m.group(1)) for t in r.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    assert info["hyperparameters"]["block_count"] == len(layers) == 30
    vocab = r.fields["tokenizer.ggml.tokens"]
    assert info["tokenizer"]["vocab_size"] == len(vocab.data) == 49152
    assert info["tokenizer"]["model"] == r.fields["tokenizer.ggml.model"].contents()
    for name, st in info["tokenizer"]["special_tokens"].items():
        tid = r.fields[f"tokenizer.ggml.{name}_token_id"].contents()
        assert st == {"id": tid, "text": vocab.contents(tid)}
    assert info["chat_template"] == r.fields["tokenizer.chat_template"].contents()
    assert info["tensor_count"] == len(r.tensors) and info["kv_count"] == len(r.fields) - 3  # GGUF.* fields
    # Bits per weight from gguf-py's own byte and element counts.
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    elements = sum(int(t.n_elements) for t in r.tensors)
    assert info["weights"] == {
        "elements": elements,
        "bytes": nbytes,
        "bits_per_weight": 8 * nbytes / elements,
    }
    by_type = Counter()
    for t in r.tensors:
        by_type[t.tensor_type.name] += int(t.n_bytes)
    assert {row["type"]: row["bytes"] for row in info["types"]} == dict(by_type)
    assert [t["name"] for t in info["tensors"]] == [t.name for t in r.tensors]
    for ours, theirs in zip(info["tensors"], r.tensors):
        assert ours["bytes"] == int(theirs.n_bytes) and ours["type"] == theirs.tensor_type.name
        assert ours["bits_per_weight"] == 8 * int(theirs.n_bytes) / int(theirs.n_elements)
    # The level: general.file_type as written, named by llama.h's table (checked below).
    assert info["level"]["file_type"] == r.fields["general.file_type"].contents() == 3
    assert info["level"]["name"] == "Q4_1" and not info["level"]["guessed"]
    # Long arrays are summarised: length and first items.
    tokens = next(e for e in info["metadata"] if e["key"] == "tokenizer.ggml.tokens")
    assert (
        tokens["length"] == 49152 and tokens["first"] == vocab.contents(slice(0, 5)) and "value" not in tokens
    )
    json.loads(json.dumps(info))


def test_ftype_names_are_llama_cpps():
    llama_cpp = pytest.importorskip("llama_cpp")
    assert FTYPE_NAMES[0] == "F32" and llama_cpp.LLAMA_FTYPE_ALL_F32 == 0
    for ftype, name in FTYPE_NAMES.items():
        if name != "F32":
            assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") == ftype, name
    named = {v for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_MOSTLY_")}
    assert named <= set(FTYPE_NAMES), sorted(named - set(FTYPE_NAMES))


def test_level_guessed_from_dominant_type(tmp_path):
    path = tmp_path / "noftype.gguf"
    # Three Q4_K tensors and one F32: llama.cpp's loader would call this Q4_K_M (guessed).
    tensors = [raw_tensor_info(f"w{i}", [256], T.Q4_K, 160 * i) for i in range(3)]
    tensors.append(raw_tensor_info("n", [8], T.F32, 480))
    path.write_bytes(raw_gguf([], tensors, bytes(512)))
    level = inspect_gguf(path)["level"]
    assert level["name"] == "Q4_K_M" and level["guessed"] and level["file_type"] is None
    assert "3 of 4 tensors are Q4_K" in level["source"]
    assert "guessed" in format_inspect(inspect_gguf(path))


def test_small_file_text_and_json(tmp_path):
    path = tmp_path / "small.gguf"
    write_small_gguf(path)
    info = inspect_gguf(path)
    assert info["level"] == {"name": "Q8_0", "file_type": 7, "guessed": False, "source": "general.file_type"}
    assert info["chat_template"] == CHAT_TEMPLATE and "tensors" not in info
    text = format_inspect(info)
    for needle in ("GGUF v3", "level:        Q8_0", "Q4_K", "shown, never run", "test.arr_bool"):
        assert needle in text
    assert "{% for m in messages %}" in text  # the template is shown verbatim, as text
    values = {e["key"]: e.get("value") for e in info["metadata"]}
    assert values["test.u64"] == 2**64 - 1 and values["test.arr_bool"] == [True, False, True]
    assert json.loads(json.dumps(info)) == info


def test_hostile_strings_do_not_reach_the_terminal(tmp_path):
    path = tmp_path / "evil.gguf"
    write_small_gguf(path, name=b"\x1b[2J\x1b]0;pwned\x07 bad utf8 \xff\xfe end")
    info = inspect_gguf(path, tensors=True)
    text = format_inspect(info)
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2J" in text and "\\xff\\xfe" in text
    text.encode("utf-8")  # no lone surrogates left: printable on a UTF-8 terminal
    json.loads(json.dumps(info))


def test_cli_text_json_and_tensors(smollm2_path, smollm2_reader):
    proc = run_cli(str(smollm2_path), "--json", "--tensors")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "llama" and len(info["tensors"]) == len(smollm2_reader.tensors)
    proc = run_cli(str(smollm2_path))
    assert proc.returncode == 0 and proc.stderr == ""
    assert "level:        Q4_1" in proc.stdout and "tensors (" not in proc.stdout


@pytest.mark.parametrize("kind", ["truncated", "version 1", "garbage", "missing", "huge count"])
def test_cli_bad_file_one_line_exit_2(kind, smollm2_path, tmp_path):
    path = tmp_path / "bad.gguf"
    if kind == "truncated":  # the real file cut inside its vocabulary
        with open(smollm2_path, "rb") as f:
            path.write_bytes(f.read(500_000))
    elif kind == "version 1":
        path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "huge count":
        path.write_bytes(raw_gguf(n_kv=2**64 - 1) + bytes(64))
    proc = run_cli(str(path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggufkit inspect: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
