"""The built-in numpy engine against llama.cpp's logits (llama-cpp-python, computed in the test).

- SmolLM2-135M F16 (llama arch, tied output, GQA 3): logits close to llama.cpp's, argmax equal on >= 99.5 %
  of positions.
- SmolLM2-135M Q4_K_M made by llama-quantize (Q5_0, Q8_0, Q4_K (repacked by llama.cpp), Q6_K weights):
  every operation, fed llama.cpp's own intermediate tensors (captured with cb_eval), gives llama.cpp's
  output to float32 summation order, and would not without the 8-bit activation rounding; the whole forward
  pass agrees with llama.cpp's as well as llama.cpp agrees with itself when its norm weights move by 1 ulp.
- Seeded synthetic models (F32 weights, SmolLM2's vocabulary) for the other code paths: llama with an
  untied output and GQA 4; qwen2 (q/k/v biases, NeoX rope); qwen3 (per-head q/k RMS norm, NeoX rope).
- The activation rounding that emulates llama.cpp's CPU matmuls, against libggml's own quantizers.
- The numba F16 kernels (activation and KV-cache rounding, F16 weights) against numpy's astype, bit for bit
  on every half and every float32 rounding-boundary class, and the engine's logits with them against the
  logits with astype in their place (F16 and Q4_K_M models): bit-identical.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ggufkit.engine import llama as engine_llama
from ggufkit.engine import numerics as engine_numerics
from ggufkit.engine import weights as engine_weights
from ggufkit.engine.args import ModelArgs
from ggufkit.engine.llama import LlamaModel
from ggufkit.engine.numerics import f16_round, f16_to_f32, round_activations
from ggufkit.engine.numerics import rms_norm as _rms_norm
from ggufkit.engine.numerics import silu as _silu
from ggufkit.engine.tokenizer import load_tokenizer
from ggufkit.errors import EvalError
from ggufkit.evaluation import default_text
from ggufkit.gguf.reader import open_gguf
from tests.helpers.gguf_build import write_gguf


def _llama_cpp_logits(path, tokens: np.ndarray) -> np.ndarray:
    from tests.helpers.llama_programs import llama_cpp_logits

    return llama_cpp_logits(path, [tokens])[0]


def _ours(path, tokens: np.ndarray) -> np.ndarray:
    with open_gguf(path) as g:
        logits = LlamaModel(g).logits(tokens)
    assert logits.dtype == np.float32 and logits.shape[0] == len(tokens)
    return logits


def _text_tokens(path, n: int) -> np.ndarray:
    with open_gguf(path) as g:
        return load_tokenizer(g).encode(default_text())[:n]


def test_model_args_from_metadata(smollm2_f16):
    with open_gguf(smollm2_f16) as g:
        a = ModelArgs.from_gguf(g)
    assert (a.architecture, a.block_count, a.embedding_length, a.feed_forward_length) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (a.head_count, a.head_count_kv, a.key_length, a.rope_dimension_count) == (9, 3, 64, 64)
    assert a.rope_freq_base == pytest.approx(100000.0) and a.layer_norm_rms_epsilon == pytest.approx(1e-5)
    assert a.vocab_size == 49152 and not a.rope_neox


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """Relative RMS difference of two tensors (ours reshaped to ref's shape)."""
    ours = ours.reshape(ref.shape)
    return float(np.sqrt(np.mean((ours - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def _agree(ours: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of positions (rows of logits) where the two argmaxes are the same token."""
    return float(np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)))


def test_smollm2_f16_matches_llama_cpp(smollm2_f16):
    tokens = _text_tokens(smollm2_f16, 512)
    ref = _llama_cpp_logits(smollm2_f16, tokens)
    ours = _ours(smollm2_f16, tokens)
    rms, agree = _rel(ours, ref), _agree(ours, ref)
    print(f"relative RMS logit difference {rms:.2e}, argmax agreement {agree:.4f}")
    assert rms < 2e-3
    assert agree >= 0.995


# -- SmolLM2 Q4_K_M: llama.cpp's intermediate tensors -------------------------------------------------
class _GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the ggml in llama-cpp-python 0.3.36 (ggml.h), as far as we read it."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def _llama_cpp_tensors(path, tokens: np.ndarray, names: set[str]) -> dict[str, list[np.ndarray]]:
    """llama.cpp's F32 graph tensors called `names` for one batch of tokens, in the order computed
    (a name used twice, e.g. Qcur before and after rope, gives two arrays), each [tokens, ...]."""
    import llama_cpp

    got: dict[str, list[np.ndarray]] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(ptr, ask, _user):
        t = ctypes.cast(ptr, ctypes.POINTER(_GgmlTensor)).contents
        name = t.name.decode()
        if ask or name not in names:
            return ask and name in names
        assert t.type == 0, f"{name} is not F32"
        ne, nb = list(t.ne)[::-1], list(t.nb)[::-1]
        span = 4 + sum((n - 1) * b for n, b in zip(ne, nb))
        raw = np.frombuffer((ctypes.c_char * span).from_address(t.data), np.uint8)
        arr = np.lib.stride_tricks.as_strided(raw.view(np.float32), shape=ne, strides=nb)
        got.setdefault(name, []).append(arr.reshape(len(tokens), -1).copy())
        return True

    n = len(tokens)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=n, n_threads=2, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n
    params.n_threads = params.n_threads_batch = 2
    params.flash_attn_type = 1  # on, as llama-perplexity's "auto" picks on the CPU
    params.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(tok), i, 1, 1
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()
    return got


def test_q4_k_m_each_operation_is_llama_cpps(q4_k_m):
    """Layer 0 (attn_v Q8_0, ffn_down Q6_K), layer 3 (attn_v Q5_0, ffn_down Q4_K, which llama.cpp repacks to
    q4_K_8x8 with its own activation quantizer on AVX2+), the output (Q8_0, tied token_embd): each
    operation of our engine, given llama.cpp's inputs, reproduces llama.cpp's output to float32 summation
    order (~3e-7), where leaving out the 8-bit activation rounding would be ~1e-2 off. So the engine computes
    what llama.cpp computes; what remains is the order of float additions."""
    layers = (0, 3)
    per_layer = ["attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm"]
    per_layer += ["ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out", "l_out"]
    names = {"embd", "l_out-2", "result_norm", "result_output"}
    names |= {f"{n}-{il}" for il in layers for n in per_layer}
    tokens = _text_tokens(q4_k_m, 256)
    ref = _llama_cpp_tensors(q4_k_m, tokens, names)
    T = len(tokens)
    with open_gguf(q4_k_m) as g:
        m = LlamaModel(g)
        a = m.args
        eps = a.layer_norm_rms_epsilon
        np.testing.assert_array_equal(m._embed(tokens), ref["embd"][0])
        cos, sin = m._rope_tables(T)
        seen_types = set()
        for il in layers:
            w, ty = m._layer(il)

            def r(name, i=0, il=il):
                return ref[f"{name}-{il}"][i]

            x_in = ref["embd"][0] if il == 0 else ref[f"l_out-{il - 1}"][0]
            assert _rel(_rms_norm(x_in, w["attn_norm"], eps), r("attn_norm")) < 1e-7
            assert _rel(_rms_norm(r("ffn_inp"), w["ffn_norm"], eps), r("ffn_norm")) < 1e-7
            matmuls = [
                ("attn_q", r("attn_norm"), r("Qcur")),
                ("attn_k", r("attn_norm"), r("Kcur")),
                ("attn_v", r("attn_norm"), r("Vcur")),
                ("attn_output", r("kqv_out"), r("attn_out")),
                ("ffn_gate", r("ffn_norm"), r("ffn_gate")),
                ("ffn_up", r("ffn_norm"), r("ffn_up")),
                ("ffn_down", r("ffn_swiglu"), r("ffn_out")),
            ]
            for n, x, want in matmuls:
                seen_types.add(ty[n].name)
                assert _rel(m._matmul(x, w[n], ty[n]), want) < 2e-6, (il, n, ty[n].name)
                assert _rel(x @ w[n].T, want) > 1e-3, (il, n, "unrounded activations should be far off")
            q = m._rope(r("Qcur", 1).reshape(1, T, a.head_count, -1).copy(), cos, sin)
            assert _rel(q, r("Qcur", 2)) < 1e-6
            k = m._rope(r("Kcur", 1).reshape(1, T, a.head_count_kv, -1).copy(), cos, sin)
            assert _rel(k, r("Kcur", 2)) < 1e-6
            f16 = lambda t: t.astype(np.float16).astype(np.float32)  # noqa: E731  (llama.cpp's KV cache)
            k = f16(r("Kcur", 2)).reshape(1, T, a.head_count_kv, -1)
            v = f16(r("Vcur", 1)).reshape(1, T, a.head_count_kv, -1)
            attn = m._attention(r("Qcur", 2).reshape(1, T, a.head_count, -1), k, v)
            assert _rel(attn, r("kqv_out")) < 2e-6
            assert _rel(_silu(r("ffn_gate")) * r("ffn_up"), r("ffn_swiglu")) < 1e-6
            del w
        assert seen_types == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
        name = m._output_name()
        out = m._matmul(ref["result_norm"][0], m._weight(name), m._type(name))
        assert _rel(out, ref["result_output"][0]) < 2e-6


def _nudged_copy(path: Path, dst: Path, seed: int) -> Path:
    """A copy of `path` whose F32 norm weights moved by -1, 0 or +1 ulp at random: the same model to every
    practical purpose, a different float-order history for llama.cpp. A zero weight (Gemma has some) moves
    to the smallest subnormal of either sign, not to the NaN that -1 on its bits would make."""
    import shutil

    shutil.copyfile(path, dst)
    rng = np.random.default_rng(seed)
    with open_gguf(path) as g:
        spots = [(t.abs_offset, t.n_elements) for t in g.tensors if t.ggml_type == T.F32 and "norm" in t.name]
    with open(dst, "r+b") as f:
        for offset, n in spots:
            f.seek(offset)
            old = np.frombuffer(f.read(4 * n), "<i4")
            step = rng.integers(-1, 2, n).astype("<i4")
            bits = old + step
            zero = (old & 0x7FFFFFFF) == 0
            bits[zero] = np.where(step[zero] < 0, np.int32(-0x7FFFFFFF), step[zero])  # 0x80000001: -2^-149
            f.seek(offset)
            f.write(bits.tobytes())
    return dst


def test_q4_k_m_agrees_with_llama_cpp_as_llama_cpp_agrees_with_itself(q4_k_m, tmp_path):
    """The issue asks for >= 99.5 % argmax agreement on Q4_K_M; llama.cpp does not reach that against itself.

    Before each quantized matmul llama.cpp rounds the activations to 8 bits (Q8_0 blocks of 32, Q8_K blocks of
    256). Rounding turns an input difference e into a difference of order sqrt(e * step) (a fraction e/step of
    the values crosses a rounding boundary and moves a whole step), so a float32 summation-order difference
    of 1e-7 grows, stage after stage, until the two runs hold independent draws of the rounding noise (~2.5 %
    relative RMS on the logits). Bit-equal logits would need llama.cpp's exact summation order in every
    kernel (tinyBLAS lanes, repacked Q4_K gemm, Q6_K vec_dot, flash attention, its own expf in SiLU).
    The honest bar: our logits are as close to llama.cpp's as llama.cpp's are to its own on a copy whose norm
    weights moved by 1 ulp (measured 2026-11-27: ours 95.7-96.7 %, llama.cpp vs itself 95.1-95.9 %).
    With F16 weights (F16 rounding steps are 2^-11, not 2^-7) the same test gives 99.8 %: see above.
    This whole-model bar alone would not notice a missing activation rounding (an engine without it also
    lands ~2.5e-2 from llama.cpp, as one more independent draw); test_q4_k_m_each_operation_is_llama_cpps
    does."""
    tokens = _text_tokens(q4_k_m, 512)
    ref = _llama_cpp_logits(q4_k_m, tokens)
    ours = _ours(q4_k_m, tokens)
    selves = [
        _llama_cpp_logits(_nudged_copy(q4_k_m, tmp_path / f"nudged{s}.gguf", s), tokens) for s in (1, 2)
    ]

    self_agree = float(np.mean([_agree(x, ref) for x in selves]))
    self_rms = float(np.mean([_rel(x, ref) for x in selves]))
    print(
        f"ours vs llama.cpp: argmax {_agree(ours, ref):.4f}, relative RMS {_rel(ours, ref):.2e}; "
        f"llama.cpp vs itself (1-ulp norms): argmax {self_agree:.4f}, relative RMS {self_rms:.2e}"
    )
    assert self_agree < 0.995  # the bar is out of reach for llama.cpp itself
    assert _agree(ours, ref) >= self_agree - 0.01
    assert _rel(ours, ref) <= 1.25 * self_rms


# -- synthetic models for the other architectures ----------------------------------------------------
@pytest.fixture(scope="module")
def vocab_kvs(smollm2_path) -> list:
    """SmolLM2's tokenizer.* metadata (read once, with ggufkit's fast reader)."""
    with open_gguf(smollm2_path) as g:
        return [kv for key, kv in g.kv.items() if key.startswith("tokenizer.")]


def _write_model(path: Path, vocab_kvs: list, arch: str, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n_embd, n_layer, n_head, n_head_kv, n_ff = 128, 2, 4, 2, 256
    hd = n_embd // n_head
    n_vocab = len(next(kv.value for kv in vocab_kvs if kv.key == "tokenizer.ggml.tokens"))

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * (0.7 / np.sqrt(cols))).astype(np.float32)

    def vec(n, scale=0.1, base=1.0):
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    kvs = {
        "context_length": 4096,
        "embedding_length": n_embd,
        "block_count": n_layer,
        "feed_forward_length": n_ff,
        "head_count": n_head,
        "head_count_kv": n_head_kv,
        "rope_freq_base": 1000000.0 if arch != "llama" else 10000.0,
        "layer_norm_rms_eps": 1e-6,
        "file_type": 0,
    }
    for kv in vocab_kvs:
        value = kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value
        kvs[kv.key] = (kv.type, value, kv.sub_type)
    t = {
        "token_embd.weight": mat(n_vocab, n_embd) * 4,
        "output_norm.weight": vec(n_embd),
        "output.weight": mat(n_vocab, n_embd),
    }
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = vec(n_embd)
        t[p + "attn_q.weight"] = mat(n_embd, n_embd)
        t[p + "attn_k.weight"] = mat(n_head_kv * hd, n_embd)
        t[p + "attn_v.weight"] = mat(n_head_kv * hd, n_embd)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = vec(n_embd, 0.5, 0.0)
            t[p + "attn_k.bias"] = vec(n_head_kv * hd, 0.5, 0.0)
            t[p + "attn_v.bias"] = vec(n_head_kv * hd, 0.5, 0.0)
        if arch == "qwen3":
            t[p + "attn_q_norm.weight"] = vec(hd, 0.3)
            t[p + "attn_k_norm.weight"] = vec(hd, 0.3)
        t[p + "attn_output.weight"] = mat(n_embd, n_embd)
        t[p + "ffn_norm.weight"] = vec(n_embd)
        t[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_up.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_down.weight"] = mat(n_embd, n_ff)
    return write_gguf(path, arch, kvs, t)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_architectures_match_llama_cpp(arch, vocab_kvs, tmp_path):
    path = _write_model(tmp_path / f"{arch}.gguf", vocab_kvs, arch)
    tokens = _text_tokens(path, 300)
    ref = _llama_cpp_logits(path, tokens)
    ours = _ours(path, tokens)
    rms, agree = _rel(ours, ref), _agree(ours, ref)
    print(f"{arch}: relative RMS logit difference {rms:.2e}, argmax agreement {agree:.4f}")
    assert rms < 2e-3
    assert agree >= 0.99


def test_synthetic_llama_untied_gqa4(synthetic_f32):
    tokens = _text_tokens(synthetic_f32, 256)
    ref = _llama_cpp_logits(synthetic_f32, tokens)
    ours = _ours(synthetic_f32, tokens)
    assert _rel(ours, ref) < 2e-3
    assert _agree(ours, ref) >= 0.99


def test_unsupported_architecture_is_named(smollm2_path, tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", {"block_count": 1})
    with open_gguf(path) as g, pytest.raises(EvalError, match=r"'phi3'.*supported: llama, qwen2, qwen3"):
        LlamaModel(g)


# -- activation rounding vs libggml ----------------------------------------------------------------
def test_q8_0_rounding_is_libggmls():
    from tests.helpers.libggml import ggml_dequantize, ggml_quantize

    x = (np.random.default_rng(1).standard_normal((64, 512)) * 3).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    ref = ggml_dequantize(ggml_quantize(x, T.Q8_0), T.Q8_0, x.shape)
    for wtype in (T.Q8_0, T.Q5_0, T.Q4_0, T.Q4_1, T.IQ4_NL):
        np.testing.assert_array_equal(round_activations(x, wtype), ref)


def test_q8_k_rounding_is_libggmls():
    from tests.helpers.libggml import libggml

    x = (np.random.default_rng(2).standard_normal((16, 512)) * 3).astype(np.float32)
    x[0, :256] = 0
    x[1, 7] = -40.0  # largest magnitude negative
    blck, tsize = GGML_QUANT_SIZES[T.Q8_K]
    raw = np.zeros(x.size // blck * tsize, np.uint8)
    fn = libggml().quantize_row_q8_K_ref
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    fn(x.ctypes.data, raw.ctypes.data, x.size)
    # block_q8_K: float d, int8 qs[256], int16 bsums[16] (libggml has no to_float for it); value = d * q
    blocks = raw.reshape(-1, tsize)
    d = blocks[:, :4].copy().view(np.float32)
    q = blocks[:, 4 : 4 + blck].view(np.int8).astype(np.float32)
    ref = (d * q).reshape(x.shape)
    for wtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):
        np.testing.assert_array_equal(round_activations(x, wtype), ref)


def test_f16_rounding_and_f32_passthrough():
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(round_activations(x, T.F16), x.astype(np.float16).astype(np.float32))
    assert round_activations(x, T.F32) is x


# -- numba F16 kernels vs numpy's astype -----------------------------------------------------------
def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)


def _astype_round(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16).astype(np.float32)


def _boundary_floats() -> np.ndarray:
    """float32 values at and next to every F16 rounding decision: each finite half, each midpoint between
    neighbouring halves (ties to even, in the normal and the subnormal range, and the 65504/65520
    overflow midpoint), one float32 ulp either side of both; float32 values far below the smallest
    subnormal half (2^-25 is the tie to 0), past the F16 range, inf, NaNs with assorted payloads and signs;
    and a seeded sweep of 2^21 random bit patterns."""
    h = np.arange(0x7C00, dtype=np.uint16)  # every finite non-negative half, 0 .. 65504
    lo = h.view(np.float16).astype(np.float64)
    hi = np.append(lo[1:], 65536.0)  # next half up; past 65504 the tie point is 65520
    mid = ((lo + hi) / 2).astype(np.float32)  # exact: a midpoint needs 12 significant bits
    pts = np.concatenate([lo.astype(np.float32), mid])
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(0))])
    extra = np.array(
        [2.0**-25, 3 * 2.0**-25, 2.0**-26, 1e-30, 1e-45, 65519.996, 65520.0, 65536.0, 1e5, 3.4e38, np.inf],
        np.float32,
    )
    nans = np.array([0x7F800001, 0x7F801FFF, 0x7F802000, 0x7FC00000, 0x7FFFFFFF, 0x7FA5A5A5], np.uint32)
    rng = np.random.default_rng(7)
    sweep = rng.integers(0, 2**32, 1 << 21, dtype=np.uint64).astype(np.uint32).view(np.float32)
    pos = np.concatenate([pts, extra, nans.view(np.float32)])
    return np.concatenate([pos, -pos, sweep])


def test_f16_kernels_are_numpys_astype_bit_for_bit():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_bits(f16_to_f32(halves)), _bits(ref))  # incl. NaN payloads, -0, subnormals
    np.testing.assert_array_equal(_bits(f16_to_f32(halves.view(np.float16))), _bits(ref))
    np.testing.assert_array_equal(_bits(f16_round(ref)), _bits(_astype_round(ref)))
    x = _boundary_floats()
    x = x[: x.size // 7 * 7]
    got = f16_round(x.reshape(-1, 7))  # any shape; contiguous rows of an odd length
    np.testing.assert_array_equal(_bits(got).ravel(), _bits(_astype_round(x)))
    assert f16_round(np.float32(1e-8) * np.ones((3, 5), np.float32)[:, ::2]).shape == (3, 3)  # strided in


def _logits_with_astype(path, tokens, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:  # the engine as it was before the kernels: numpy astype round trips
        m.setattr(engine_llama, "f16_round", _astype_round)
        m.setattr(engine_numerics, "f16_round", _astype_round)  # round_activations'
        m.setattr(engine_weights, "f16_to_f32", lambda h: h.view(np.float16).astype(np.float32))
        return _ours(path, tokens)


@pytest.mark.parametrize("which", ["f16", "q4_k_m"])
def test_engine_logits_bit_identical_with_the_kernels(which, smollm2_f16, request, monkeypatch):
    path = smollm2_f16 if which == "f16" else request.getfixturevalue("q4_k_m")
    tokens = _text_tokens(path, 96)
    np.testing.assert_array_equal(
        _bits(_ours(path, tokens)), _bits(_logits_with_astype(path, tokens, monkeypatch))
    )
