"""The GGUF writer: byte layout against independent writers/readers and llama.cpp, and writes that lose
nothing (temporary file + fsync + rename; SIGINT / SIGTERM / SIGKILL mid-write; full disk; stale files)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ggufkit.cache import (
    TEMP_MARK,
    WriteInterrupted,
    atomic_output,
    atomic_write,
    remove_stale_temporaries,
    sha256_file,
)
from ggufkit.errors import QuantizeError
from ggufkit.gguf.layout import n_dims
from ggufkit.gguf.reader import open_gguf
from ggufkit.gguf.values import copy_kv, kv_bytes
from ggufkit.gguf.writer import GGUFStreamWriter, TensorEntry
from ggufkit.quantize.job import quantize_file
from tests.helpers.gguf_build import write_gguf
from tests.helpers.llama_programs import llama_model_quantize
from tests.helpers.signals import sigint_default

REPO = Path(__file__).resolve().parents[1]


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TEMP_MARK}"))


# -- byte layout ------------------------------------------------------------------------------------------

KVS = [  # (key, type, value, sub_type): one of every GGUF value type
    ("general.architecture", V.STRING, "llama", None),
    ("t.u8", V.UINT8, 200, None),
    ("t.i8", V.INT8, -100, None),
    ("t.u16", V.UINT16, 60000, None),
    ("t.i16", V.INT16, -30000, None),
    ("t.u32", V.UINT32, 4_000_000_000, None),
    ("t.i32", V.INT32, -2_000_000_000, None),
    ("t.f32", V.FLOAT32, 0.1, None),
    ("t.bool", V.BOOL, True, None),
    ("t.str", V.STRING, "héllo wörld", None),
    ("t.u64", V.UINT64, 2**63 + 5, None),
    ("t.i64", V.INT64, -(2**62), None),
    ("t.f64", V.FLOAT64, 1e-300, None),
    ("t.arr_i32", V.ARRAY, [1, -2, 3], V.INT32),
    ("t.arr_f32", V.ARRAY, [0.5, 1.5], V.FLOAT32),
    ("t.arr_bool", V.ARRAY, [True, False, True], V.BOOL),
    ("t.arr_str", V.ARRAY, ["a", "", "ccc"], V.STRING),
]


def _tensors(rng):
    return [  # name, numpy array (row-major; ggml shape is reversed), ggml type, raw bytes
        ("a", rng.standard_normal((3, 64)).astype(np.float32), T.F32),
        ("b", rng.standard_normal((2, 4, 32)).astype(np.float16), T.F16),
        ("c", rng.integers(0, 255, (5, 34), dtype=np.uint8), T.Q8_0),  # 5 rows of one 32-block each
        ("d", rng.standard_normal(7).astype(np.float32), T.F32),  # 28 bytes: padded to 32
    ]


def test_writer_bytes_equal_gguf_py_writer(tmp_path):
    """Same KVs and tensors through gguf-py's GGUFWriter (an independent implementation) -> same file."""
    rng = np.random.default_rng(1)
    tensors = _tensors(rng)
    ref = tmp_path / "ref.gguf"
    kvs = {key: (vtype, value, sub) for key, vtype, value, sub in KVS[1:]}
    # for Q8_0 the uint8 array's shape is the byte shape
    write_gguf(ref, "llama", kvs, {name: (arr, qtype) for name, arr, qtype in tensors})

    ours = tmp_path / "ours.gguf"
    entries = []
    for name, arr, qtype in tensors:
        shape = tuple(reversed(arr.shape)) if qtype != T.Q8_0 else (32, arr.shape[0])
        entries.append(TensorEntry(name, shape, qtype))
    kvs = [kv_bytes(k, t, v, sub_type=s) for k, t, v, s in KVS]
    for (k, t, v, s), raw in zip(KVS, kvs):  # numeric arrays given as numpy arrays: the same bytes
        if t == V.ARRAY and s != V.STRING:
            assert kv_bytes(k, t, np.asarray(v), sub_type=s) == raw, k
    with GGUFStreamWriter(ours, kvs, entries) as w:
        for (name, arr, _), _e in zip(tensors, entries):
            w.begin_tensor(name)
            flat = arr.reshape(-1).view(np.uint8)
            w.write(flat[:7])  # any chunking, as a numpy array, bytearray, memoryview or bytes
            w.write(bytearray(flat[7:9].tobytes()))
            w.write(memoryview(flat[9:20].tobytes()))
            w.write(flat[20:].tobytes())
            w.end_tensor()
        w.commit()
    assert sha256_file(ours) == sha256_file(ref)
    assert not temporaries(tmp_path)
    with open_gguf(ours) as m:  # and our reader's KV.raw is exactly what copy_kv writes back
        for kv in m.kv.values():
            assert copy_kv(kv) == kv.raw


