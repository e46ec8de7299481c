"""A GGUF back to a Hugging Face folder: the inverse of convert_hf_to_gguf.py, for the architectures it reads.

    export(gguf_path, hf_dir, dtype=None) -> ExportSummary

What is written, and which of the converter's steps it undoes:
- model.safetensors, streamed one tensor at a time: each tensor dequantized to float32 (ggufkit.quants),
  renamed to its HF name and put back in HF layout — numpy shape = ggml shape reversed; llama's q/k rows
  de-interleaved (the converter's `permute` sends row a*d/2+b of each head to row 2b+a; `_unpermute`
  sends it back); gemma3's RMS-norm weights minus 1 (the converter adds 1); rope_freqs.weight dropped (the
  converter generates it from config.json's rope_scaling, which is written instead). Matrices are then cast
  to `dtype` (round to nearest even); vectors (norms, biases) stay float32, as llama.cpp stores them at
  every level, so nothing is lost on them. dtype None = the GGUF's own matrix type when that is
  F32/F16/BF16, else f32.
- config.json from the <arch>.* keys, generation_config.json from the token ids and general.sampling.*.
- the tokenizer files (export_vocab.py).

The way back is exact: export then convert_hf_to_gguf.py at the GGUF's own type gives every tensor's bytes
again. gemma3's norms are where this needs care: the GGUF holds v = fl32(1 + w), and export writes
w' = fl32(v - 1), for which fl32(1 + w') == v whenever v was made that way (`norm_minus_one`); w' is w
itself only when the "+ 1" lost none of w's low bits, so the exported HF norms equal the checkpoint's up
to that rounding, while the GGUF comes back bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache import atomic_output, atomic_write
from ..errors import GgufkitError
from ..gguf.reader import GGUFModel, open_gguf
from .export_vocab import tokenizer_files

__all__ = ["DTYPES", "ExportError", "ExportSummary", "export", "tokenizer_files"]

log = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
DTYPES = ("f32", "f16", "bf16")
_TRANSFORMERS_VERSION = "4.57.6"  # the version the test extra pins; written as HF writes it


class ExportError(GgufkitError):
    """A GGUF cannot be exported to a Hugging Face folder (architecture, tokenizer, output folder)."""


@dataclass
class ExportSummary:
    path: Path
    architecture: str
    dtype: str
    n_tensors: int
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ names

# GGUF block tensor -> HF module under model.layers.N (the converter's tensor map, read backwards)
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_GEMMA3 = {
    **_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(arch: str, name: str) -> str | None:
    """The HF name of GGUF tensor `name`; None for tensors the converter generates (rope_freqs)."""
    if name == "rope_freqs.weight":
        return None
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP and suffix in ("weight", "bias"):
        return f"{_TOP[stem]}.{suffix}"
    m = _BLK.fullmatch(name)
    table = _BLOCK_GEMMA3 if arch == "gemma3" else _BLOCK
    if m and m.group(2) in table:
        return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    raise ExportError(f"tensor {name!r} has no Hugging Face name for architecture {arch}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's llama q/k permutation (rows of each head: a*d/2+b -> 2b+a)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ hparams


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that reads back to the same float32 (1e-05, not
    9.999999747378752e-06): what config.json held before conversion."""
    return float(str(np.float32(x)))


def _llama3_factors(base: float, dim: int, factor: float, lo: float, hi: float, old: int) -> np.ndarray:
    """rope_freqs as convert_hf_to_gguf.py computes them with torch float32 (see the convert spec §2.4:
    torch's `scalar / tensor` is reciprocal(tensor) * scalar)."""
    f32 = np.float32
    freqs = f32(1) / np.power(f32(base), np.arange(0, dim, 2, dtype=f32) / f32(dim))
    out = []
    for freq in freqs:
        wavelen = (f32(1) / freq) * f32(2 * math.pi)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = ((f32(1) / wavelen) * f32(old) - f32(lo)) / f32(hi - lo)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.asarray(out, dtype=np.float32)


