"""`ggufkit imatrix` on bad input, interrupted runs, and the strict imatrix reader's mutation corpus.

- Bad input is one line on stderr and exit status 2: a text shorter than two chunks (llama-imatrix's
  minimum), an architecture the engine does not run, an imatrix of another model given to quantize, a
  corrupt or truncated imatrix (GGUF or .dat) given to quantize or merged with --in-file.
- The strict reader, fed a seeded corpus of mutated GGUF and .dat imatrices, either refuses with a
  QuantizeError or returns statistics llama-imatrix could have written (counts whole, >= 0, not all zero;
  sums finite, >= 0, zero where the count is); never another exception.
- An interrupted run keeps what it had: the file written on Ctrl-C equals, byte for byte, a complete run
  over the chunks that were done; a SIGINT sent to the CLI leaves a valid file and exit status 130.
"""

from __future__ import annotations

import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggufkit.cache import sha256_file
from ggufkit.calibrate import ImatrixInterrupted, ImatrixStats, compute_imatrix
from ggufkit.errors import QuantizeError
from ggufkit.quantize.imatrix import read_imatrix
from tests.helpers.gguf_build import write_gguf
from tests.helpers.signals import sigint_default
from tests.test_gguf_file import _mutate, _scalar_fields
from tests.test_imatrix import write_gguf_imatrix

SRC = str(Path(__file__).parents[1] / "src")


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-m", "ggufkit", *args], capture_output=True, text=True, env=env, **kw
    )


def one_line_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, (run.returncode, run.stderr)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def tiny(smollm2_path) -> Path:
    """A seeded 2-layer, 64-wide synthetic llama (SmolLM2's vocabulary): a fast engine run."""
    from tests.helpers.synthetic import synthetic_llama

    return synthetic_llama(
        smollm2_path, seed=5, dtype="F32", n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128
    )


def test_command_writes_dat_and_covariances(tiny, tmp_path):
    """The command's success path: the covariances' size is printed before the run (the number the library
    computes from the model), then the .dat and the covariance folder are written."""
    from ggufkit.calibrate.hessian import hessian_bytes, read_index
    from ggufkit.gguf.reader import open_gguf

    out, cov = tmp_path / "t.dat", tmp_path / "cov"
    run = cli("imatrix", str(tiny), "-o", str(out), "--ctx", "64", "--chunks", "2", "--hessian", str(cov))
    assert run.returncode == 0, run.stderr
    with open_gguf(tiny) as g:
        need = hessian_bytes(g)
    assert run.stderr.splitlines()[0].startswith(f"covariances: {need} bytes")
    imx = read_imatrix(out)
    assert imx.format == "dat" and imx.chunk_count == 2 and len(imx.entries) == 14
    assert sorted(read_index(cov)["tensors"]) == sorted(imx.entries)
    assert f"{out}: dat, 14 entries, 2 chunks of 64 tokens" in run.stdout


# -- bad input ---------------------------------------------------------------------------------------------


