"""`ggufkit imatrix` against the real llama-imatrix, run by the test on the same model, text, ctx and chunks.

1. SmolLM2-135M F16 (llama.cpp's own F16 of the shipped Q4_1): the same tensors in the same order with the
   same shapes, metadata and counts (the GGUF header is byte for byte llama-imatrix's), and every sum within
   1e-3 relative RMS of llama-imatrix's; the legacy .dat and the --in-file merges byte for byte
   llama-imatrix's when both start from the same statistics.
2. A seeded Mixtral-style MoE (4 experts, 2 used): the same count per expert, every expert's slice of the
   sums within 1e-3.
3. What the statistics are for: llama-quantize and ggufkit quantize read our file and write the same bytes;
   SmolLM2 quantized with our imatrix (Q4_K_M, IQ4_XS, Q2_K) has a mean KLD within 1 % of the same level
   quantized with llama-imatrix's.
4. The covariances X^T X against a direct numpy computation, and their diagonal against llama-imatrix.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufkit.cache import cache_dir, sha256_file
from ggufkit.calibrate import compute_imatrix
from ggufkit.evaluation import calibration_text
from ggufkit.quantize.imatrix import read_imatrix
from tests.helpers.llama_programs import reference_imatrix, reference_quantized

CTX, CHUNKS = 256, 4  # 1024 tokens of SmolLM2
REL_RMS = 1e-3


@pytest.fixture(scope="session")
def calib_file() -> Path:
    """The default calibration text in a file (a stable path: it is stored in imatrix.datasets)."""
    path = cache_dir("imatrix") / "pydoc-topics-calibration-half.txt"
    text = calibration_text()
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f"tmp-{path.name}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


@pytest.fixture(scope="session")
def smol_pair(smollm2_f16, calib_file, tmp_path_factory) -> tuple[Path, Path]:
    """(ours, llama-imatrix's) GGUF imatrix of SmolLM2 F16."""
    ref = reference_imatrix(smollm2_f16, calib_file, ctx=CTX, chunks=CHUNKS)
    ours = tmp_path_factory.mktemp("imatrix") / "smol.imatrix.gguf"
    compute_imatrix(smollm2_f16, output=ours, text=calib_file, ctx=CTX, chunks=CHUNKS, threads=2)
    return ours, ref


def _tensors(path) -> dict[str, np.ndarray]:
    """Tensor data by name, read with gguf-py (an independent reader), in file order."""
    return {
        t.name: np.array(t.data, dtype=np.float64).reshape(-1) for t in gguf.GGUFReader(str(path)).tensors
    }


def _header(path) -> bytes:
    r = gguf.GGUFReader(str(path))
    start = min(t.data_offset for t in r.tensors)
    return Path(path).read_bytes()[:start]


def rel_rms(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2)))


def test_smollm2_agrees_with_llama_imatrix(smol_pair):
    ours, ref = smol_pair
    # same KVs (types and values: datasets, chunk_count, chunk_size), tensor names, order, shapes, offsets
    assert _header(ours) == _header(ref)
    assert Path(ours).stat().st_size == Path(ref).stat().st_size
    a, b = _tensors(ours), _tensors(ref)
    assert list(a) == list(b) and len(a) == 2 * 30 * 7
    worst = 0.0
    for name in b:
        if name.endswith(".counts"):
            assert np.array_equal(a[name], b[name]) and b[name][0] == CTX * CHUNKS, name
        else:
            worst = max(worst, rel_rms(a[name], b[name]))
    print(f"SmolLM2 F16: worst per-tensor relative RMS of the sums {worst:.2e}")
    assert worst <= REL_RMS


def test_legacy_dat_is_llama_imatrixs(smollm2_f16, smol_pair, tmp_path):
    """Converted to .dat, and merged with --in-file (two files), our writer gives llama-imatrix's bytes."""
    ours, ref = smol_pair
    dat = compute_imatrix(smollm2_f16, output=tmp_path / "r.dat", in_files=[ref], ctx=CTX).output
    assert sha256_file(dat) == sha256_file(reference_imatrix(smollm2_f16, ctx=CTX, fmt="dat", in_files=[ref]))
    merged = compute_imatrix(smollm2_f16, output=tmp_path / "m.gguf", in_files=[ref, ours], ctx=CTX).output
    ref_merged = reference_imatrix(smollm2_f16, ctx=CTX, in_files=[ref, ours])
    assert sha256_file(merged) == sha256_file(ref_merged)
    imx = read_imatrix(merged)
    assert imx.chunk_count == 2 * CHUNKS and len(imx.datasets) == 2


