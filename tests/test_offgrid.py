"""The off-grid base (tests/helpers/offgrid.py) on a small synthetic model quantized to Q4_1 by llama.cpp:
noise within its stated bound per block, seeded, off every Q4_1 grid, and a file llama.cpp runs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ggufkit.gguf.reader import open_gguf
from ggufkit.quants import registry

SIZE = 0.5


def _quantized_synthetic(smollm2_path, level: str, **params):
    """A seeded synthetic llama (SmolLM2's vocabulary) quantized to `level` by llama.cpp, cached."""
    from ggufkit.cache import cache_dir
    from tests.helpers.llama_programs import llama_model_quantize
    from tests.helpers.synthetic import synthetic_llama

    f32 = synthetic_llama(smollm2_path, dtype="F32", n_layer=2, n_head=4, n_head_kv=2, tied=True, **params)
    target = cache_dir("synthetic") / f"{f32.stem}-{level}.gguf"
    if not target.exists():
        tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}.gguf")
        llama_model_quantize(f32, tmp, level)
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="module")
def q4_1_model(smollm2_path):
    """A seeded synthetic llama (128 wide, tied embeddings) quantized to Q4_1 by llama.cpp: like the shipped
    SmolLM2, its matmul weights are Q4_1 and its token_embd Q8_0 (128 is no multiple of 256), norms F32."""
    return _quantized_synthetic(smollm2_path, "Q4_1", seed=5, n_embd=128, n_ff=256)


@pytest.fixture(scope="module")
def bases(q4_1_model, tmp_path_factory):
    """(on-grid F32 by llama.cpp, off-grid seed 1, off-grid seed 1 again, seed 2, seed 1 at size 0.25)."""
    from tests.helpers.llama_programs import base_model
    from tests.helpers.offgrid import write_offgrid

    d = tmp_path_factory.mktemp("offgrid")
    return (
        base_model(q4_1_model, "F32"),
        write_offgrid(q4_1_model, d / "s1.gguf", seed=1, size=SIZE),
        write_offgrid(q4_1_model, d / "s1-again.gguf", seed=1, size=SIZE),
        write_offgrid(q4_1_model, d / "s2.gguf", seed=2, size=SIZE),
        write_offgrid(q4_1_model, d / "s1-quarter.gguf", seed=1, size=0.25),
    )


def _f32(path, name) -> np.ndarray:
    with open_gguf(path) as g:
        t = g.tensor(name)
        assert t.ggml_type.name == "F32"
        return np.asarray(t.data()).view(np.float32).reshape(t.shape[::-1]).copy()


def _steps(src, name) -> tuple[np.ndarray, int]:
    """Each block's |d| straight from the bytes (d is the fp16 at the start of every legacy block)."""
    with open_gguf(src) as g:
        t = g.tensor(name)
        fmt = registry.get_format(t.ggml_type)
        raw = np.asarray(t.data()).reshape(-1, fmt.type_size)
        return np.abs(raw[:, :2].copy().view("<f2").reshape(-1).astype(np.float64)), fmt.block_size


def test_the_fixture_is_shaped_like_the_shipped_model(q4_1_model):
    from tests.helpers.offgrid import perturbed_tensors

    with open_gguf(q4_1_model) as g:
        types = {t.name: (t.ggml_type.name, len(t.shape)) for t in g.tensors}
    assert types["token_embd.weight"] == ("Q8_0", 2)
    assert types["blk.0.attn_q.weight"] == ("Q4_1", 2) and types["blk.1.ffn_down.weight"] == ("Q4_1", 2)
    assert types["blk.0.attn_norm.weight"] == ("F32", 1)
    assert set(perturbed_tensors(q4_1_model)) == {n for n, (_, nd) in types.items() if nd == 2}


