"""imatrix: the vectors we read are the ones llama-quantize quantizes with.

The strongest check: llama-quantize --imatrix writes a file; quantizing the same source tensors through
libggml (tests.helpers.libggml) with OUR vectors gives the same bytes, while quantizing without them does not.
The imatrices are real ones made by llama-imatrix on SmolLM2 (GGUF, and the legacy .dat that
llama-imatrix converts it to), plus hand-written files with the edge cases (zero and fractional counts,
ncall 0, a NUL in a name, a token_embd entry of the wrong size).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ggufkit.cache import cache_dir
from ggufkit.errors import QuantizeError
from ggufkit.gguf.reader import open_gguf
from ggufkit.quantize.imatrix import filter_entries, load_for_quantize, match_tensor, read_imatrix
from ggufkit.quantize.job import imatrix_kvs
from ggufkit.quantize.plan import plan_for_gguf
from tests.helpers.gguf_build import write_gguf
from tests.helpers.libggml import ggml_quantize
from tests.helpers.llama_programs import (
    llama_quantize_dry_run,
    llama_quantize_refusal,
    reference_quantized,
    tool,
)

# -- fixtures: a real imatrix from llama-imatrix ---------------------------------------------------------


def _text() -> str:
    lic = (
        Path(sys.base_prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "LICENSE.txt"
    )
    if lic.exists():
        return lic.read_text(encoding="utf-8", errors="replace")[:6000]
    import codecs
    import this

    return codecs.decode(this.s, "rot13") * 6


@pytest.fixture(scope="session")
def real_imatrix(smollm2_f16) -> tuple[Path, Path]:
    """(imatrix.gguf, imatrix.dat) made by llama-imatrix on SmolLM2 F16 (3 chunks of 128 tokens), cached."""
    text = _text()
    key = hashlib.sha256(text.encode() + str(os.stat(smollm2_f16).st_size).encode()).hexdigest()[:10]
    root = cache_dir("imatrix")
    txt, out, dat = root / f"text-{key}.txt", root / f"smollm2-{key}.gguf", root / f"smollm2-{key}.dat"

    def llama_imatrix(dst: Path, *args: str) -> None:
        tmp = dst.with_name(f"tmp{os.getpid()}{dst.suffix}")
        cmd = [str(tool("llama-imatrix")), "-m", str(smollm2_f16), *args, "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(tmp, dst)

    if not out.exists():
        txt.write_text(text, encoding="utf-8")
        llama_imatrix(out, "-f", str(txt), "-c", "128", "--chunks", "3", "-t", "2", "--no-ppl")
    if not dat.exists():  # llama-imatrix's own conversion of the same data to the legacy format
        llama_imatrix(dat, "--in-file", str(out), "--output-format", "dat")
    return out, dat


def _raw_gguf(path):
    """in_sum2 / counts per entry, read with gguf-py (an independent reader)."""
    r = gguf.GGUFReader(str(path))
    t = {x.name: np.array(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    return r, t


def test_gguf_reader_is_sum_over_count(real_imatrix):
    path, _ = real_imatrix
    imx = read_imatrix(path)
    r, raw = _raw_gguf(path)
    names = sorted(n[: -len(".in_sum2")] for n in raw if n.endswith(".in_sum2"))
    assert sorted(imx.entries) == names and len(names) == 30 * 7
    for name in names:
        v = imx.entries[name]
        assert v.dtype == np.float32 and v.shape == raw[name + ".in_sum2"].shape
        counts = raw[name + ".counts"]
        assert counts.size == 1 and counts[0] > 0
        np.testing.assert_array_equal(v, raw[name + ".in_sum2"] / np.float32(round(float(counts[0]))))
    assert imx.format == "gguf" and imx.chunk_count == 3 and imx.chunk_size == 128
    assert imx.datasets == [str(r.fields["imatrix.datasets"].contents()[0])]


def test_legacy_reader_agrees_with_gguf(real_imatrix):
    """The .dat stores mean*ncall; divided back it is the GGUF's sum/count up to float rounding."""
    g, d = read_imatrix(real_imatrix[0]), read_imatrix(real_imatrix[1])
    assert d.format == "dat" and sorted(d.entries) == sorted(g.entries) and d.datasets == g.datasets
    for name, v in g.entries.items():
        assert d.entries[name].dtype == np.float32
        np.testing.assert_allclose(d.entries[name], v, rtol=1e-6)


