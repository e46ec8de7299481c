"""llama.cpp's own memory use, measured (for tests/test_memory.py and benchmarks/bench_memory.py): the peak
resident set of a llama-bench run, the buffer sizes llama.cpp logs, and the small synthetic models those
measurements run on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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
    from .llama_programs import tool

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


def _extra_piece(i: int) -> str:
    """A short made-up token text (8 bytes at most, like real BPE pieces), unique per i."""
    digits = ""
    while True:
        i, r = divmod(i, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if i == 0:
            return "\u0120\u01c2" + digits


def _tokenizer_kvs(vocab_source, extra_tokens: int, extra_merges: int) -> dict[str, tuple]:
    """The tokenizer.* metadata of `vocab_source` plus `extra_tokens` made-up normal tokens and
    `extra_merges` made-up merges (a larger vocabulary, as Llama 3's 128k or Gemma's 256k)."""
    from .synthetic import tokenizer_kvs

    extra = {
        "tokenizer.ggml.tokens": [_extra_piece(i) for i in range(extra_tokens)],
        "tokenizer.ggml.merges": [f"\u0120\u01c2 {_extra_piece(i)[2:]}" for i in range(extra_merges)],
        "tokenizer.ggml.token_type": [1] * extra_tokens,
    }
    return tokenizer_kvs(vocab_source, extra=extra)


def make_small_model(
    path, vocab_source, *, arch: str = "gemma2", extra_tokens: int = 0, extra_merges: int = 0
) -> Path:
    """A small seeded F16 model (4 layers, 256 wide, 4 heads and 2 KV heads of 64, tied embeddings) with
    `vocab_source`'s vocabulary (plus `extra_tokens`). arch "gemma2": a sliding window of 256 on every
    other layer, the sliding-window KV cache path; arch "llama": plain."""
    import numpy as np

    from .gguf_build import write_gguf

    rng = np.random.default_rng(0)
    d, n_layer, n_head, n_kv, hd, n_ff = 256, 4, 4, 2, 64, 512
    kvs = {
        "context_length": 8192,
        "embedding_length": d,
        "block_count": n_layer,
        "feed_forward_length": n_ff,
        "head_count": n_head,
        "head_count_kv": n_kv,
        "key_length": hd,
        "value_length": hd,
        "rope_dimension_count": hd,
        "layer_norm_rms_eps": 1e-6,
        "file_type": 1,
    }
    if arch == "gemma2":
        kvs["sliding_window"] = 256
    kvs |= _tokenizer_kvs(vocab_source, extra_tokens, extra_merges)
    n_vocab = len(kvs["tokenizer.ggml.tokens"][1])

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * (0.5 / np.sqrt(cols))).astype(np.float16)

    def vec(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    tensors = {"token_embd.weight": mat(n_vocab, d), "output_norm.weight": vec(d)}
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
            tensors[p + name + ".weight"] = t
    return write_gguf(path, arch, kvs, tensors)
