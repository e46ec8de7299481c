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

import pytest

from ggufkit import memory
from ggufkit.cli import main as cli_main
from ggufkit.errors import GgufkitError, MemoryEstimateError
from tests.helpers.memory_oracle import llama_bench_peak_rss, llama_cpp_buffers, make_small_model

SLOW = os.environ.get("GGUFKIT_SLOW_TESTS", "1") != "0"
slow = pytest.mark.skipif(not SLOW, reason="8176-token prompt skipped: GGUFKIT_SLOW_TESTS=0")
TOLERANCE = 0.10


def mib(n: int) -> float:
    return round(n / (1 << 20), 2)


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_levels(smollm2_f16):
    """SmolLM2 at F16 (llama.cpp's own conversion), Q8_0 and Q4_K_M (llama-quantize from that F16)."""
    from tests.helpers.llama_programs import reference_quantized

    return {
        "F16": smollm2_f16,
        "Q8_0": reference_quantized(smollm2_f16, "Q8_0"),
        "Q4_K_M": reference_quantized(smollm2_f16, "Q4_K_M"),
    }


@pytest.fixture(scope="session")
def synthetic_gemma2(smollm2_path, tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("gemma2") / "gemma2-swa.gguf", smollm2_path)


@pytest.fixture(scope="session")
def synthetic_q4_k_m(synthetic_f16):
    from tests.helpers.llama_programs import reference_quantized

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
    """Estimating Q4_K_M from the F16 file (the quantize plan) gives what the real Q4_K_M file gives."""
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
    from ggufkit.gguf.reader import open_gguf

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


# A checkpoint folder is estimated as the file `ggufkit convert --type F16` makes of it: the oracle is that
# file, written by the command in the test (tests/test_convert.py holds it byte-identical to
# convert_hf_to_gguf.py's), and `ram` run on it. llama3 rope adds a generated rope_freqs tensor; qwen2 has
# q/k/v biases; gemma3 has its extra norms and sliding-window layers.
CHECKPOINTS = [("llama", "BF16", {"rope": "llama3"}), ("qwen2", "F16", {"shards": 2}), ("gemma3", "F32", {})]


@pytest.mark.parametrize("arch,dtype,opts", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_checkpoint_folder_estimate_is_the_converted_files(arch, dtype, opts, tmp_path, capsys):
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint(arch, dtype, **opts)
    gguf = tmp_path / "converted.gguf"
    assert cli_main(["convert", str(folder), str(gguf), "--type", "F16"]) == 0
    capsys.readouterr()
    outputs = []
    for source in (folder, gguf):
        for extra in ([], ["--type", "F16", "--type", "Q8_0", "--type", "Q4_K_M", "--type", "Q2_K"]):
            args = ["ram", str(source), "--ctx", "512", "--ctx", "8192", "--ram", "1G", "--json", *extra]
            assert cli_main(args) == 0
            outputs.append(json.loads(capsys.readouterr().out))

    def without_name(d):
        if isinstance(d, dict):
            return {k: without_name(v) for k, v in d.items() if k != "model"}
        return [without_name(v) for v in d] if isinstance(d, list) else d

    folder_default, folder_levels, gguf_default, gguf_levels = outputs
    # the folder's default is F16 (planned); the file's is the file as it is, an F16 file, which its
    # default table lists first ("F16 file") before the ladder F16 .. Q2_K the folder's table has
    assert folder_default["level"] == gguf_default["level"] == "F16"
    folder_table, gguf_table = folder_default.pop("table"), gguf_default.pop("table")
    assert without_name(folder_default) == without_name(gguf_default)
    assert gguf_table["levels"][0] == "F16 file" and gguf_table["levels"][1:] == folder_table["levels"]
    assert without_name(gguf_table["rows"][1:]) == without_name(folder_table["rows"])
    assert without_name(folder_levels) == without_name(gguf_levels)
    assert [row["level"] for row in folder_levels["table"]["rows"]] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    # and the facts llama.cpp reads are those of the file
    m, g = memory.load_source(folder), memory.load_source(gguf)
    assert m.kind == "hf" and g.kind == "gguf"

    def facts(x):
        tensors = [(t.name, t.shape, t.ggml_type) for t in x.tensors]
        return tensors, x.n_vocab, x.n_merges, x.n_ctx_train, x.is_swa, x.n_head_kv

    assert facts(m) == facts(g)


@pytest.mark.parametrize("arch,dtype,opts", CHECKPOINTS + [("qwen3", "F16", {})], ids=lambda v: str(v))
def test_config_alone_has_the_converted_files_tensors(arch, dtype, opts, tmp_path):
    """A config.json with no weights beside it (a model not downloaded yet) gets the tensors `ggufkit
    convert --type F16` writes for the whole checkpoint: names, shapes, types and order, from the
    converter's tables."""
    import shutil

    from ggufkit.conversion import job
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint(arch, dtype, **opts)
    alone = tmp_path / folder.name
    alone.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, alone / name)
    gguf = tmp_path / "converted.gguf"
    job.convert(folder, gguf, type="F16", threads=1)
    m, g = memory.load_source(alone), memory.load_source(gguf)
    assert m.kind == "config" and "no weights" in memory.describe(m)
    assert [(t.name, t.shape, t.ggml_type) for t in m.tensors] == [
        (t.name, t.shape, t.ggml_type) for t in g.tensors
    ]
    if arch != "gemma3":  # (gemma3's sliding layers: config.json's layer_types, llama.cpp's own pattern)
        for level in ("F16", "Q4_K_M"):
            a, b = memory.estimate(m, n_ctx=4096, level=level), memory.estimate(g, n_ctx=4096, level=level)
            assert a.needed_bytes == b.needed_bytes, level


def test_checkpoint_folder_convert_refuses_is_one_line(tmp_path, capsys):
    """A folder with weights that convert refuses (an architecture it cannot convert): the converter's own
    error, one line, exit 2 -- not an estimate from config.json alone."""
    import shutil

    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = tmp_path / "Phi-Tiny"
    shutil.copytree(synthetic_checkpoint("llama", "F16"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["Phi3ForCausalLM"]}))
    assert cli_main(["ram", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Phi3ForCausalLM" in err and "not supported" in err


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