def _source_rows(model_path, name):
    with open_gguf(model_path) as m:
        t = m.tensor(name)
        raw = np.array(t.data())
        x = raw.view(np.float16) if t.ggml_type == T.F16 else raw.view(np.float32)
        return x.astype(np.float32).reshape(t.shape[1], t.shape[0])


def _written(path, name):
    with open_gguf(path) as m:
        t = m.tensor(name)
        return t.ggml_type, np.array(t.data())


def assert_quantized_with_our_vectors(src, out, imatrix_path, level_name, names, **load_opts):
    """For each tensor: the planned type is the written one, and libggml given our vector reproduces the
    written bytes, while libggml without it does not (so the vector really mattered)."""
    vectors, _ = load_for_quantize(imatrix_path, **load_opts)
    with open_gguf(src) as m:
        plan = {t.name: t for t in plan_for_gguf(m, level_name, imatrix=vectors).tensors}
    for name in names:
        qtype, data = _written(out, name)
        tp = plan[name]
        assert tp.dst_type == qtype and tp.use_importance, name
        x = _source_rows(src, name)
        assert np.array_equal(ggml_quantize(x, qtype, vectors[name]).reshape(-1), data), name
        assert not np.array_equal(ggml_quantize(x, qtype, None).reshape(-1), data), name


def _written_kvs(path):
    with open_gguf(path) as m:
        return [(k, kv.type, kv.value) for k, kv in m.kv.items() if k.startswith("quantize.imatrix.")]


def _expected_kvs(imatrix_path, **load_opts):
    _, meta = load_for_quantize(imatrix_path, **load_opts)
    return [(k, t, v.decode() if isinstance(v, bytes) else v) for k, t, v in imatrix_kvs(meta)]


def test_llama_quantize_uses_our_gguf_vectors(smollm2_f16, real_imatrix):
    path = real_imatrix[0]
    out = reference_quantized(smollm2_f16, "Q4_K_M", imatrix=path)
    assert_quantized_with_our_vectors(
        smollm2_f16,
        out,
        path,
        "Q4_K_M",
        [
            "blk.0.ffn_down.weight",  # Q6_K (more-bits layer)
            "blk.3.ffn_down.weight",  # Q4_K
            "blk.1.attn_q.weight",  # Q5_0 (fallback from Q4_K)
            "blk.7.attn_output.weight",
        ],
    )
    assert _written_kvs(out) == _expected_kvs(path)


def test_llama_quantize_uses_our_legacy_vectors(smollm2_f16, real_imatrix):
    path = real_imatrix[1]
    out = reference_quantized(smollm2_f16, "Q5_0", imatrix=path, exclude_weights=["attn_v"])
    assert_quantized_with_our_vectors(
        smollm2_f16,
        out,
        path,
        "Q5_0",
        [
            "blk.0.ffn_down.weight",  # Q5_1: Q5_0 with an imatrix, first eighth of the layers
            "blk.9.ffn_down.weight",  # Q5_0
            "blk.0.attn_k.weight",
        ],
        exclude=["attn_v"],
    )
    assert _written_kvs(out) == _expected_kvs(path, exclude=["attn_v"])
    # excluded: quantized without importance
    vectors, _ = load_for_quantize(path, exclude=["attn_v"])
    qtype, data = _written(out, "blk.2.attn_v.weight")
    assert "blk.2.attn_v.weight" not in vectors
    assert np.array_equal(
        ggml_quantize(_source_rows(smollm2_f16, "blk.2.attn_v.weight"), qtype).reshape(-1), data
    )


# -- edge cases, hand-written -----------------------------------------------------------------------------


def write_gguf_imatrix(
    path, entries: dict, *, datasets=("edge.txt",), chunk_count=4, chunk_size=256, skip_keys=()
):
    """entries: name -> (in_sum2 [n_mat, ne0], counts [n_mat]) written as llama-imatrix does."""
    kvs = {
        "general.type": (V.STRING, "imatrix"),
        "imatrix.datasets": (V.ARRAY, list(datasets)),
        "imatrix.chunk_count": (V.UINT32, chunk_count),
        "imatrix.chunk_size": (V.UINT32, chunk_size),
    }
    tensors = {}
    for name in sorted(entries):
        sums, counts = entries[name]
        tensors[name + ".in_sum2"] = np.asarray(sums, dtype=np.float32)
        tensors[name + ".counts"] = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    kvs = {key: value for key, value in kvs.items() if key not in skip_keys}
    return write_gguf(path, "llama", kvs, tensors)