def test_text_shorter_than_two_chunks(tiny, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("A few words only, far fewer than two chunks of sixty-four tokens.", encoding="utf-8")
    line = one_line_error(
        cli("imatrix", str(tiny), "--text", str(text), "--ctx", "64", "-o", str(tmp_path / "o"))
    )
    assert "needs at least 128" in line and "tokens" in line
    n = int(line.split("the text has ")[1].split()[0])
    assert 5 < n < 64
    assert not (tmp_path / "o").exists()


def test_architecture_the_engine_does_not_run(tmp_path):
    model = write_gguf(
        tmp_path / "bert.gguf",
        "bert",
        {"block_count": 1, "embedding_length": 8},
        {"token_embd.weight": np.zeros((4, 8), np.float32)},
    )
    one_line_error(cli("imatrix", str(model), "-o", str(tmp_path / "o")), "'bert'", "llama, qwen2, qwen3")


def test_imatrix_of_another_model_to_quantize(tiny, smollm2_f16, tmp_path):
    """Names: an imatrix none of whose entries is a tensor of the model; shapes: same names, other widths."""
    stats = ImatrixStats(64)
    stats("blk.0.ffn_up_exps.weight", np.ones((8, 64), np.float32), expert=1, n_expert=4)
    stats.datasets = ["x.txt"]
    stats.write_gguf(tmp_path / "names.gguf")
    one_line_error(
        cli("quantize", "--dry-run", "--imatrix", str(tmp_path / "names.gguf"), str(tiny), "Q4_K_M"),
        "another model",
    )
    ours = compute_imatrix(tiny, output=tmp_path / "tiny.gguf", ctx=64, chunks=2).output
    one_line_error(
        cli("quantize", "--dry-run", "--imatrix", ours, str(smollm2_f16), "Q4_K_M"), "another model", "64"
    )


def _valid_stats() -> ImatrixStats:
    rng = np.random.default_rng(7)
    s = ImatrixStats(64, datasets=["calib.txt"])
    s.sums["blk.0.attn_q.weight"] = rng.uniform(0.1, 9, (1, 32))
    s.counts["blk.0.attn_q.weight"] = np.array([128])
    sums = rng.uniform(0.1, 9, (3, 32))
    sums[1] = 0
    s.sums["blk.0.ffn_up_exps.weight"] = sums
    s.counts["blk.0.ffn_up_exps.weight"] = np.array([64, 0, 192])
    return s


def _gguf_data_offset(path) -> int:
    import gguf

    return min(t.data_offset for t in gguf.GGUFReader(str(path)).tensors)


CORRUPT_GGUF = {  # name -> (entries for write_gguf_imatrix, what the error says)
    "zero count": ({"a.weight": (np.ones((1, 32)), [0.0])}, "no data"),
    "negative count": ({"a.weight": (np.ones((1, 32)), [-3.0])}, "count -3"),
    "nan count": ({"a.weight": (np.ones((1, 32)), [np.nan])}, "count nan"),
    "fractional count": ({"a.weight": (np.ones((1, 32)), [2.5])}, "count 2.5"),
    "negative sum": ({"a.weight": (-np.ones((1, 32)), [4.0])}, "negative sum"),
    "infinite sum": ({"a.weight": (np.full((1, 32), np.inf), [4.0])}, "non-finite sum"),
    "sums without rows": ({"a.weight": (np.ones((2, 32)), [4.0, 0.0])}, "count is zero"),
    "lengths disagree": ({"a.weight": (np.ones((2, 32)), [4.0, 4.0, 4.0])}, "lengths disagree"),
}


def _dat(entries, tail=(2, b"t.txt")) -> bytes:
    """A legacy .dat in memory (the layout of tests.test_imatrix.write_legacy_imatrix)."""
    out = [struct.pack("<i", len(entries))]
    for raw, ncall, values in entries:
        values = np.asarray(values, dtype="<f4")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    if tail is not None:
        out += [struct.pack("<ii", tail[0], len(tail[1])), tail[1]]
    return b"".join(out)


_ONES = np.ones(32, np.float32)
CORRUPT_DAT = {  # name -> (bytes, what the error says)
    "ncall 0": (_dat([(b"a.weight", 0, _ONES)]), "call count 0"),
    "ncall -1": (_dat([(b"a.weight", -1, _ONES)]), "call count -1"),
    "nan value": (_dat([(b"a.weight", 2, np.full(32, np.nan, np.float32))]), "non-finite"),
    "negative value": (_dat([(b"a.weight", 2, -_ONES)]), "negative"),
    "repeated name": (_dat([(b"a.weight", 2, _ONES), (b"a.weight", 2, _ONES)]), "repeated"),
    "name past the end": (struct.pack("<ii", 1, 1000) + b"a.weight", "truncated"),
    "values past the end": (_dat([(b"a.weight", 2, _ONES)])[:-40], "truncated"),
    "more entries than written": (struct.pack("<i", 2) + _dat([(b"a.weight", 2, _ONES)])[4:], "truncated"),
    "dataset length lies": (
        _dat([(b"a.weight", 2, _ONES)], tail=None) + struct.pack("<ii", 2, 99) + b"t",
        "dataset",
    ),
    "bytes after the dataset": (_dat([(b"a.weight", 2, _ONES)]) + b"\0\0", "unexpected bytes"),
    "negative chunk count": (_dat([(b"a.weight", 2, _ONES)], tail=(-5, b"t")), "chunk count -5"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_GGUF))
def test_corrupt_gguf_imatrix(tmp_path, case):
    entries, says = CORRUPT_GGUF[case]
    path = write_gguf_imatrix(tmp_path / "c.gguf", entries)
    with pytest.raises(QuantizeError, match=says):
        read_imatrix(path)
    read_imatrix(path, strict=False)  # llama-quantize's reading does not refuse it


@pytest.mark.parametrize("case", sorted(CORRUPT_DAT))
def test_corrupt_dat_imatrix(tmp_path, case):
    data, says = CORRUPT_DAT[case]
    path = tmp_path / "c.dat"
    path.write_bytes(data)
    with pytest.raises(QuantizeError, match=says):
        read_imatrix(path)


def test_corrupt_files_at_the_command_line(tiny, tmp_path):
    """quantize --imatrix and imatrix --in-file: one line, exit status 2, for a corrupt and a truncated file
    of each format."""
    bad = write_gguf_imatrix(tmp_path / "neg.gguf", CORRUPT_GGUF["negative count"][0])
    good = tmp_path / "good.gguf"
    _valid_stats().write_gguf(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: _gguf_data_offset(good) + 20])
    dat = tmp_path / "bad.dat"
    dat.write_bytes(CORRUPT_DAT["values past the end"][0])
    for f in (bad, cut, dat):
        one_line_error(cli("quantize", "--dry-run", "--imatrix", str(f), str(tiny), "Q4_K_M"), str(f))
        one_line_error(cli("imatrix", str(tiny), "--in-file", str(f), "-o", str(tmp_path / "o.gguf")), str(f))
    assert not (tmp_path / "o.gguf").exists()


