"""ggufkit.memory against llama.cpp itself.

The oracle is the real thing, measured in the test: llama-bench (built from the llama-cpp-python 0.3.36
tree) runs a prompt of n_ctx - 16 tokens and 16 generated in a context of n_ctx (`-pg`), on 2 threads, and
its peak resident set is read from the kernel (wait4's ru_maxrss). The buffer sizes llama.cpp logs when it
loads a model (model, repack, KV) check the terms one by one. Estimates must be within 10% of the
measured peak.

Time: each llama-bench run costs its prompt. The 8192-token cases process 8176 tokens (about a minute
each on 2 cores); they run by default. GGUFKIT_SLOW_TESTS=0 skips F16 and Q8_0 at 8192 for quick local
runs (benchmarks/bench_memory.py runs them all and records the errors in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ggufkit import memory
from ggufkit.cli import main as cli_main
from ggufkit.errors import GgufkitError, MemoryEstimateError

SLOW = os.environ.get("GGUFKIT_SLOW_TESTS", "1") != "0"
slow = pytest.mark.skipif(not SLOW, reason="8176-token prompt skipped: GGUFKIT_SLOW_TESTS=0")
TOLERANCE = 0.10


# Runs argv[1:] as a forked child of this small interpreter and prints "<exit status> <ru_maxrss KiB>" on
# stderr. The indirection matters: Linux keeps a process's peak RSS across exec (the larger of the old and
# new address space's), and Python's subprocess starts children with vfork, so a child started directly by
# the test process would report the test process's own peak (hundreds of MiB with numba and llama_cpp
# loaded). A child forked here starts from this interpreter's ~10 MiB, below any llama-bench peak.
_PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stdout.flush()
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, file=sys.stderr)
"""


def llama_bench_peak_rss(model, n_ctx: int, *, threads: int = 2) -> int:
    """Peak RSS in bytes of llama-bench running a prompt of n_ctx-16 tokens then 16 generated tokens in one
    context of n_ctx (its `-pg` test; -p 0 -n 0 turn off the separate pp/tg tests), with its defaults
    otherwise (batch 2048, ubatch 512, f16 KV, flash attention auto, mmap). No warmup: a warmup would
    process the same prompt again in the same context, which takes time and touches nothing new."""
    from llamacpp import tool

    args = f"-pg {n_ctx - 16},16 -t {threads} -p 0 -n 0 -r 1 --no-warmup -o json".split()
    cmd = [str(tool("llama-bench")), "-m", str(model), *args]
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        run = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], stdout=out_f, stderr=err_f)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read().decode(), err_f.read().decode(errors="replace")
    status, _, maxrss = err.rstrip().rpartition("\n")[2].partition(" ")
    if run.returncode != 0 or status != "0":
        raise RuntimeError(f"llama-bench failed ({status}): {' '.join(cmd)}\n{err[-2000:]}")
    result = json.loads(out)
    assert result and result[0]["n_prompt"] == n_ctx - 16 and result[0]["n_gen"] == 16, result
    return int(maxrss) * 1024  # Linux reports KiB


def llama_cpp_buffers(model, n_ctx: int, *, type_k: str = "f16", type_v: str = "f16") -> dict:
    """The buffer sizes (MiB, as llama.cpp logs them with 2 decimals) of a context made by llama.cpp through
    llama-cpp-python, in a child process so the log on fd 2 can be read."""
    types = {"f16": 1, "q8_0": 8, "q4_0": 2}
    code = (
        "import llama_cpp, sys\n"
        f"llama_cpp.Llama({str(model)!r}, n_ctx={n_ctx}, n_batch=2048, n_ubatch=512, flash_attn=True,\n"
        f"    type_k={types[type_k]}, type_v={types[type_v]}, swa_full=False, n_threads=2, verbose=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace")
    assert run.returncode == 0, run.stderr[-2000:]
    sizes = {}
    sizes["kv_caches"] = [float(x) for x in re.findall(r"KV buffer size =\s+([\d.]+) MiB", run.stderr)]
    for name, pattern in {
        "mapped": r"CPU_Mapped model buffer size =\s+([\d.]+) MiB",
        "repack": r"CPU_REPACK model buffer size =\s+([\d.]+) MiB",
        "kv": r"KV buffer size =\s+([\d.]+) MiB",
        "cells": r"n_ctx\s+= (\d+)",
        "output": r"output buffer size =\s+([\d.]+) MiB",
        "compute": r"CPU compute buffer size =\s+([\d.]+) MiB",
    }.items():
        m = re.search(pattern, run.stderr)
        sizes[name] = float(m.group(1)) if m else 0.0
    return sizes


