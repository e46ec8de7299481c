"""Seeded tiny Hugging Face checkpoints, made in the cache (never committed), for the convert/export tests.

    synthetic_checkpoint("qwen2", "BF16", shards=2) -> Path of a folder with config.json,
        generation_config.json, model*.safetensors (+ model.safetensors.index.json when sharded),
        tokenizer.json and tokenizer_config.json

config.json is shaped as the real configs of each family are (field names, model_type, architectures,
the family's usual values): LlamaForCausalLM (SmolLM2-like; rope="llama3" gives Llama 3.2's rope_scaling),
MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (q_norm/k_norm), Gemma3ForCausalLM
(gemma3_text). Widths are multiples of 64 (head_dim) and 256 (hidden, ffn), 2 layers.

The tokenizer is a real one, exported by ggufkit.conversion.export_vocab.tokenizer_files from a GGUF that
ships in a package: tokenizer="smollm2" (default) is SmolLM2's byte-level BPE (49152 tokens,
pre-tokenizer "smollm"; the reference converter recognises it by its hash of token ids, so it must be
token-for-token the real one): tokenizer.json + tokenizer_config.json. tokenizer="gemma3" is Gemma 3's
SentencePiece (262144 pieces): tokenizer.model + tokenizer.json + tokenizer_config.json, which sends the
converter down its SentencePiece path (the embeddings are then 262144 rows: ~134 MB at BF16).

Tensors are written with the `safetensors` package's numpy API. numpy has no bfloat16: BF16 tensors are
rounded to bfloat16 (nearest even, as torch does), saved as U16 bit patterns, and the header's dtype is then
rewritten to "BF16" (same bytes, same offsets) — the file is what torch's save_file would write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ggufkit.cache import cache_dir

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
DTYPES = ("F32", "F16", "BF16")
_VERSION = 1  # bump when the folders' contents change

HIDDEN, FFN, N_LAYER, HEAD_DIM, N_HEAD, N_KV = 256, 512, 2, 64, 4, 2


def tokenizer_from_gguf(gguf_path) -> dict[str, bytes]:
    """tokenizer.json / tokenizer.model + tokenizer_config.json exported from a GGUF's tokenizer metadata."""
    from ggufkit.conversion.export_vocab import tokenizer_files
    from ggufkit.gguf.reader import open_gguf

    with open_gguf(gguf_path) as m:
        return tokenizer_files(m)


# tokenizer -> (the known model whose GGUF carries it, vocabulary size, bos, eos, pad)
TOKENIZERS = {"smollm2": ("smollm2-135m", 49152, 1, 2, 2), "gemma3": ("gemma3-270m", 262144, 2, 1, 0)}


def _config(arch: str, dtype: str, rope: str | None, tied: bool, vocab: int, ids: tuple) -> dict:
    torch_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    common = {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": N_LAYER,
        "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_KV,
        "vocab_size": vocab,
        "bos_token_id": ids[0],
        "eos_token_id": ids[1],
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.57.6",
        "use_cache": True,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    if arch == "llama":
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-05,
            "rope_theta": 100000,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "head_dim": HEAD_DIM,
            "pad_token_id": ids[2],
        }
        if rope == "llama3":  # as Llama-3.2-1B's config.json
            cfg["rope_theta"] = 500000.0
            cfg["max_position_embeddings"] = 131072
            cfg["rope_scaling"] = {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            }
        return cfg
    if rope is not None:
        raise ValueError(f"rope={rope!r} is only for arch='llama'")
    if arch == "mistral":
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            **common,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "head_dim": HEAD_DIM,
        }
    if arch == "qwen2":  # as Qwen2.5-0.5B's
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **common,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "max_window_layers": N_LAYER,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "use_mrope": False,
        }
    if arch == "qwen3":  # as Qwen3-0.6B's
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            **common,
            "attention_bias": False,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": 40960,
            "max_window_layers": N_LAYER,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "use_sliding_window": False,
        }
    if arch == "gemma3":  # as gemma-3-270m's (Gemma3ForCausalLM, text only)
        if not tied:
            raise ValueError("Gemma 3 ties its output to the embeddings (tied=False is not a Gemma 3)")
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **common,
            "attention_bias": False,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "head_dim": HEAD_DIM,
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 32768,
            "query_pre_attn_scalar": HEAD_DIM,
            "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "sliding_window": 512,
            "use_bidirectional_attention": False,
            "pad_token_id": ids[2],
        }
    raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")