def _llama3_rope_scaling(m: GGUFModel, base: float, dim: int) -> dict:
    """Llama 3's rope_scaling from rope_freqs.weight: the factor is its largest value; low/high frequency
    factors and the original context are Llama 3's (1, 4, 8192), checked by regenerating the tensor."""
    from ..quants import dequantize

    t = m.tensor("rope_freqs.weight")
    freqs = dequantize(t.data(), t.ggml_type, tuple(reversed(t.shape))).reshape(-1)
    factor = float(freqs.max())
    scaling = {
        "factor": factor,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    if not np.array_equal(_llama3_factors(base, dim, factor, 1.0, 4.0, 8192), freqs):
        raise ExportError(
            f"{m.path}: rope_freqs.weight is not Llama 3's rope scaling with factor {factor} "
            "(low/high frequency factors 1/4, original context 8192); it cannot be written as rope_scaling"
        )
    return scaling


def hf_config(m: GGUFModel, *, torch_dtype: str) -> dict:
    """config.json for `m` (llama, qwen2, qwen3, gemma3), from its GGUF hyperparameters."""
    arch = m.architecture

    def get(key, default=None):
        v = m.get(f"{arch}.{key}", default)
        if v is None:
            raise ExportError(f"{m.path}: no {arch}.{key} in the metadata")
        return v

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(m.get(f"{arch}.attention.key_length") or n_embd // n_head)
    names = {t.name for t in m.tensors}
    n_vocab = len(m.get("tokenizer.ggml.tokens") or []) or int(get("vocab_size"))
    cfg = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
                "gemma3": "Gemma3ForCausalLM",
            }[arch]
        ],  # fmt: skip
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "hidden_size": n_embd,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "vocab_size": n_vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": torch_dtype,
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    for typ, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        tid = m.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            cfg[f"{typ}_token_id"] = int(tid)
    scaling = None
    if m.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    elif m.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ExportError(f"{m.path}: rope scaling {m.get(f'{arch}.rope.scaling.type')!r} is not supported")
    if "rope_freqs.weight" in names:
        scaling = _llama3_rope_scaling(m, cfg["rope_theta"], head_dim)
    if arch == "llama":
        cfg.update(hidden_act="silu", attention_bias=False, mlp_bias=False, pretraining_tp=1)
        cfg["rope_scaling"] = scaling
    elif arch == "qwen2":
        del cfg["head_dim"]  # Qwen2's config has none: head_dim = hidden_size / heads
        cfg.update(hidden_act="silu", use_sliding_window=False, sliding_window=None, max_window_layers=0)
        cfg["rope_scaling"] = scaling
    elif arch == "qwen3":
        cfg.update(hidden_act="silu", attention_bias=False, use_sliding_window=False, sliding_window=None)
        cfg["rope_scaling"] = scaling
    else:  # gemma3: llama.cpp makes every 6th layer global (set_swa_pattern(6)), as Gemma 3's configs do
        n_layer = cfg["num_hidden_layers"]
        softcap = m.get("gemma3.final_logit_softcapping")
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=False,
            attn_logit_softcapping=None,
            final_logit_softcapping=None if softcap is None else _f32(softcap),
            # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for the 62-layer 27B)
            query_pre_attn_scalar=n_embd // n_head if n_layer == 62 else head_dim,
            sliding_window=int(get("attention.sliding_window", 512)),
            layer_types=[
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)
            ],
            rope_local_base_freq=_f32(get("rope.freq_base_swa", 10000.0)),
            rope_scaling=scaling,
        )
    return cfg


def generation_config(m: GGUFModel) -> dict:
    out: dict = {"_from_model_config": True}
    for typ, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        tid = m.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            out[f"{typ}_token_id"] = int(tid)
    for key, hf in (("temp", "temperature"), ("top_p", "top_p"), ("min_p", "min_p"), ("penalty_repeat",
                    "repetition_penalty")):  # fmt: skip
        v = m.get(f"general.sampling.{key}")
        if v is not None:
            out[hf] = _f32(v)
    if m.get("general.sampling.top_k") is not None:
        out["top_k"] = int(m.get("general.sampling.top_k"))
    if any(k in out for k in ("temperature", "top_p", "top_k", "min_p")):
        out["do_sample"] = True
    out["transformers_version"] = _TRANSFORMERS_VERSION
    return out


# ------------------------------------------------------------------------------------------------ tensors