def write_legacy_imatrix(path, entries, *, tail=None):
    """entries: list of (raw name bytes, ncall, values); tail: (chunk_count, dataset bytes) or None."""
    with open(path, "wb") as f:
        f.write(np.int32(len(entries)).tobytes())
        for raw, ncall, values in entries:
            values = np.asarray(values, dtype="<f4")
            f.write(
                np.int32(len(raw)).tobytes()
                + raw
                + np.int32(ncall).tobytes()
                + np.int32(values.size).tobytes()
            )
            f.write(values.tobytes())
        if tail is not None:
            f.write(np.int32(tail[0]).tobytes() + np.int32(len(tail[1])).tobytes() + tail[1])
    return Path(path)


def _sums(rng, n_mat, ne0):
    return rng.uniform(0.1, 50.0, (n_mat, ne0)).astype(np.float32)


def test_gguf_counts_edge_cases(tmp_path):
    rng = np.random.default_rng(1)
    s = {k: _sums(rng, 3, 64) for k in "abcd"}
    path = write_gguf_imatrix(
        tmp_path / "e.gguf",
        {
            "a": (s["a"], [0.0, 2.5, -3.0]),  # 0 and negative -> 1.0; 2.5 -> lround 3 (half away from zero)
            "b": (s["b"], [3.4999, 1e9, 7.0]),
            "c": (s["c"], [np.nan, np.inf, 1.5]),  # lround of NaN/inf is LONG_MIN: not positive -> 1.0
            "d": (s["d"][:1], [0.5]),
        },
    )
    e = read_imatrix(path, strict=False).entries  # llama-quantize's leniency; strict refuses these
    one = np.ones(64, np.float32)
    np.testing.assert_array_equal(e["a"], np.concatenate([one, s["a"][1] / np.float32(3), one]))
    np.testing.assert_array_equal(
        e["b"],
        np.concatenate([s["b"][0] / np.float32(3), s["b"][1] / np.float32(1e9), s["b"][2] / np.float32(7)]),
    )
    np.testing.assert_array_equal(e["c"], np.concatenate([one, one, s["c"][2] / np.float32(2)]))
    np.testing.assert_array_equal(e["d"], s["d"][0] / np.float32(1))  # lround(0.5) = 1


def test_legacy_edge_cases(tmp_path):
    rng = np.random.default_rng(2)
    v = [rng.uniform(0.1, 9, 32).astype(np.float32) for _ in range(3)]
    path = write_legacy_imatrix(
        tmp_path / "e.dat",
        [
            (b"x.weight", 0, v[0]),  # ncall 0: the stored value as is
            (b"y.weight\0junk", 7, v[1]),  # the name ends at the NUL
            (b"z.weight", -2, v[2]),
        ],
        tail=(5, b"edge.txt"),
    )
    imx = read_imatrix(path, strict=False)  # llama-quantize's leniency; strict refuses ncall < 1
    assert sorted(imx.entries) == ["x.weight", "y.weight", "z.weight"]
    np.testing.assert_array_equal(imx.entries["x.weight"], v[0])
    np.testing.assert_array_equal(imx.entries["y.weight"], v[1] / np.float32(7))
    np.testing.assert_array_equal(imx.entries["z.weight"], v[2])
    assert imx.chunk_count == 5 and imx.datasets == ["edge.txt"] and imx.format == "dat"
    bare = read_imatrix(write_legacy_imatrix(tmp_path / "b.dat", [(b"x.weight", 2, v[0])]))  # strict
    assert bare.chunk_count == 0 and bare.datasets == []


