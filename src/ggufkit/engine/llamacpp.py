"""llama.cpp itself as an engine (through llama-cpp-python, the optional `llama` extra).

Gives the logits of the scored positions of each chunk exactly as llama-perplexity asks for them: a fresh
KV cache per chunk, one batch of ctx tokens with logits requested only from position `first` on. Also
times prompt processing and a short greedy generation for tokens/s.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import EvalError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EvalError("--engine llama.cpp needs llama-cpp-python (pip install 'ggufkit[llama]')") from None
    return llama_cpp


class LlamaCppRunner:
    def __init__(self, path, *, ctx: int, threads: int | None = None, gen_tokens: int = 32):
        lc = _llama_cpp()
        from .numerics import cpu_count

        self._lc = lc
        n = threads or cpu_count()
        try:
            self.llm = lc.Llama(
                model_path=str(path),
                n_ctx=ctx,
                n_batch=ctx,
                n_ubatch=ctx,
                n_threads=n,
                n_threads_batch=n,
                logits_all=False,
                flash_attn=True,
                verbose=False,
            )
        except ValueError as e:
            raise EvalError(f"{path}: llama.cpp cannot load the model: {e}") from None
        self.ctx = ctx
        self.n_vocab = self.llm.n_vocab()
        self.batch = lc.llama_batch_init(ctx, 0, 1)
        self.gen_tokens = gen_tokens
        self.pp_tokens = 0
        self.pp_seconds = 0.0
        self._last_chunk = None

    def _decode(self, tokens, first: int) -> int:
        lc, b = self._lc, self.batch
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        n, first = len(tokens), int(first)
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = int(t)
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = int(i >= first)
        rc = lc.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise EvalError(f"llama_decode failed with {rc}")
        return n - first

    def chunk_logits(self, tokens: np.ndarray, *, first: int) -> np.ndarray:
        """Logits [len - first, n_vocab] of positions first.. of one chunk (its own sequence)."""
        t0 = time.perf_counter()
        n_out = self._decode(tokens, first)
        ptr = self._lc.llama_get_logits(self.llm.ctx)
        out = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()
        self.pp_seconds += time.perf_counter() - t0
        self.pp_tokens += len(tokens)
        self._last_chunk = tokens
        return out

    def generation_speed(self) -> float:
        """tokens/s of greedy one-token decode steps after a short prompt (llama-bench's tg)."""
        lc, b = self._lc, self.batch
        prompt = list(self._last_chunk[:16]) if self._last_chunk is not None else [0] * 16
        self._decode(prompt, len(prompt) - 1)
        tok = int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits(self.llm.ctx), shape=(self.n_vocab,))))
        t0 = time.perf_counter()
        for i in range(self.gen_tokens):
            b.n_tokens = 1
            b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = tok, len(prompt) + i, 1, True
            b.seq_id[0][0] = 0
            if lc.llama_decode(self.llm.ctx, b) != 0:
                raise EvalError("llama_decode failed during generation")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(self.llm.ctx), shape=(self.n_vocab,))
            tok = int(np.argmax(logits))
        return self.gen_tokens / (time.perf_counter() - t0)

    def timing(self) -> dict:
        out = {}
        if self.pp_seconds:
            out["llama.cpp_pp_tokens_per_s"] = self.pp_tokens / self.pp_seconds
        out["llama.cpp_tg_tokens_per_s"] = self.generation_speed()
        return out

    def close(self) -> None:
        if self.batch is not None:
            self._lc.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