@pytest.mark.parametrize("which, size", [(1, SIZE), (4, 0.25)])
def test_noise_is_within_the_bound_of_each_block(q4_1_model, bases, which, size):
    on_grid, off = bases[0], bases[which]
    with open_gguf(q4_1_model) as g:
        names = [(t.name, len(t.shape)) for t in g.tensors]
    for name, ndim in names:
        a, b = _f32(on_grid, name), _f32(off, name)
        if ndim == 1:
            assert np.array_equal(a, b), name
            continue
        step, qk = _steps(q4_1_model, name)
        noise = (b.astype(np.float64) - a.astype(np.float64)).reshape(-1, qk)
        bound = size * step[:, None]
        # float32: the noise is rounded to float32, then added to the weight in float32
        slack = bound * 2.0**-23 + np.spacing(np.abs(a).reshape(-1, qk) + bound.astype(np.float32)) / 2
        assert (np.abs(noise) <= bound + slack).all(), name
        ratio = noise[step > 0] / step[step > 0, None]
        assert np.abs(ratio).max() > 0.95 * size, name  # the stated size, not a smaller one
        assert abs(ratio.mean()) < 0.02 * size and 0.9 < ratio.std() / (size / np.sqrt(3)) < 1.1, name


def test_seeded(bases):
    _, s1, s1_again, s2, _ = bases
    assert s1.read_bytes() == s1_again.read_bytes()
    a, b = _f32(s1, "blk.0.ffn_up.weight"), _f32(s2, "blk.0.ffn_up.weight")
    assert (a != b).mean() > 0.99


def _q4_1_error(path, name, *, importance: bool) -> float:
    """rms of (ggufkit's Q4_1 round trip - the weights), over the weights' rms."""
    x = _f32(path, name)
    imp = np.ones(x.shape[1], np.float32) if importance else None
    y = registry.dequantize(registry.quantize(x, "Q4_1", importance=imp), "Q4_1", x.shape)
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))


@pytest.mark.parametrize("importance", [False, True])
def test_requantizing_to_q4_1_is_no_longer_lossless(q4_1_model, bases, importance):
    on_grid, off = bases[0], bases[1]
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        on_err = _q4_1_error(on_grid, name, importance=importance)
        off_err = _q4_1_error(off, name, importance=importance)
        # the on-grid base is the Q4_1 file: re-encoding it is (all but) exact
        assert on_err < 1e-3, (name, on_err)
        # off the grid, a fresh Q4_1 rounding error (rms ~ step/sqrt(12), step ~ range/15) comes back
        step, qk = _steps(q4_1_model, name)
        x = _f32(on_grid, name)
        expected = np.sqrt(np.mean(step**2) / 12 / np.mean(x**2))
        assert off_err > 0.5 * expected, (name, off_err, expected)


def test_loads_in_llama_cpp_with_finite_logits(bases):
    import llama_cpp

    on_grid, off = bases[0], bases[1]
    logits = []
    for path in (on_grid, off):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
        try:
            ids = llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=False)
            llm.eval(ids[:8])
            logits.append(np.asarray(llm.scores[:8], dtype=np.float32))
        finally:
            llm.close()
    assert logits[1].shape == (8, 49152)
    assert np.isfinite(logits[1]).all() and logits[1].std() > 0
    assert not np.array_equal(logits[0], logits[1])  # the noise reaches the model's output


def test_parse_base():
    from tests.helpers.offgrid import parse_base

    assert parse_base("f32") == ("f32", 0, 0.5)
    assert parse_base("offgrid") == ("offgrid", 0, 0.5)
    assert parse_base("offgrid:3") == ("offgrid", 3, 0.5)
    assert parse_base("offgrid:3:0.25") == ("offgrid", 3, 0.25)
    for bad in ("ongrid", "offgrid:1:2:3", "f32:1"):
        with pytest.raises(ValueError):
            parse_base(bad)