def _edge_imatrices(synthetic_f16) -> tuple[Path, Path]:
    """Hand-written imatrices for the synthetic model, under a path longer than 127 bytes (stable, so the
    reference quantizations are cached)."""
    root = cache_dir("imatrix") / ("edge-cases-" + "x" * 120)
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    gguf_entries = {
        "blk.0.ffn_down.weight": (_sums(rng, 1, 768), [0.0]),  # count 0 -> all ones
        "blk.1.ffn_down.weight": (_sums(rng, 1, 768), [2.5]),
        "blk.2.ffn_down.weight": (_sums(rng, 1, 768), [7.0]),
        "blk.0.attn_q.weight": (_sums(rng, 1, 256), [-4.0]),
        "blk.1.attn_q.weight": (_sums(rng, 1, 256), [1e9]),
        "token_embd.weight": (_sums(rng, 1, 7), [1.0]),  # wrong size: skipped, for token_embd only
        "blk.9.ffn_down.weight": (_sums(rng, 1, 768), [3.0]),  # not in the model: ignored
    }
    datasets = ("a-dataset-name-" + "y" * 130, "second.txt")
    legacy_entries = [
        (b"blk.0.ffn_down.weight", 0, _sums(rng, 1, 768)[0]),
        (b"blk.2.ffn_down.weight\0tail", 3, _sums(rng, 1, 768)[0]),
        (b"blk.1.attn_q.weight", 11, _sums(rng, 1, 256)[0]),
    ]
    g = _keep_if_same(root / "edge.gguf", lambda p: write_gguf_imatrix(p, gguf_entries, datasets=datasets))
    d = _keep_if_same(
        root / "edge.dat", lambda p: write_legacy_imatrix(p, legacy_entries, tail=(9, b"legacy.txt"))
    )
    return g, d


def _keep_if_same(path: Path, write) -> Path:
    """Write via `write(tmp)`; keep an identical existing file untouched (its mtime keys the cache)."""
    tmp = path.with_name(f"tmp{os.getpid()}-{path.name}")
    write(tmp)
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, path)
    return path


def test_edge_imatrices_through_llama_quantize(synthetic_f16):
    g, d = _edge_imatrices(synthetic_f16)
    out = reference_quantized(synthetic_f16, "Q4_K_M", imatrix=g)
    lenient = {"strict": False}  # counts 0 and -4: llama-quantize's leniency (ggufkit refuses by default)
    assert_quantized_with_our_vectors(
        synthetic_f16,
        out,
        g,
        "Q4_K_M",
        ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight"],
        **lenient,
    )
    kvs = _written_kvs(out)
    assert kvs == _expected_kvs(g, **lenient)
    assert len(kvs[0][2].encode()) == 127 and len(kvs[1][2].encode()) == 127  # strncpy(…, 127)
    with open_gguf(synthetic_f16) as m:
        vectors, _ = load_for_quantize(g, **lenient)
        plan = {t.name: t for t in plan_for_gguf(m, "Q4_K_M", imatrix=vectors).tensors}
    assert not plan["token_embd.weight"].use_importance and plan["token_embd.weight"].quantize

    out = reference_quantized(synthetic_f16, "Q4_K_M", imatrix=d)
    assert_quantized_with_our_vectors(
        synthetic_f16,
        out,
        d,
        "Q4_K_M",
        ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.1.attn_q.weight"],
        **lenient,
    )
    assert _written_kvs(out) == _expected_kvs(d, **lenient)


# -- filtering, refusals, mismatches ----------------------------------------------------------------------


def _llama_entry_count(log: str) -> int:
    import re

    m = re.search(r"prepare_imatrix: have (\d+) importance matrix entries", log)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"include_weights": ["ffn_down"]},
        {"include_weights": ["attn_q", "blk.1."]},
        {"exclude_weights": ["blk.1", "ffn"]},
        {"include_weights": ["nothing-matches"]},
    ],
)
def test_filters_like_llama(smollm2_f16, real_imatrix, opts):
    path = real_imatrix[0]
    vectors, meta = load_for_quantize(
        path, include=opts.get("include_weights", ()), exclude=opts.get("exclude_weights", ())
    )
    ref = llama_quantize_dry_run(smollm2_f16, "Q4_0", imatrix=path, **opts)
    assert len(vectors) == _llama_entry_count(ref.log) == meta["entries_count"]


def test_include_and_exclude_together(smollm2_f16, real_imatrix):
    with pytest.raises(QuantizeError, match="together"):
        load_for_quantize(real_imatrix[0], include=["a"], exclude=["b"])
    with pytest.raises(RuntimeError):
        llama_quantize_dry_run(
            smollm2_f16, "Q4_0", imatrix=real_imatrix[0], include_weights=["a"], exclude_weights=["b"]
        )
    with pytest.raises(QuantizeError):
        filter_entries({}, include=["a"], exclude=["b"])