def test_merging_a_dat_like_llama_imatrix(smollm2_f16, smol_pair, tmp_path):
    """A legacy file merged with a GGUF one: the sums come back as value * chunk_size (float32 products in
    llama-imatrix, float64 here: equal to 1e-6)."""
    ours, ref = smol_pair
    ref_dat = reference_imatrix(smollm2_f16, ctx=CTX, fmt="dat", in_files=[ref])
    mine = compute_imatrix(smollm2_f16, output=tmp_path / "m.gguf", in_files=[ours, ref_dat], ctx=CTX).output
    theirs = reference_imatrix(smollm2_f16, ctx=CTX, in_files=[ours, ref_dat])
    assert _header(mine) == _header(theirs)
    a, b = _tensors(mine), _tensors(theirs)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)


def test_both_quantizers_read_our_files(smollm2_f16, smol_pair, tmp_path):
    """llama-quantize --imatrix and ggufkit quantize --imatrix make the same file from our imatrix (GGUF and
    .dat), and it is not the file made without one."""
    from ggufkit.quantize.job import quantize_file

    ours, _ = smol_pair
    dat = compute_imatrix(smollm2_f16, output=tmp_path / "o.dat", in_files=[ours], ctx=CTX).output
    plain = reference_quantized(smollm2_f16, "Q4_K_M")
    for imx in (ours, dat):
        theirs = reference_quantized(smollm2_f16, "Q4_K_M", imatrix=imx)
        mine = quantize_file(smollm2_f16, tmp_path / "q.gguf", "Q4_K_M", imatrix=imx, threads=2).dst
        assert sha256_file(mine) == sha256_file(theirs), imx
        assert sha256_file(mine) != sha256_file(plain)


# -- mixture of experts ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moe_model(smollm2_path) -> Path:
    from tests.helpers.synthetic import synthetic_llama

    return synthetic_llama(smollm2_path, seed=3, dtype="F32", n_expert=4, n_layer=2, n_ff=256)


def test_moe_counts_per_expert(moe_model, calib_file, tmp_path):
    """With --process-output (the model's output is untied), so output.weight is compared too."""
    ctx, chunks = 128, 4
    ref = reference_imatrix(moe_model, calib_file, ctx=ctx, chunks=chunks, extra=["--process-output"])
    ours = compute_imatrix(
        moe_model, output=tmp_path / "moe.gguf", text=calib_file, ctx=ctx, chunks=chunks, process_output=True
    )
    assert _header(ours.output) == _header(ref)
    a, b = _tensors(ours.output), _tensors(ref)
    assert list(a) == list(b)
    experts = [n[: -len(".counts")] for n in b if n.endswith(".counts") and b[n].size == 4]
    assert sorted(experts) == [
        f"blk.{i}.ffn_{k}_exps.weight" for i in range(2) for k in ("down", "gate", "up")
    ]
    assert "blk.0.ffn_gate_inp.weight.in_sum2" in b and "output.weight.in_sum2" in b
    worst = 0.0
    for name in experts:
        counts = b[name + ".counts"]
        np.testing.assert_array_equal(a[name + ".counts"], counts, err_msg=name)
        assert counts.sum() == 2 * ctx * chunks and (counts > 0).all(), name  # two experts per token
        pairs = zip(a[name + ".in_sum2"].reshape(4, -1), b[name + ".in_sum2"].reshape(4, -1))
        for x, y in pairs:  # each expert's slice
            worst = max(worst, rel_rms(x, y))
    for name in b:
        if name.endswith(".in_sum2") and name[: -len(".in_sum2")] not in experts:
            worst = max(worst, rel_rms(a[name], b[name]))
    print(f"MoE: worst per-expert relative RMS of the sums {worst:.2e}")
    assert worst <= REL_RMS


# -- the quantized levels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["Q4_K_M", "IQ4_XS", "Q2_K"])
def test_levels_with_our_imatrix_cost_what_llamas_cost(smollm2_f16, smol_pair, tmp_path, level):
    """Mean KLD against the F16 base (ggufkit's evaluation, llama.cpp as the engine, 4 chunks of 512 of the
    evaluation half of the pydoc topics) of the level made with our imatrix within 1 % of the level made
    with llama-imatrix's."""
    from ggufkit.evaluation import evaluate
    from ggufkit.quantize.job import quantize_file

    ours, ref = smol_pair
    levels = {  # ours made by ggufkit; llama-imatrix's by llama-quantize (the same bytes, and cached)
        "ours": quantize_file(smollm2_f16, tmp_path / "ours.gguf", level, imatrix=ours, threads=2).dst,
        "llama": reference_quantized(smollm2_f16, level, imatrix=ref),
    }
    klds = {
        who: evaluate(q, base=smollm2_f16, ctx=512, chunks=4, threads=2, engine="llama.cpp").kld_mean
        for who, q in levels.items()
    }
    ratio = klds["ours"] / klds["llama"]
    print(f"{level}: KLD ours {klds['ours']:.5f}, llama-imatrix's {klds['llama']:.5f}, ratio {ratio:.4f}")
    assert abs(ratio - 1) <= 0.01


