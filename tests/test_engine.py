"""The built-in numpy engine against llama.cpp's logits (llama-cpp-python, computed in the test).

- SmolLM2-135M F16 (llama arch, tied output, GQA 3): logits close to llama.cpp's, argmax equal on >= 99.5 %
  of positions.
- Seeded synthetic models (F32 weights, SmolLM2's vocabulary) for the other code paths: llama with an
  untied output and GQA 4; qwen2 (q/k/v biases, NeoX rope); qwen3 (per-head q/k RMS norm, NeoX rope).
- The activation rounding that emulates llama.cpp's CPU matmuls, against libggml's own quantizers.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ggufkit.engine.llama import LlamaModel, ModelArgs, round_activations
from ggufkit.engine.tokenizer import load_tokenizer
from ggufkit.errors import EvalError
from ggufkit.evaluate import default_text
from ggufkit.gguf_file import open_gguf


def _llama_cpp_logits(path, tokens: np.ndarray) -> np.ndarray:
    import llama_cpp

    n = len(tokens)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n,
        n_batch=n,
        n_ubatch=n,
        logits_all=True,
        n_threads=2,
        flash_attn=True,
        verbose=False,
    )
    llm.reset()
    llm.eval([int(t) for t in tokens])
    out = np.array(llm.scores[:n], dtype=np.float32)
    llm.close()
    return out


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


def test_smollm2_f16_matches_llama_cpp(smollm2_f16):
    tokens = _text_tokens(smollm2_f16, 512)
    ref = _llama_cpp_logits(smollm2_f16, tokens)
    ours = _ours(smollm2_f16, tokens)
    rms = np.sqrt(np.mean((ours - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    agree = np.mean(ours.argmax(axis=1) == ref.argmax(axis=1))
    print(f"relative RMS logit difference {rms:.2e}, argmax agreement {agree:.4f}")
    assert rms < 2e-3
    assert agree >= 0.995


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

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(1000000.0 if arch != "llama" else 10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    for kv in vocab_kvs:
        value = kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value
        w.add_key_value(kv.key, value, kv.type, sub_type=kv.sub_type)
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd) * 4)
    w.add_tensor("output_norm.weight", vec(n_embd))
    w.add_tensor("output.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", vec(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * hd, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * hd, n_embd))
        if arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", vec(n_embd, 0.5, 0.0))
            w.add_tensor(p + "attn_k.bias", vec(n_head_kv * hd, 0.5, 0.0))
            w.add_tensor(p + "attn_v.bias", vec(n_head_kv * hd, 0.5, 0.0))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", vec(hd, 0.3))
            w.add_tensor(p + "attn_k_norm.weight", vec(hd, 0.3))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", vec(n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_architectures_match_llama_cpp(arch, vocab_kvs, tmp_path):
    path = _write_model(tmp_path / f"{arch}.gguf", vocab_kvs, arch)
    tokens = _text_tokens(path, 300)
    ref = _llama_cpp_logits(path, tokens)
    ours = _ours(path, tokens)
    rms = np.sqrt(np.mean((ours - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    agree = np.mean(ours.argmax(axis=1) == ref.argmax(axis=1))
    print(f"{arch}: relative RMS logit difference {rms:.2e}, argmax agreement {agree:.4f}")
    assert rms < 2e-3
    assert agree >= 0.99


def test_synthetic_llama_untied_gqa4(synthetic_f32):
    tokens = _text_tokens(synthetic_f32, 256)
    ref = _llama_cpp_logits(synthetic_f32, tokens)
    ours = _ours(synthetic_f32, tokens)
    rms = np.sqrt(np.mean((ours - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    assert rms < 2e-3
    assert np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)) >= 0.99


def test_unsupported_architecture_is_named(smollm2_path, tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_gguf(path) as g, pytest.raises(EvalError, match=r"'phi3'.*supported: llama, qwen2, qwen3"):
        LlamaModel(g)


# -- activation rounding vs libggml ----------------------------------------------------------------
def test_q8_0_rounding_is_libggmls():
    from oracle import ggml_dequantize, ggml_quantize

    x = (np.random.default_rng(1).standard_normal((64, 512)) * 3).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    ref = ggml_dequantize(ggml_quantize(x, T.Q8_0), T.Q8_0, x.shape)
    for wtype in (T.Q8_0, T.Q5_0, T.Q4_0, T.Q4_1, T.IQ4_NL):
        np.testing.assert_array_equal(round_activations(x, wtype), ref)


def test_q8_k_rounding_is_libggmls():
    from oracle import libggml

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