# -- the mutation corpus -----------------------------------------------------------------------------------

N_MUTATIONS = 1500
SPECIAL = [0.0, -0.0, -1.0, 2.5, 1e30, -1e-30, 3.4e38, math.nan, math.inf, -math.inf]


def _check_plausible(imx) -> None:
    """What a successful strict read promises."""
    assert imx.entries and set(imx.entries) == set(imx.sums) == set(imx.counts)
    for name, sums in imx.sums.items():
        counts = imx.counts[name]
        assert sums.ndim == 2 and sums.shape[0] == counts.size >= 1, name
        assert np.isfinite(counts).all() and (counts >= 0).all() and (counts == np.floor(counts)).all()
        assert counts.any() and np.isfinite(sums).all() and (sums >= 0).all(), name
        if imx.format == "gguf":
            assert not sums[counts == 0].any(), name
        else:
            assert counts[0] >= 1
        assert imx.entries[name].size == sums.size and np.isfinite(imx.entries[name]).all(), name


def _run_corpus(tmp_path, data: bytes, mutate, seed: int) -> dict:
    rng = random.Random(seed)
    outcomes = {"error": 0, "read": 0}
    for i in range(N_MUTATIONS):
        kind, mutated = mutate(rng, data)
        path = tmp_path / f"m{i}"
        path.write_bytes(mutated)
        try:
            imx = read_imatrix(path)
        except QuantizeError as e:
            outcomes["error"] += 1
            assert "\n" not in str(e) and str(path) in str(e), (i, kind, e)
        except Exception as e:  # noqa: BLE001 - anything else is the bug this corpus hunts
            pytest.fail(f"mutation {i} ({kind}) raised {type(e).__name__}: {e}")
        else:
            outcomes["read"] += 1
            _check_plausible(imx)
        try:
            read_imatrix(path, strict=False)  # lenient: still nothing but QuantizeError
        except QuantizeError:
            pass
        path.unlink()
    return outcomes


def test_gguf_mutation_corpus(tmp_path):
    path = tmp_path / "v.gguf"
    _valid_stats().write_gguf(path)
    data = path.read_bytes()
    _check_plausible(read_imatrix(path))
    fields, header_end = _scalar_fields(path), _gguf_data_offset(path)
    n_floats = (len(data) - header_end) // 4

    def mutate(rng, data):
        if rng.random() < 0.4:  # the statistics themselves: one or two floats set to a special value
            buf = bytearray(data)
            for _ in range(rng.randint(1, 2)):
                pos = header_end + 4 * rng.randrange(n_floats)
                buf[pos : pos + 4] = (
                    struct.pack("<f", rng.choice(SPECIAL)) if rng.random() < 0.9 else b"\xff" * 4
                )
            return "float", bytes(buf)
        return _mutate(rng, data, fields, header_end)

    outcomes = _run_corpus(tmp_path, data, mutate, seed=20261203)
    assert outcomes["error"] > N_MUTATIONS // 4 and outcomes["read"] > N_MUTATIONS // 20, outcomes