def _cast(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """float32 -> the bytes of safetensors dtype F32 / F16 / BF16 (round to nearest even; NaN stays NaN)."""
    if st_dtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if st_dtype == "F16":
        return x.astype(np.float16)
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return bits


def norm_minus_one(v: np.ndarray) -> np.ndarray:
    """The inverse of the converter's gemma "+ 1" on float32: w' = fl32(v - 1) has fl32(w' + 1) == v for
    every v = fl32(w + 1) (for v in [0.5, 2^24] v - 1 is exact, Sterbenz; below 0.5, v came from an exact
    sum and is a multiple of 2^-24, so v - 1 is exact too; above, both sums stay on the same grid)."""
    return np.ascontiguousarray(v, dtype=np.float32) - np.float32(1)


class _Tensor:
    """One HF tensor to write: where it comes from, how it is transformed, its safetensors dtype and shape."""

    def __init__(self, m: GGUFModel, info, name: str, st_dtype: str, n_head: int, n_kv: int):
        self.m, self.info, self.name, self.st_dtype = m, info, name, st_dtype
        self.shape = tuple(reversed(info.shape))
        arch = m.architecture
        self.permute_heads = None
        if arch == "llama" and info.name.split(".")[-2] in ("attn_q", "attn_k"):
            self.permute_heads = n_head if info.name.split(".")[-2] == "attn_q" else n_kv
        self.minus_one = arch == "gemma3" and name.endswith("norm.weight")
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * (4 if st_dtype == "F32" else 2)

    def array(self) -> np.ndarray:
        from ..quants import dequantize

        x = dequantize(self.info.data(), self.info.ggml_type, self.shape)
        if self.permute_heads:
            x = _unpermute(x, self.permute_heads)
        if self.minus_one:
            x = norm_minus_one(x)
        return _cast(x, self.st_dtype)


def _plan(m: GGUFModel, dtype: str) -> list[_Tensor]:
    arch = m.architecture
    n_head = int(m.get(f"{arch}.attention.head_count"))
    n_kv = int(m.get(f"{arch}.attention.head_count_kv", n_head))
    out = []
    for info in m.tensors:
        name = hf_name(arch, info.name)
        if name is None:
            continue
        st = dtype.upper() if len(info.shape) >= 2 else "F32"  # safetensors' names: F32, F16, BF16
        out.append(_Tensor(m, info, name, st, n_head, n_kv))
    if arch == "qwen2":  # HF's Qwen2 always has q/k/v biases; a GGUF without them means zeros
        have = {t.name for t in out}
        for i in range(int(m.get("qwen2.block_count"))):
            for x, heads in (("q", n_head), ("k", n_kv), ("v", n_kv)):
                name = f"model.layers.{i}.self_attn.{x}_proj.bias"
                if name not in have:
                    out.append(_Zeros(name, (heads * int(m.get("qwen2.embedding_length")) // n_head,)))
    return sorted(out, key=lambda t: t.name)


class _Zeros:
    st_dtype = "F32"

    def __init__(self, name, shape):
        self.name, self.shape = name, shape
        self.nbytes = 4 * int(np.prod(shape))

    def array(self):
        return np.zeros(self.shape, np.float32)


def _write_safetensors(path: Path, tensors: list) -> None:
    """A safetensors file, streamed: the header (every shape, dtype and offset is known in advance), then
    each tensor's bytes as it is made; the header is padded to 8 bytes with spaces, as safetensors does."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.st_dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with atomic_output(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            data = t.array()
            assert data.nbytes == t.nbytes, (t.name, data.nbytes, t.nbytes)
            f.write(memoryview(np.ascontiguousarray(data)).cast("B"))


# ------------------------------------------------------------------------------------------------ driver


def _default_dtype(m: GGUFModel) -> str:
    kinds = {t.ggml_type.name for t in m.tensors if len(t.shape) >= 2}
    return {frozenset({"F16"}): "f16", frozenset({"BF16"}): "bf16"}.get(frozenset(kinds), "f32")


def export(gguf_path, hf_dir, *, dtype: str | None = None, overwrite: bool = False) -> ExportSummary:
    """Write the Hugging Face folder `hf_dir` for the GGUF `gguf_path` (see the module doc).

    dtype: "f32" | "f16" | "bf16" for the matrices, None = the GGUF's own when it is one of them, else f32.
    An existing non-empty `hf_dir` is refused unless overwrite=True."""
    if dtype is not None and dtype.lower() not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and not hf_dir.is_dir():
        raise ExportError(f"{hf_dir} exists and is not a folder")
    if hf_dir.is_dir() and any(hf_dir.iterdir()) and not overwrite:
        raise ExportError(f"{hf_dir} is not empty (pass overwrite=True, or --force, to write into it)")
    with open_gguf(gguf_path) as m:
        arch = m.architecture
        if arch not in ARCHS:
            raise ExportError(
                f"{gguf_path}: architecture {arch!r} cannot be exported (supported: {', '.join(ARCHS)})"
            )
        dtype = dtype.lower() if dtype else _default_dtype(m)
        torch_dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
        config = hf_config(m, torch_dtype=torch_dtype)
        files = {
            "config.json": json.dumps(config, indent=2) + "\n",
            "generation_config.json": json.dumps(generation_config(m), indent=2) + "\n",
        }
        tok = tokenizer_files(m)
        tensors = _plan(m, dtype)
        hf_dir.mkdir(parents=True, exist_ok=True)
        for stale in (*hf_dir.glob("model*.safetensors"), hf_dir / "model.safetensors.index.json"):
            stale.unlink(missing_ok=True)  # (overwrite=True) a left-over shard would join the checkpoint
        _write_safetensors(hf_dir / "model.safetensors", tensors)
        for name, text in files.items():
            atomic_write(hf_dir / name, text.encode())
        for name, data in tok.items():
            atomic_write(hf_dir / name, data)
        log.info("exported %s to %s (%d tensors, %s)", gguf_path, hf_dir, len(tensors), dtype)
    return ExportSummary(hf_dir, arch, dtype, len(tensors), sorted(["model.safetensors", *files, *tok]))