def test_n_dims_drops_trailing_ones():
    assert [n_dims(s) for s in [(5,), (5, 1), (5, 1, 1), (5, 3, 1), (1, 1), (1,), (4, 1, 2)]] == [
        1,
        1,
        1,
        2,
        1,
        1,
        3,
    ]


def _tiny_llama(path: Path, *, extra=()) -> Path:
    """A minimal llama GGUF that llama.cpp's quantizer accepts (hparams only are loaded)."""
    kvs = {
        "context_length": 128,
        "block_count": 1,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "head_count": 2,
        "head_count_kv": 2,
        "layer_norm_rms_eps": 1e-5,
    }
    kvs |= {key: (vtype, value) for key, vtype, value in extra}
    rng = np.random.default_rng(0)
    tensors = {
        "blk.0.attn_q.weight": rng.standard_normal((16, 64)).astype(np.float32),
        "blk.0.attn_k.weight": rng.standard_normal((16, 64)).astype(np.float32),
        "blk.0.attn_norm.weight": np.ones(64, np.float32),
    }
    return write_gguf(path, "llama", kvs, tensors)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([("test.nul", V.STRING, "before\0after")], id="string-with-NUL"),
        pytest.param(
            [("test.nul_array", V.ARRAY, ["plain", "", "before\0after", "y" * 256, "\0"])],
            id="string-array-with-NUL",
        ),
        pytest.param([("test.array", V.ARRAY, ["plain", "", "y" * 256, "z" * 65536])], id="string-array"),
        pytest.param([("general.alignment", V.UINT32, 64)], id="input-alignment-64"),
        pytest.param(
            [
                ("split.no", V.UINT16, 0),
                ("split.count", V.UINT16, 1),
                ("split.tensors.count", V.INT32, 3),
                ("general.quantization_version", V.UINT32, 1),
            ],
            id="split-and-version-keys",
        ),
    ],
)
def test_metadata_quirks_match_llama_cpp(tmp_path, extra):
    """Embedded NULs cut strings; general.alignment is copied but data stays 32-aligned; split.* removed."""
    src = _tiny_llama(tmp_path / "in.gguf", extra=extra)
    llama_model_quantize(src, tmp_path / "ref.gguf", "Q8_0")
    quantize_file(src, tmp_path / "ours.gguf", "Q8_0")
    assert sha256_file(tmp_path / "ours.gguf") == sha256_file(tmp_path / "ref.gguf")


# -- atomicity ---------------------------------------------------------------------------------------------


def test_stream_misuse_leaves_nothing(tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"old contents")
    entries = [TensorEntry("a", (32, 2), T.F32)]
    with pytest.raises(RuntimeError, match="256"):
        with GGUFStreamWriter(dst, [kv_bytes("general.architecture", V.STRING, "llama")], entries) as w:
            assert w.temp_path.exists() and w.temp_path.parent == tmp_path
            w.begin_tensor("a")
            w.write(np.zeros(100, np.uint8))
            w.end_tensor()  # 100 of 256 bytes
    assert dst.read_bytes() == b"old contents" and not temporaries(tmp_path)
    with pytest.raises(RuntimeError, match="header has 'a'"):
        with GGUFStreamWriter(dst, [], entries) as w:
            w.begin_tensor("b")
    assert dst.read_bytes() == b"old contents" and not temporaries(tmp_path)


def test_output_permissions_follow_umask(synthetic_f16, tmp_path):
    old = os.umask(0o027)
    try:
        quantize_file(synthetic_f16, tmp_path / "o.gguf", "F16")
    finally:
        os.umask(old)
    assert (tmp_path / "o.gguf").stat().st_mode & 0o777 == 0o640


def test_interrupt_in_process_keeps_destination(synthetic_f16, tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"precious")

    def progress(p):
        if p.index >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_file(synthetic_f16, dst, "Q4_K_M", progress=progress)
    assert dst.read_bytes() == b"precious" and not temporaries(tmp_path)


def test_disk_full_is_a_clean_error(synthetic_f16, tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"precious")
    budget = [3 << 20]

    def write(fd, data):  # a disk that fills up after 3 MiB
        if budget[0] < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(data)
        return os.write(fd, data)

    with pytest.raises(QuantizeError, match="No space left on device"):
        quantize_file(synthetic_f16, dst, "Q8_0", _write_hook=write)
    assert dst.read_bytes() == b"precious" and not temporaries(tmp_path)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ggufkit", "quantize", *map(str, args)]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO / "src"))


