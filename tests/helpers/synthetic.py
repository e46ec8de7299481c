"""Seeded synthetic llama-family GGUFs whose rows are multiples of 256, so K-quants run on every tensor.

SmolLM2-135M's 576-wide rows make most K-quant tensors fall back; these models exercise the real K-quant
mixes. The tokenizer metadata is copied from SmolLM2 so llama.cpp can load and run the model. Weights are
gaussian with a few outlier columns (and Student-t for ffn_down), the shapes real checkpoints show.
Written with gguf-py's GGUFWriter through tests.helpers.gguf_build (an independent writer, not ggufkit's).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np

from ggufkit.cache import cache_dir

from .gguf_build import write_gguf


def tokenizer_kvs(vocab_source, *, extra: dict[str, list] | None = None) -> dict[str, tuple]:
    """The tokenizer.* metadata of `vocab_source` as write_gguf's typed KVs; `extra` maps an array key to
    values appended to it (e.g. made-up tokens for a larger vocabulary)."""
    extra = extra or {}
    reader = gguf.GGUFReader(str(vocab_source))
    kvs = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                vals = [field.parts[i][0].item() for i in field.data]
            kvs[key] = (vtype, vals + extra.get(key, []), sub)
        elif vtype == gguf.GGUFValueType.STRING:
            kvs[key] = (vtype, bytes(field.parts[-1]).decode("utf-8"))
        else:
            kvs[key] = (vtype, field.parts[-1][0].item())
    return kvs


def make_synthetic_llama(
    path: str | os.PathLike,
    *,
    vocab_source: str | os.PathLike,
    seed: int = 0,
    n_embd: int = 256,
    n_layer: int = 4,
    n_head: int = 8,
    n_head_kv: int = 2,
    n_ff: int = 768,
    tied: bool = False,
    dtype: str = "F32",
    n_ctx_train: int = 8192,
    n_expert: int = 0,
) -> Path:
    """Write a seeded synthetic llama GGUF at `path` (dtype F32 or F16 for the 2-D weights). n_expert > 0:
    a Mixtral-style mixture of experts (3-D ffn_{gate,up,down}_exps, two experts used per token)."""
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    n_vocab = len(gguf.GGUFReader(str(vocab_source)).fields["tokenizer.ggml.tokens"].data)
    wdtype = {"F32": np.float32, "F16": np.float16}[dtype]

    def weight(rows: int, cols: int, *, heavy: bool = False) -> np.ndarray:
        # numpy shape (rows, cols) = ggml ne = [cols, rows]: cols is the row length
        w = rng.standard_t(5, size=(rows, cols)) if heavy else rng.standard_normal((rows, cols))
        w = (w * (0.5 / np.sqrt(cols))).astype(np.float32)
        outliers = rng.choice(cols, size=max(1, cols // 128), replace=False)
        w[:, outliers] *= np.float32(8.0)
        return w.astype(wdtype)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    kvs = {
        "name": f"synthetic-llama-{n_embd}x{n_layer}-seed{seed}",
        "context_length": n_ctx_train,
        "embedding_length": n_embd,
        "block_count": n_layer,
        "feed_forward_length": n_ff,
        "head_count": n_head,
        "head_count_kv": n_head_kv,
        "rope_dimension_count": head_dim,
        "rope_freq_base": 10000.0,
        "layer_norm_rms_eps": 1e-5,
        "file_type": {"F32": 0, "F16": 1}[dtype],
        "vocab_size": n_vocab,
    }
    if n_expert:
        kvs |= {"expert_count": n_expert, "expert_used_count": 2}
    kvs |= tokenizer_kvs(vocab_source)

    t = {"token_embd.weight": weight(n_vocab, n_embd), "output_norm.weight": norm(n_embd)}
    if not tied:
        t["output.weight"] = weight(n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(n_embd)
        t[p + "attn_q.weight"] = weight(n_embd, n_embd)
        t[p + "attn_k.weight"] = weight(n_head_kv * head_dim, n_embd)
        t[p + "attn_v.weight"] = weight(n_head_kv * head_dim, n_embd)
        t[p + "attn_output.weight"] = weight(n_embd, n_embd)
        t[p + "ffn_norm.weight"] = norm(n_embd)
        if n_expert:  # numpy (expert, rows, cols) = ggml ne [cols, rows, expert]
            t[p + "ffn_gate_inp.weight"] = weight(n_expert, n_embd).astype(np.float32)
            t[p + "ffn_gate_exps.weight"] = np.stack([weight(n_ff, n_embd) for _ in range(n_expert)])
            t[p + "ffn_up_exps.weight"] = np.stack([weight(n_ff, n_embd) for _ in range(n_expert)])
            t[p + "ffn_down_exps.weight"] = np.stack(
                [weight(n_embd, n_ff, heavy=True) for _ in range(n_expert)]
            )
            continue
        t[p + "ffn_gate.weight"] = weight(n_ff, n_embd)
        t[p + "ffn_up.weight"] = weight(n_ff, n_embd)
        t[p + "ffn_down.weight"] = weight(n_embd, n_ff, heavy=True)
    return write_gguf(path, "llama", kvs, t)


def synthetic_llama(vocab_source: str | os.PathLike, **params) -> Path:
    """The cached synthetic model for these parameters (made once per parameter set)."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir("synthetic") / f"synthetic-llama-{key}.gguf"
    if not target.exists():
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        make_synthetic_llama(tmp, vocab_source=vocab_source, **params)
        os.replace(tmp, target)
    return target