def mib(n: int) -> float:
    return round(n / (1 << 20), 2)


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_levels(smollm2_f16):
    """SmolLM2 at F16 (llama.cpp's own conversion), Q8_0 and Q4_K_M (llama-quantize from that F16)."""
    from llamacpp import reference_quantized

    return {
        "F16": smollm2_f16,
        "Q8_0": reference_quantized(smollm2_f16, "Q8_0"),
        "Q4_K_M": reference_quantized(smollm2_f16, "Q4_K_M"),
    }


def _extra_piece(i: int) -> str:
    """A short made-up token text (8 bytes at most, like real BPE pieces), unique per i."""
    digits = ""
    while True:
        i, r = divmod(i, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if i == 0:
            return "\u0120\u01c2" + digits


def _copy_tokenizer(writer, vocab_source, extra_tokens: int, extra_merges: int) -> int:
    """The tokenizer.* metadata of `vocab_source` plus `extra_tokens` made-up normal tokens and
    `extra_merges` made-up merges (a larger vocabulary, as Llama 3's 128k or Gemma's 256k); returns the
    vocabulary size."""
    from synthetic import copy_tokenizer

    extra = {
        "tokenizer.ggml.tokens": [_extra_piece(i) for i in range(extra_tokens)],
        "tokenizer.ggml.merges": [f"\u0120\u01c2 {_extra_piece(i)[2:]}" for i in range(extra_merges)],
        "tokenizer.ggml.token_type": [1] * extra_tokens,
    }
    return copy_tokenizer(writer, vocab_source, extra=extra)


def make_small_model(
    path, vocab_source, *, arch: str = "gemma2", extra_tokens: int = 0, extra_merges: int = 0
) -> Path:
    """A small seeded F16 model (4 layers, 256 wide, 4 heads and 2 KV heads of 64, tied embeddings) with
    `vocab_source`'s vocabulary (plus `extra_tokens`). arch "gemma2": a sliding window of 256 on every
    other layer, the sliding-window KV cache path; arch "llama": plain."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    d, n_layer, n_head, n_kv, hd, n_ff = 256, 4, 4, 2, 64, 512
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in [
        (w.add_context_length, 8192),
        (w.add_embedding_length, d),
        (w.add_block_count, n_layer),
        (w.add_feed_forward_length, n_ff),
        (w.add_head_count, n_head),
        (w.add_head_count_kv, n_kv),
        (w.add_key_length, hd),
        (w.add_value_length, hd),
        (w.add_rope_dimension_count, hd),
        (w.add_layer_norm_rms_eps, 1e-6),
        (w.add_file_type, 1),
    ]:
        add(value)
    if arch == "gemma2":
        w.add_sliding_window(256)
    n_vocab = _copy_tokenizer(w, vocab_source, extra_tokens, extra_merges)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * (0.5 / np.sqrt(cols))).astype(np.float16)

    def vec(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(n_vocab, d))
    w.add_tensor("output_norm.weight", vec(d))
    post = [("post_attention_norm", d), ("post_ffw_norm", d)] if arch == "gemma2" else []
    for i in range(n_layer):
        p = f"blk.{i}."
        for name, t in [
            ("attn_norm", vec(d)),
            ("attn_q", mat(n_head * hd, d)),
            ("attn_k", mat(n_kv * hd, d)),
            ("attn_v", mat(n_kv * hd, d)),
            ("attn_output", mat(d, n_head * hd)),
            ("ffn_norm", vec(d)),
            ("ffn_gate", mat(n_ff, d)),
            ("ffn_up", mat(n_ff, d)),
            ("ffn_down", mat(d, n_ff)),
            *[(name, vec(n)) for name, n in post],
        ]:
            w.add_tensor(p + name + ".weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="session")
def synthetic_gemma2(smollm2_path, tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("gemma2") / "gemma2-swa.gguf", smollm2_path)


@pytest.fixture(scope="session")
def synthetic_q4_k_m(synthetic_f16):
    from llamacpp import reference_quantized

    return reference_quantized(synthetic_f16, "Q4_K_M")


# -- the estimate against llama-bench's measured peak RSS ----------------------------------------------------

CASES = [
    pytest.param(level, ctx, marks=[slow] if ctx == 8192 and level != "Q4_K_M" else [], id=f"{level}-{ctx}")
    for ctx in (512, 2048, 8192)
    for level in ("F16", "Q8_0", "Q4_K_M")
]


@pytest.mark.parametrize("level,n_ctx", CASES)
def test_estimate_within_10_percent_of_llama_bench_peak_rss(smollm2_levels, level, n_ctx, record_property):
    path = smollm2_levels[level]
    est = memory.estimate(memory.load_source(path), n_ctx=n_ctx)
    measured = llama_bench_peak_rss(path, n_ctx)
    error = est.total_bytes / measured - 1
    record_property("estimate_mib", mib(est.total_bytes))
    record_property("measured_mib", mib(measured))
    record_property("error", round(error, 4))
    assert abs(error) < TOLERANCE, (
        f"{level} n_ctx {n_ctx}: estimate {mib(est.total_bytes)} MiB, measured "
        f"{mib(measured)} MiB ({error:+.1%})"
    )


def test_planned_level_equals_the_file_llama_cpp_made(smollm2_levels):
    """Estimating Q4_K_M from the F16 file (the recipes plan) gives what the real Q4_K_M file gives."""
    f16 = memory.load_source(smollm2_levels["F16"])
    for level in ("Q8_0", "Q4_K_M"):
        planned = memory.estimate(f16, n_ctx=2048, level=level)
        real = memory.estimate(memory.load_source(smollm2_levels[level]), n_ctx=2048)
        assert planned.weights_bytes == real.weights_bytes
        assert planned.total_bytes == real.total_bytes


@pytest.mark.parametrize("level", ["F16", "Q4_K_M"])
def test_rows_multiple_of_256_within_10_percent(synthetic_f16, synthetic_q4_k_m, level, record_property):
    """A model whose rows are multiples of 256: K-quants everywhere, so most tensors are repacked."""
    path = synthetic_f16 if level == "F16" else synthetic_q4_k_m
    est = memory.estimate(memory.load_source(path), n_ctx=2048)
    measured = llama_bench_peak_rss(path, 2048)
    error = est.total_bytes / measured - 1
    record_property("error", round(error, 4))
    assert abs(error) < TOLERANCE, f"estimate {mib(est.total_bytes)} MiB, measured {mib(measured)} MiB"


# -- the terms against the buffers llama.cpp allocates -------------------------------------------------------


@pytest.mark.parametrize("n_ctx,kv_type", [(1000, "f16"), (3000, "q8_0"), (600, "q4_0")])
def test_kv_cache_and_weights_match_llama_cpp_buffers(smollm2_levels, n_ctx, kv_type):
    path = smollm2_levels["Q4_K_M"]
    got = llama_cpp_buffers(path, n_ctx, type_k=kv_type, type_v=kv_type)
    est = memory.estimate(memory.load_source(path), n_ctx=n_ctx, kv_type=kv_type)
    assert est.kv_cells == got["cells"]  # padded to 256 as llama.cpp pads
    assert mib(est.kv_bytes) == pytest.approx(got["kv"], abs=0.01)
    assert mib(est.weights_repacked_bytes) == pytest.approx(got["repack"], abs=0.01)
    # the mapped buffer spans the data section (tensor bytes with their alignment padding)
    assert mib(est.weights_mapped_bytes) == pytest.approx(got["mapped"], abs=0.01)
    assert mib(est.output_bytes) == pytest.approx(got["output"], abs=0.01)
    # the scheduler's reservation (plus the CPU work buffer): within 10%, ggml-alloc's packing is not modelled
    assert est.compute_reserved_bytes == pytest.approx(got["compute"] * (1 << 20), rel=0.10)


@pytest.mark.parametrize("n_ctx", [200, 2048, 5000])
def test_sliding_window_kv_cache_matches_llama_cpp(synthetic_gemma2, n_ctx):
    """gemma2: the SWA layers keep pad(window + ubatch, 256) cells, the others n_ctx padded."""
    got = llama_cpp_buffers(synthetic_gemma2, n_ctx)
    m = memory.load_source(synthetic_gemma2)
    assert m.is_swa == [True, False, True, False] and m.n_swa == 256
    est = memory.estimate(m, n_ctx=n_ctx)
    assert len(got["kv_caches"]) == 2  # llama.cpp's two caches, non-SWA and SWA
    assert mib(est.kv_bytes) == pytest.approx(sum(got["kv_caches"]), abs=0.02)
    assert mib(est.weights_mapped_bytes) == pytest.approx(got["mapped"], abs=0.01)


def test_sliding_window_model_within_10_percent(synthetic_gemma2, record_property):
    est = memory.estimate(memory.load_source(synthetic_gemma2), n_ctx=2048)
    measured = llama_bench_peak_rss(synthetic_gemma2, 2048)
    error = est.total_bytes / measured - 1
    record_property("error", round(error, 4))
    assert abs(error) < TOLERANCE, f"estimate {mib(est.total_bytes)} MiB, measured {mib(measured)} MiB"


def test_large_vocabulary_within_10_percent(smollm2_path, tmp_path, record_property):
    """The runtime's vocabulary tables grow with the tokens and merges (Llama 3 has 128k and 280k): a small
    model with a 150k vocabulary and 110k merges, sizes the overhead model was not fitted on."""
    path = make_small_model(
        tmp_path / "vocab150k.gguf",
        smollm2_path,
        arch="llama",
        extra_tokens=150_000 - 49_152,
        extra_merges=60_000,
    )
    model = memory.load_source(path)
    assert model.n_vocab == 150_000 and model.n_merges == 48_900 + 60_000
    est = memory.estimate(model, n_ctx=1024)
    measured = llama_bench_peak_rss(path, 1024)
    error = est.total_bytes / measured - 1
    record_property("error", round(error, 4))
    assert abs(error) < TOLERANCE, f"estimate {mib(est.total_bytes)} MiB, measured {mib(measured)} MiB"


def test_f16_weights_match_llama_cpp_buffer(smollm2_levels, synthetic_q4_k_m):
    for path in (smollm2_levels["F16"], smollm2_levels["Q8_0"], synthetic_q4_k_m):
        got = llama_cpp_buffers(path, 512)
        est = memory.estimate(memory.load_source(path), n_ctx=512)
        assert mib(est.weights_mapped_bytes) == pytest.approx(got["mapped"], abs=0.01)
        assert mib(est.weights_repacked_bytes) == pytest.approx(got["repack"], abs=0.01)


# -- sources -------------------------------------------------------------------------------------------------


def _smollm2_config(model) -> dict:
    arch = model.architecture
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": model.get(f"{arch}.embedding_length"),
        "num_hidden_layers": model.get(f"{arch}.block_count"),
        "num_attention_heads": model.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": model.get(f"{arch}.attention.head_count_kv"),
        "intermediate_size": model.get(f"{arch}.feed_forward_length"),
        "vocab_size": len(model.get("tokenizer.ggml.tokens")),
        "tie_word_embeddings": True,
        "max_position_embeddings": model.get(f"{arch}.context_length"),
    }


def test_hf_folder_and_bare_size_give_the_gguf_shape(smollm2_levels, tmp_path):
    """config.json (written from the GGUF's metadata) and "smollm2:135M" build the same tensors as the file
    llama.cpp converted, so F16 weights agree to the byte."""
    from ggufkit.gguf_file import open_gguf

    cfg = _smollm2_config(open_gguf(smollm2_levels["F16"]))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    gguf = memory.estimate(memory.load_source(smollm2_levels["F16"]), n_ctx=4096)
    for source in (tmp_path, "smollm2:135M"):
        m = memory.load_source(source)
        est = memory.estimate(m, n_ctx=4096, level="F16")
        assert est.weights_bytes == gguf.weights_bytes
        assert est.kv_bytes == gguf.kv_bytes
        assert est.total_bytes == gguf.total_bytes
        q4 = memory.estimate(m, n_ctx=4096, level="Q4_K_M")
        assert (
            q4.weights_bytes
            == memory.estimate(memory.load_source(smollm2_levels["Q4_K_M"]), n_ctx=4096).weights_bytes
        )


def test_bare_sizes_resolve_to_family_shapes():
    m = memory.load_source("7B")
    assert (m.n_layer, m.n_embd, m.n_head_kv[0], m.n_vocab) == (32, 4096, 32, 32000)
    assert m.n_params == pytest.approx(6.74e9, rel=0.01)
    q = memory.load_source("qwen2:1.5B")
    assert q.arch == "qwen2" and q.n_params == pytest.approx(1.54e9, rel=0.02)
    scaled = memory.load_source("20B")  # no typical llama shape near 20B: the nearest one, deeper
    assert scaled.n_params == pytest.approx(20e9, rel=0.05) and "scaled" in scaled.note
    g = memory.load_source("gemma2:9B")
    assert g.n_swa == 4096 and g.is_swa[:4] == [True, False, True, False]


def test_kv_cache_formula_sliding_window_and_quantized_types():
    g = memory.load_source("gemma2:9B")  # 42 layers, 8 KV heads x 256, window 4096, every other layer
    est = memory.estimate(g, n_ctx=32768, level="Q8_0")
    per_cell = 2 * 8 * 256 * 2  # K and V, f16
    swa_cells = 4096 + 512  # the window plus one ubatch, a multiple of 256
    assert est.kv_bytes == 21 * per_cell * 32768 + 21 * per_cell * swa_cells
    short = memory.estimate(g, n_ctx=1000, level="Q8_0")  # shorter than the window: every layer has 1024
    assert short.kv_bytes == 42 * per_cell * 1024
    q8 = memory.estimate(memory.load_source("8B"), n_ctx=8192, level="Q4_K_M", kv_type="q8_0")
    assert q8.kv_bytes == 32 * 2 * (8 * 128 // 32 * 34) * 8192
    q4 = memory.estimate(memory.load_source("8B"), n_ctx=8192, level="Q4_K_M", kv_type="q4_0")
    assert q4.kv_bytes == 32 * 2 * (8 * 128 // 32 * 18) * 8192


def test_levels_order_by_size_and_table_marks():
    m = memory.load_source("8B")
    table = memory.fit_table(
        m, levels=["F16", "Q8_0", "Q4_K_M"], contexts=[2048, 32768], ram_bytes=memory.parse_bytes("12G")
    )
    needed = [[e.needed_bytes for e in row] for row in table.cells]
    assert needed[0][0] > needed[1][0] > needed[2][0]
    assert all(row[0] < row[1] for row in needed)
    marks = [[table.fits(e) for e in row] for row in table.cells]
    assert marks == [[n <= 12 * 2**30 for n in row] for row in needed]
    text = memory.format_table(table)
    assert "Q4_K_M" in text and " x" in text and " +" in text


def test_sizes_parse():
    assert memory.parse_bytes("16G") == 16 << 30
    assert memory.parse_bytes("16GiB") == 16 << 30
    assert memory.parse_bytes("8GB") == 8 * 10**9
    assert memory.parse_bytes("512M") == 512 << 20
    assert memory.parse_param_count("135M") == 135_000_000
    assert memory.parse_param_count("1.5b") == 1_500_000_000
    for bad in ("lots", "16X", "G", "-1G"):
        with pytest.raises(MemoryEstimateError):
            memory.parse_bytes(bad)
    assert memory.available_memory() > 0


# -- the command ---------------------------------------------------------------------------------------------


def test_cli_json_for_a_gguf_as_it_is(smollm2_levels, capsys):
    path = smollm2_levels["Q4_K_M"]
    assert cli_main(["ram", str(path), "--ctx", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est = memory.estimate(memory.load_source(path), n_ctx=2048)
    for key in ("weights_bytes", "kv_bytes", "compute_bytes", "overhead_bytes", "total_bytes"):
        assert out[key] == getattr(est, key)
    assert (
        out["total_bytes"]
        == out["weights_bytes"]
        + out["kv_bytes"]
        + out["compute_bytes"]
        + out["output_bytes"]
        + out["overhead_bytes"]
    )
    assert out["level"] == "Q4_K_M"


def test_cli_text_table(smollm2_levels, capsys):
    assert (
        cli_main(
            [
                "ram",
                str(smollm2_levels["F16"]),
                "--ctx",
                "512",
                "--ctx",
                "8192",
                "--type",
                "Q8_0",
                "--type",
                "Q4_K_M",
                "--ram",
                "300M",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "weights" in out and "KV cache" in out and "compute" in out and "overhead" in out
    rows = [line for line in out.splitlines() if line.startswith(("Q8_0 ", "Q4_K_M ")) and " at " not in line]
    assert len(rows) == 2 and all(line.count("+") + line.count(" x") == 2 for line in rows)


@pytest.mark.parametrize(
    "source,expect",
    [
        ("7X", "unknown model"),
        ("martian:7B", "unknown model family"),
        ("nonexistent/model.gguf", "no such"),
    ],
)
def test_cli_bad_sources_exit_2_with_one_line(source, expect, capsys):
    assert cli_main(["ram", source]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err


def test_cli_config_without_fields_and_non_gguf(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 512, "num_hidden_layers": 4}))
    assert cli_main(["ram", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_attention_heads" in err and "vocab_size" in err
    junk = tmp_path / "weights.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert cli_main(["ram", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights.gguf" in err
    assert cli_main(["ram", "7B", "--ram", "plenty"]) == 2
    assert "plenty" in capsys.readouterr().err


def test_errors_are_ggufkit_errors():
    with pytest.raises(GgufkitError):
        memory.estimate(memory.load_source("1B"), n_ctx=0)
    with pytest.raises(GgufkitError):
        memory.estimate(memory.load_source("1B"), n_ctx=512, kv_type="q5_9")