@pytest.mark.parametrize("missing", ["imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"])
def test_missing_metadata_is_refused(synthetic_f16, tmp_path, missing):
    path = write_gguf_imatrix(
        tmp_path / "m.gguf", {"blk.0.attn_q.weight": (np.ones((1, 256)), [1.0])}, skip_keys=(missing,)
    )
    with pytest.raises(QuantizeError, match=missing):
        read_imatrix(path)
    with pytest.raises(RuntimeError, match="missing imatrix metadata"):
        llama_quantize_dry_run(synthetic_f16, "Q4_0", imatrix=path)


def test_non_finite_is_refused(synthetic_f16, tmp_path):
    sums = np.ones((1, 256), np.float32)
    sums[0, 5] = np.inf
    path = write_gguf_imatrix(tmp_path / "n.gguf", {"blk.0.attn_q.weight": (sums, [1.0])})
    with pytest.raises(QuantizeError, match="blk.0.attn_q.weight.*non-finite"):
        load_for_quantize(path)
    with pytest.raises(RuntimeError, match="non-finite"):
        llama_quantize_dry_run(synthetic_f16, "Q4_0", imatrix=path)
    load_for_quantize(path, exclude=["attn_q"], strict=False)  # filtered away first, as in llama-quantize


@pytest.mark.parametrize(
    "content", [b"", b"\x00\x00\x00\x00", b"\x02\x00\x00\x00\x05\x00\x00\x00abc", b"GGUF"]
)
def test_garbage_files(tmp_path, content):
    path = tmp_path / "g.dat"
    path.write_bytes(content)
    with pytest.raises(QuantizeError, match=str(path)):
        read_imatrix(path)


def test_imatrix_for_another_model(synthetic_f16, real_imatrix, tmp_path):
    """SmolLM2's imatrix (576-wide rows) on the 256-wide synthetic model: llama-quantize stops; so do we,
    naming the tensor and both sizes."""
    vectors, _ = load_for_quantize(real_imatrix[0])
    with (
        open_gguf(synthetic_f16) as m,
        pytest.raises(QuantizeError, match=r"another model.*blk\.0\.attn_k\.weight.*576.*256"),
    ):
        plan_for_gguf(m, "Q4_K_M", imatrix=vectors)
    out = tmp_path / "x.gguf"
    assert "imatrix size 576 is different from tensor size 256" in llama_quantize_refusal(
        "--imatrix", str(real_imatrix[0]), str(synthetic_f16), str(out), "Q8_0", "2"
    )


def test_match_tensor():
    e = {
        "blk.0.ffn_down_exps.weight": np.ones(3 * 64, np.float32),
        "token_embd.weight": np.ones(5, np.float32),
    }
    assert match_tensor(e, "blk.0.ffn_down_exps.weight", (64, 32, 3)) is not None  # ne0 * n_expert
    assert match_tensor(e, "token_embd.weight", (64, 100)) is None
    assert match_tensor(e, "blk.0.attn_q.weight", (64, 64)) is None
    assert match_tensor(None, "blk.0.attn_q.weight", (64, 64)) is None
    with pytest.raises(QuantizeError, match="192 values.*64"):
        match_tensor(e, "blk.0.ffn_down_exps.weight", (64, 32))


def test_imatrix_kvs_nothing_when_empty(real_imatrix):
    imx = read_imatrix(real_imatrix[0])
    assert imatrix_kvs(imx.quantize_metadata({})) == []
    kvs = imatrix_kvs(imx.quantize_metadata())
    assert [k for k, _, _ in kvs] == [
        "quantize.imatrix.file",
        "quantize.imatrix.dataset",
        "quantize.imatrix.entries_count",
        "quantize.imatrix.chunks_count",
    ]
    assert kvs[2][1] == V.UINT32 and kvs[2][2] == 210


def test_cli_imatrix_for_another_model(synthetic_f16, real_imatrix):
    """Issue 3 item 5 end to end: one line on stderr, exit status 2, nothing written."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ggufkit",
            "quantize",
            "--dry-run",
            "--imatrix",
            str(real_imatrix[0]),
            str(synthetic_f16),
            "Q4_K_M",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "another model" in lines[0] and "blk.0.attn_k.weight" in lines[0], run.stderr