def test_file_size_limit_in_a_subprocess(synthetic_f16, tmp_path):
    """A real failing write (RLIMIT_FSIZE: the kernel refuses to grow the file; Python ignores SIGXFSZ, so
    write() fails with EFBIG): one line on stderr, exit status 2, no temporary file, no output."""
    limit = 8 << 20
    # set the limit in the child itself, then exec the CLI (no preexec_fn in a threaded test process)
    wrapper = (
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    cmd = [sys.executable, "-c", wrapper, *_cli(synthetic_f16, tmp_path / "out.gguf", "Q8_0")[1:]]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "File too large" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.gguf").exists() and not temporaries(tmp_path)


def _start_slow_job(src: Path, dst: Path) -> tuple[subprocess.Popen, Path]:
    """Start the CLI on a job that takes about a minute (IQ4_NL on SmolLM2) and wait until its temporary
    file holds tensor data (mid-write). Returns the process and the temporary file."""
    proc = subprocess.Popen(
        _cli(src, dst, "IQ4_NL", 2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        preexec_fn=sigint_default,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        temps = temporaries(dst.parent)
        if temps and temps[0].stat().st_size > (8 << 20):  # header ~2 MiB, then tensor data
            return proc, temps[0]
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the job did not start writing within 240 s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_write_keeps_destination(smollm2_f32, tmp_path, signum):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"the previous file")
    proc, temp = _start_slow_job(smollm2_f32, dst)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert proc.returncode == 128 + signum, err
    assert "interrupted" in err and "Traceback" not in err
    assert dst.read_bytes() == b"the previous file"
    assert not temp.exists() and not temporaries(tmp_path)


def test_sigkill_mid_write_then_next_run_cleans_up(smollm2_f32, synthetic_f16, tmp_path):
    dst = tmp_path / "out.gguf"
    proc, temp = _start_slow_job(smollm2_f32, dst)
    proc.kill()
    proc.wait(timeout=60)
    assert not dst.exists()  # absent before, absent after
    assert temp.exists()  # SIGKILL cannot be caught: the temporary stays...
    quantize_file(synthetic_f16, dst, "Q8_0")  # ...until the next run writing that destination
    assert not temp.exists() and not temporaries(tmp_path)
    with open_gguf(dst) as m:
        assert m.get("general.file_type") == 7


def test_stale_cleanup_spares_live_writers(tmp_path):
    dst = tmp_path / "m.gguf"
    live = tmp_path / f".m.gguf.aaaa{TEMP_MARK}"
    dead = tmp_path / f".m.gguf.bbbb{TEMP_MARK}"
    other = tmp_path / f".other.gguf.cccc{TEMP_MARK}"  # another destination's: not ours to judge
    for p in (live, dead, other):
        p.write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that is still running holds its lock
    try:
        assert remove_stale_temporaries(dst) == [dead]
        assert live.exists() and other.exists() and not dead.exists()
    finally:
        os.close(fd)
    assert remove_stale_temporaries(dst) == [live]


# -- the one atomic writer (cache.py), used by every file ggufkit writes ------------------------------------


@pytest.mark.parametrize("old", [None, b"old contents"])
@pytest.mark.parametrize("failure", ["error", "ctrl-c", "sigterm", "bad data"])
def test_failed_atomic_write_leaves_nothing(tmp_path, old, failure):
    dst = tmp_path / "out.bin"
    if old is not None:
        dst.write_bytes(old)
    handler = signal.getsignal(signal.SIGTERM)
    expected = {
        "error": OSError,
        "ctrl-c": KeyboardInterrupt,
        "sigterm": WriteInterrupted,
        "bad data": TypeError,
    }
    with pytest.raises(expected[failure]):
        if failure == "bad data":
            atomic_write(dst, 12345)  # not bytes: fails inside the write
        with atomic_output(dst) as f:
            f.write(b"x" * 100_000)  # more than the buffer: some of it is in the temporary file already
            assert len(temporaries(tmp_path)) == 1
            if failure == "error":
                raise OSError(errno.ENOSPC, "No space left on device")
            if failure == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # arrives as WriteInterrupted while the file is open
            time.sleep(5)
    assert (dst.read_bytes() if dst.exists() else None) == old
    assert list(tmp_path.iterdir()) == ([dst] if old is not None else [])
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handler is put back


def test_atomic_write_replaces_whole_and_clears_stale_temporaries(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    stale = tmp_path / f".out.bin.dead{TEMP_MARK}"  # left by a killed writer: no lock held
    stale.write_bytes(b"partial")
    atomic_write(dst, b"new contents")
    assert dst.read_bytes() == b"new contents"
    assert list(tmp_path.iterdir()) == [dst]


def test_base_cache_write_is_atomic(tmp_path, monkeypatch):
    from ggufkit.evaluation import base_cache

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32) * 4
    rec = base_cache.base_records(logits, rng.integers(0, 300, 6))
    path = tmp_path / "base.npz"
    base_cache.save_base(path, rec)
    got = base_cache.load_base(path)
    for name in rec.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, name), getattr(rec, name), err_msg=name)
    assert list(tmp_path.iterdir()) == [path]
    before = path.read_bytes()

    def interrupted(file, **arrays):  # the compressor is stopped half-way, as Ctrl-C would stop it
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(base_cache.np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        base_cache.save_base(path, rec)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
