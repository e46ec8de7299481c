"""The fixtures are realistic: llama.cpp's own convert_hf_to_gguf.py takes every synthetic checkpoint, and
llama.cpp loads and runs what it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.checkpoints import synthetic_checkpoint
from tests.helpers.convert_oracle import reference_convert

TEXT = "The quick brown fox jumps over 12 lazy dogs.\nIt's 3.14159 — très bien!"

# every arch, every dtype at least once, sharded and unsharded, tied and untied, Llama 3's rope
CASES = [
    ("llama", "F16", {}),
    ("llama", "BF16", {"rope": "llama3", "tied": False}),
    ("mistral", "F32", {"tied": False}),
    ("qwen2", "BF16", {"shards": 2}),
    ("qwen3", "F16", {"shards": 3}),
    ("gemma3", "F32", {}),
    ("gemma3", "BF16", {"shards": 2}),
]

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def _id(case):
    arch, dtype, kw = case
    return "-".join([arch, dtype, *(f"{k}={v}" for k, v in kw.items())])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reference_converts_and_llama_cpp_runs(case):
    import llama_cpp

    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.gguf.reader import open_gguf

    arch, dtype, kw = case
    folder = synthetic_checkpoint(arch, dtype, **kw)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    shards = kw.get("shards", 1)
    assert len([f for f in files if f.endswith(".safetensors")]) == shards
    assert ("model.safetensors.index.json" in files) == (shards > 1)

    out = reference_convert(folder, "f16")
    with open_gguf(out) as m:
        assert m.architecture == GGUF_ARCH[arch]
        assert m.get("tokenizer.ggml.pre") == "smollm"  # the converter recognised SmolLM2's real tokenizer
        names = {t.name for t in m.tensors}
        assert ("output.weight" in names) == (not kw.get("tied", True))
        assert ("rope_freqs.weight" in names) == (kw.get("rope") == "llama3")
        if arch == "qwen2":
            assert "blk.0.attn_q.bias" in names
        if arch in ("qwen3", "gemma3"):
            assert "blk.0.attn_q_norm.weight" in names
        ours = load_tokenizer(m).encode(TEXT)

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
        assert ids == ours.tolist()
        llm.eval(ids[:8])
        logits = np.asarray(llm.scores[:8], dtype=np.float32)
        assert logits.shape == (8, 49152)
        assert np.isfinite(logits).all() and logits.std() > 0
    finally:
        llm.close()


def test_checkpoint_is_seeded_and_bf16_is_real_bfloat16():
    from safetensors import safe_open

    a = synthetic_checkpoint("qwen3", "BF16", seed=0)
    b = synthetic_checkpoint("qwen3", "F32", seed=0)
    c = synthetic_checkpoint("qwen3", "F32", seed=1)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    header_len = int.from_bytes((a / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((a / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    name = "model.layers.0.mlp.up_proj.weight"
    with (
        safe_open(b / "model.safetensors", "numpy") as f32,
        safe_open(c / "model.safetensors", "numpy") as other,
    ):
        w = f32.get_tensor(name)
        assert w.dtype == np.float32 and w.shape == (512, 256)
        assert not np.array_equal(w, other.get_tensor(name))
    # BF16 = the F32 weights rounded to bfloat16 (read back with torch, the way transformers reads it)
    import torch
    from safetensors.torch import load_file

    bf = load_file(a / "model.safetensors")[name]
    assert bf.dtype == torch.bfloat16
    np.testing.assert_array_equal(bf.float().numpy(), torch.from_numpy(w).to(torch.bfloat16).float().numpy())