def test_cached_by_source_seed_and_size(q4_1_model, bases, tmp_path, monkeypatch):
    from ggufkit.cache import sha256_file
    from tests.helpers.offgrid import offgrid_base

    monkeypatch.setenv("GGUFKIT_CACHE", str(tmp_path))
    p = offgrid_base(q4_1_model, seed=1, size=SIZE)
    assert p.is_relative_to(tmp_path) and sha256_file(q4_1_model)[:16] in p.name
    assert p.read_bytes() == bases[1].read_bytes()
    mtime = p.stat().st_mtime_ns
    assert offgrid_base(q4_1_model, seed=1, size=SIZE) == p and p.stat().st_mtime_ns == mtime
    others = offgrid_base(q4_1_model, seed=2, size=SIZE), offgrid_base(q4_1_model, seed=1, size=0.25)
    assert len({p, *others}) == 3


@pytest.fixture(scope="module")
def q4_k_m_model(smollm2_path):
    """A seeded synthetic llama 256 wide quantized to Q4_K_M by llama.cpp: its matmul weights are Q4_K and
    Q6_K (the K-quant super-blocks of Gemma 3 270M's shipped file), norms F32."""
    return _quantized_synthetic(smollm2_path, "Q4_K_M", seed=6, n_embd=256, n_ff=512)


def test_k_quant_steps_are_the_grid_of_each_sub_block(q4_k_m_model):
    """element_steps on Q4_K and Q6_K, checked against the dequantized values themselves: inside each
    sub-block they are a + k * step with integer k (a step too large breaks that), spanning at most the
    format's levels (a step too small would need more) and most of them (so no coarser grid fits either)."""
    from tests.helpers.offgrid import element_steps

    seen = set()
    with open_gguf(q4_k_m_model) as g:
        for t in g.tensors:
            fmt = registry.get_format(t.ggml_type)
            if fmt.name not in ("Q4_K", "Q6_K"):
                continue
            seen.add(fmt.name)
            sub, levels = (32, 15) if fmt.name == "Q4_K" else (16, 63)
            x = registry.dequantize(np.asarray(t.data()), t.ggml_type, (t.n_elements,)).astype(np.float64)
            step = element_steps(t).reshape(-1, sub).astype(np.float64)
            assert (step == step[:, :1]).all(), t.name  # one step per sub-block
            x = x.reshape(-1, sub)
            live = step[:, 0] > 0
            k = (x[live] - x[live].min(axis=1, keepdims=True)) / step[live]
            assert np.abs(k - np.rint(k)).max() < 1e-3, t.name
            span = np.rint(k).max(axis=1)
            assert span.max() <= levels and np.median(span) >= levels / 2, (t.name, span.max())
    assert seen == {"Q4_K", "Q6_K"}


def test_k_quant_noise_is_within_the_bound_of_each_element(q4_k_m_model, tmp_path):
    from tests.helpers.llama_programs import base_model
    from tests.helpers.offgrid import element_steps, perturbed_tensors, write_offgrid

    on_grid = base_model(q4_k_m_model, "F32")
    off = write_offgrid(q4_k_m_model, tmp_path / "off.gguf", seed=3, size=SIZE)
    with open_gguf(q4_k_m_model) as g:
        quantized = {t.name: t for t in g.tensors if t.ggml_type.name != "F32"}
        assert set(perturbed_tensors(q4_k_m_model)) == set(quantized)
        for name, t in quantized.items():
            a, b = _f32(on_grid, name).reshape(-1), _f32(off, name).reshape(-1)
            step = element_steps(t).reshape(-1).astype(np.float64)
            noise = b.astype(np.float64) - a.astype(np.float64)
            bound = SIZE * step
            slack = bound * 2.0**-23 + np.spacing(np.abs(a) + bound.astype(np.float32)) / 2
            assert (np.abs(noise) <= bound + slack).all(), name
            ratio = noise[step > 0] / step[step > 0]
            assert 0.9 < ratio.std() / (SIZE / np.sqrt(3)) < 1.1 and np.abs(ratio).max() > 0.95 * SIZE, name