def _tensors(arch: str, tied: bool, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF names -> float32 arrays (HF layout: [out, in] for linear weights)."""
    f32 = np.float32
    gemma = arch == "gemma3"

    def linear(n_out, n_in):
        return (rng.standard_normal((n_out, n_in), dtype=f32) * f32(0.02)).astype(f32)

    def norm(n):
        # gemma stores weight - 1 (its norm multiplies by 1 + w); the others store w itself
        base = f32(0.0) if gemma else f32(1.0)
        return (base + rng.standard_normal(n, dtype=f32) * f32(0.1)).astype(f32)

    out = {"model.embed_tokens.weight": linear(vocab, HIDDEN)}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm(HIDDEN)
        out[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = norm(HIDDEN)
            out[p + "post_feedforward_layernorm.weight"] = norm(HIDDEN)
        out[p + "self_attn.q_proj.weight"] = linear(N_HEAD * HEAD_DIM, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = linear(N_KV * HEAD_DIM, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = linear(N_KV * HEAD_DIM, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = linear(HIDDEN, N_HEAD * HEAD_DIM)
        if arch == "qwen2":
            for x, n in (("q", N_HEAD), ("k", N_KV), ("v", N_KV)):
                out[p + f"self_attn.{x}_proj.bias"] = (
                    rng.standard_normal(n * HEAD_DIM, dtype=f32) * f32(0.1)
                ).astype(f32)
        if arch in ("qwen3", "gemma3"):
            out[p + "self_attn.q_norm.weight"] = norm(HEAD_DIM)
            out[p + "self_attn.k_norm.weight"] = norm(HEAD_DIM)
        out[p + "mlp.gate_proj.weight"] = linear(FFN, HIDDEN)
        out[p + "mlp.up_proj.weight"] = linear(FFN, HIDDEN)
        out[p + "mlp.down_proj.weight"] = linear(HIDDEN, FFN)
    out["model.norm.weight"] = norm(HIDDEN)
    if not tied:
        out["lm_head.weight"] = linear(vocab, HIDDEN)
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN kept quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _save(tensors: dict[str, np.ndarray], dtype: str, path: Path) -> int:
    """Write one safetensors file; returns the bytes of tensor data."""
    from safetensors.numpy import save

    if dtype == "F32":
        arrays = {k: v.astype(np.float32) for k, v in tensors.items()}
    elif dtype == "F16":
        arrays = {k: v.astype(np.float16) for k, v in tensors.items()}
    else:
        arrays = {k: to_bf16_bits(v) for k, v in tensors.items()}
    data = save(arrays, metadata={"format": "pt"})
    if dtype == "BF16":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        for k, v in header.items():
            if k != "__metadata__":
                assert v["dtype"] == "U16", v
                v["dtype"] = "BF16"
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # safetensors pads its header to 8 bytes with spaces
        data = len(raw).to_bytes(8, "little") + raw + data[8 + n :]
    path.write_bytes(data)
    return sum(a.nbytes for a in arrays.values())


def _generation_config(arch: str, ids: tuple) -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": ids[0],
        "eos_token_id": ids[1],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "transformers_version": "4.57.6",
        **({"pad_token_id": ids[2], "top_k": 64} if arch == "gemma3" else {}),
    }


def synthetic_checkpoint(
    arch: str,
    dtype: str,
    *,
    shards: int = 1,
    seed: int = 0,
    rope: str | None = None,
    tied: bool = True,
    name: str | None = None,
    tokenizer: str = "smollm2",
) -> Path:
    """A seeded tiny HF checkpoint folder in the cache (made once per argument set); see the module doc.

    The folder's name (which the reference converter turns into general.name/basename/size_label) is
    `name`, else "<Arch>-Tiny-<dtype>"."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {DTYPES}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {tuple(TOKENIZERS)}")
    name = name or f"{arch.capitalize()}-Tiny-{dtype}"
    key = json.dumps([_VERSION, arch, dtype, shards, seed, rope, tied, name, tokenizer])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    parent = cache_dir("checkpoints", digest)
    folder = parent / name
    if (folder / "config.json").exists():
        return folder

    from ggufkit.models import model_path

    source, vocab, *ids = TOKENIZERS[tokenizer]
    tok_files = tokenizer_from_gguf(model_path(source))
    cfg = _config(arch, dtype, rope, tied, vocab, tuple(ids))
    tensors = _tensors(arch, tied, vocab, np.random.default_rng(seed))

    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".build-"))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(_generation_config(arch, tuple(ids)), indent=2) + "\n"
        )
        for fname, data in tok_files.items():
            (tmp / fname).write_bytes(data)
        names = list(tensors)  # HF order: embeddings, layer by layer, final norm, lm_head
        if shards == 1:
            _save(tensors, dtype, tmp / "model.safetensors")
        else:
            parts = np.array_split(np.arange(len(names)), shards)
            weight_map, total = {}, 0
            for k, idx in enumerate(parts, 1):
                fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
                part = {names[i]: tensors[names[i]] for i in idx}
                total += _save(part, dtype, tmp / fname)
                weight_map.update({n: fname for n in part})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            if not (folder / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