# -- covariances -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_hessian_is_xtx(smollm2_path, calib_file, tmp_path, moe):
    """Each weight's stored X^T X (each expert's, for the MoE) equals the product computed directly from the
    inputs (recorded by a plain observer in a separate run), its diagonal is the imatrix's in_sum2, and that
    diagonal agrees with llama-imatrix; the size stated before the run is the accumulators' (twice)."""
    from ggufkit.calibrate.hessian import hessian_bytes, read_hessian, read_index
    from ggufkit.engine.llama import LlamaModel
    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.gguf.reader import open_gguf
    from tests.helpers.synthetic import synthetic_llama

    shape = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_ff": 256} | ({"n_expert": 4} if moe else {})
    model = synthetic_llama(smollm2_path, seed=4, dtype="F32", **shape)
    ctx, chunks = 64, 3
    res = compute_imatrix(
        model,
        output=tmp_path / "h.gguf",
        text=calib_file,
        ctx=ctx,
        chunks=chunks,
        hessian=tmp_path / "H",
        threads=2,
    )
    index = read_index(tmp_path / "H")
    with open_gguf(model) as g:
        assert res.hessian_bytes == hessian_bytes(g) > 0
        tok = load_tokenizer(g)
        ids = tok.encode(calib_file.read_text(encoding="utf-8"))[: ctx * chunks].reshape(chunks, ctx).copy()
        if tok.add_bos:  # as llama-imatrix feeds a chunk
            ids[:, 0] = tok.bos_id
        seen: dict[tuple[str, int], list] = {}

        def record(name, x, *, expert=0, n_expert=1):
            seen.setdefault((name, expert), []).append(x.copy())

        LlamaModel(g, observer=record).hidden(ids)
    names = sorted({n for n, _ in seen if n.startswith("blk.")})
    assert sorted(index["tensors"]) == names and (not moe or "blk.1.ffn_down_exps.weight" in names)
    ne0 = {n: x[0].shape[1] for (n, _), x in seen.items()}
    assert res.hessian_bytes == 2 * sum(8 * index["tensors"][n]["n_mat"] * ne0[n] ** 2 for n in names)
    sums = _tensors(res.output)
    ref = _tensors(reference_imatrix(model, calib_file, ctx=ctx, chunks=chunks))
    for name in names:
        info, h = index["tensors"][name], read_hessian(tmp_path / "H", name)
        n_mat = info["n_mat"]
        assert h.shape == (n_mat, ne0[name], ne0[name]) and h.dtype == np.float64
        assert n_mat == (4 if moe and "_exps" in name else 1)
        for e in range(n_mat):
            x = np.concatenate(seen[(name, e)]).astype(np.float64)
            direct = np.einsum("ri,rj->ij", x, x)
            np.testing.assert_allclose(
                h[e], direct, rtol=1e-9, atol=1e-9 * np.abs(direct).max(), err_msg=name
            )
            assert np.array_equal(h[e], h[e].T) and info["rows"][e] == x.shape[0]
        diag = np.diagonal(h, axis1=1, axis2=2).reshape(-1)
        np.testing.assert_allclose(diag, sums[name + ".in_sum2"], rtol=1e-6, err_msg=name)
        assert rel_rms(diag, ref[name + ".in_sum2"]) <= REL_RMS, name


def test_output_weight_skipped_by_default(smollm2_path, calib_file, tmp_path):
    """An untied output.weight is left out unless asked for, as llama-imatrix leaves it out."""
    from tests.helpers.synthetic import synthetic_llama

    model = synthetic_llama(
        smollm2_path, seed=5, dtype="F32", n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128
    )
    ref = reference_imatrix(model, calib_file, ctx=64, chunks=2)
    ours = compute_imatrix(model, output=tmp_path / "o.gguf", text=calib_file, ctx=64, chunks=2).output
    assert _header(ours) == _header(ref)
    assert not any(n.startswith("output.") for n in _tensors(ref)) and len(_tensors(ref)) == 2 * 2 * 7