def test_dat_mutation_corpus(tmp_path):
    path = tmp_path / "v.dat"
    _valid_stats().write_dat(path)
    data = path.read_bytes()
    _check_plausible(read_imatrix(path))
    ints, floats, pos = [0], [], 4  # offsets of the i32 fields and of the values, from the layout
    for _ in range(struct.unpack_from("<i", data, 0)[0]):
        n = struct.unpack_from("<i", data, pos)[0]
        ints += [pos, pos + 4 + n, pos + 8 + n]
        nval = struct.unpack_from("<i", data, pos + 8 + n)[0]
        floats += [pos + 12 + n + 4 * k for k in range(nval)]
        pos += 12 + n + 4 * nval
    ints += [pos, pos + 4]
    interesting = [0, 1, 2, -1, -2, 7, 8, 31, 32, 96, 2**31 - 1, -(2**31), len(data), len(data) - pos]

    def mutate(rng, data):
        buf = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0:
            p = rng.choice(ints)
            buf[p : p + 4] = struct.pack("<i", rng.choice(interesting))
        elif kind == 1:
            p = rng.choice(floats)
            buf[p : p + 4] = struct.pack("<f", rng.choice(SPECIAL))
        elif kind == 2:
            for _ in range(rng.randint(1, 6)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == 3:
            p = rng.randrange(len(buf))
            if rng.random() < 0.5:
                del buf[p : p + rng.randint(1, 8)]
            else:
                buf[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 4:
            del buf[rng.randrange(len(buf)) :]
        else:
            buf[rng.randrange(len(buf)) :] = b""
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
        return f"kind{kind}", bytes(buf)

    outcomes = _run_corpus(tmp_path, data, mutate, seed=20261204)
    assert outcomes["error"] > N_MUTATIONS // 4 and outcomes["read"] > N_MUTATIONS // 20, outcomes


# -- interrupted runs --------------------------------------------------------------------------------------


def test_ctrl_c_between_passes_keeps_the_chunks_done(tiny, tmp_path):
    """KeyboardInterrupt after chunk 2 (from the progress callback, where the CLI's terminal progress
    runs): the file is the one a complete 2-chunk run writes, byte for byte."""

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "i.gguf"
    with pytest.raises(ImatrixInterrupted) as info:
        compute_imatrix(tiny, output=out, ctx=64, chunks=6, save_every=1, progress=stop_after_two)
    assert info.value.result.chunk_count == 2 and info.value.result.output == str(out)
    whole = compute_imatrix(tiny, output=tmp_path / "w.gguf", ctx=64, chunks=2, save_every=1).output
    assert sha256_file(out) == sha256_file(whole)


def test_ctrl_c_inside_a_pass_keeps_whole_chunks(tiny, tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of the second pass (layer 1 of chunks 3-4, after layer 0 of them
    was collected): the file covers the first pass only, byte for byte a complete 2-chunk run."""
    whole = compute_imatrix(tiny, output=tmp_path / "w.dat", ctx=64, chunks=2, save_every=2).output
    original, calls = ImatrixStats.__call__, [0]
    per_pass = 2 * 7  # 2 layers x (q, k, v, output, gate, up, down)

    def interrupted(self, name, x, **kw):
        calls[0] += 1
        if calls[0] == per_pass + 9:
            raise KeyboardInterrupt
        return original(self, name, x, **kw)

    monkeypatch.setattr(ImatrixStats, "__call__", interrupted)
    out = tmp_path / "i.dat"
    with pytest.raises(ImatrixInterrupted):
        compute_imatrix(tiny, output=out, ctx=64, chunks=6, save_every=2)
    assert calls[0] == per_pass + 9
    assert sha256_file(out) == sha256_file(whole)


def test_interrupted_before_any_chunk_writes_nothing(tiny, tmp_path, monkeypatch):
    def boom(self, name, x, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ImatrixStats, "__call__", boom)
    with pytest.raises(ImatrixInterrupted) as info:
        compute_imatrix(tiny, output=tmp_path / "o.gguf", ctx=64, chunks=2)
    assert info.value.result.output is None and not (tmp_path / "o.gguf").exists()


def test_sigint_to_the_command(tiny, tmp_path):
    """SIGINT once the first save is on disk: exit status 130, one line saying what the file covers, and
    the file a valid imatrix of whole chunks."""
    out = tmp_path / "s.gguf"
    env = dict(os.environ, PYTHONPATH=SRC)
    args = ["imatrix", str(tiny), "-o", str(out), "--ctx", "64", "--save-every", "1", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ggufkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=sigint_default,
    )
    deadline = time.monotonic() + 300
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and str(out) in lines[0], stderr
    imx = read_imatrix(out)
    n = imx.chunk_count
    assert n >= 1 and f"covers {n} chunks" in lines[0]
    assert len(imx.counts) == 2 * 7 and all(int(c[0]) == 64 * n for c in imx.counts.values())
