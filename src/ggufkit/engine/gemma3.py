"""Forward pass of Gemma 3 (text) GGUF models in numpy, on the llama engine's weights, matmul and numerics.

The graph follows llama.cpp's (src/models/gemma3.cpp, hparams from its load_arch_hparams):
    x = token_embd[ids] * sqrt(n_embd)                  (sqrtf(n_embd) in float32)
    per layer:  h = rms_norm(x) * attn_norm
                q, k, v = h Wq, h Wk, h Wv
                q, k = rms_norm per head * attn_q_norm, * attn_k_norm
                q, k = rope_neox(q), rope_neox(k)         (the layer's base: see below)
                q *= attention_scale
                a = softmax(q k^T + mask) v  Wo    (mask: causal, plus the sliding window on SWA layers)
                x += rms_norm(a) * post_attention_norm
                h = rms_norm(x) * ffn_norm
                x += rms_norm((gelu(h Wgate) * h Wup) Wdown) * post_ffw_norm
    logits = (rms_norm(x) * output_norm) Woutput          (Woutput = token_embd: Gemma ties them)
    logits = c * tanh(logits / c)                          (only when final_logit_softcapping c is set)

Hyper-parameters as llama.cpp reads them from the GGUF ({arch}.* keys):
- Sliding-window layers: when attention.sliding_window (n_swa) is set, layer il is local (SWA) unless it is
  the last of every `attention.sliding_window_pattern` layers (default 6: five local, one global), or as
  the per-layer bool array of that key says. A local query at position p sees keys p - n_swa + 1 .. p
  (llama.cpp masks p - key >= n_swa). Without sliding_window every layer is global.
- Rope: NeoX halves. Global layers use rope.freq_base (1e6 on Gemma 3) and the rope scaling of the file;
  local layers use rope.freq_base_swa (default 10000) with no scaling (llama.cpp's rope_freq_*_train_swa).
- attention_scale: the GGUF carries no query_pre_attn_scalar; llama.cpp takes 1/sqrt(key_length), except
  for the 62-layer model (27B), whose query_pre_attn_scalar is n_embd / n_head: 1/sqrt(n_embd / n_head).
- GELU: ggml's tanh form through its F16 table (numerics.geglu), as llama.cpp's CPU geglu computes it.

Each operation is checked against llama.cpp's own intermediate tensors on Gemma 3 270M (tests/test_gemma3.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import EvalError
from . import fused
from .args import ModelArgs
from .llama import LlamaModel
from .numerics import f16_round, geglu, rms_norm

# the 27B model's layer count: llama.cpp scales its queries by 1/sqrt(n_embd / n_head) (LLM_TYPE_27B)
_N_LAYER_27B = 62


@dataclass
class Gemma3Args(ModelArgs):
    """ModelArgs plus Gemma 3's keys (unknown keys ignored, as in ModelArgs)."""

    sliding_window: int = 0
    sliding_window_pattern: int = 6  # every n-th layer is global; a per-layer array goes to swa_layers
    rope_freq_base_swa: float = 10000.0
    final_logit_softcapping: float = 0.0
    swa_layers: tuple[bool, ...] = ()  # per layer: sliding-window attention (filled in by from_gguf)

    ARCHITECTURES: ClassVar[dict[str, bool]] = {"gemma3": True}

    @classmethod
    def from_gguf(cls, model) -> Gemma3Args:
        a = super().from_gguf(model)
        if a.sliding_window > 0:
            pattern = model.get(f"{a.architecture}.attention.sliding_window_pattern")
            if isinstance(pattern, (list, np.ndarray)):  # llama.cpp's get_arr: one bool per layer
                if len(pattern) != a.block_count:
                    raise EvalError(
                        f"{model.path}: {a.architecture}.attention.sliding_window_pattern has "
                        f"{len(pattern)} entries for {a.block_count} layers"
                    )
                a.swa_layers = tuple(bool(p) for p in pattern)
            else:
                n = a.sliding_window_pattern
                a.swa_layers = tuple(n == 0 or il % n < n - 1 for il in range(a.block_count))
        else:
            a.swa_layers = (False,) * a.block_count
        return a

    @property
    def attention_scale(self) -> np.float32:
        """1 / sqrtf(d) in float32, d as llama.cpp picks it (see the module doc)."""
        d = self.embedding_length // self.head_count if self.block_count == _N_LAYER_27B else self.key_length
        return np.float32(1.0) / np.sqrt(np.float32(d))


class Gemma3Model(LlamaModel):
    """A Gemma 3 GGUF, ready to run: LlamaModel's weights, matmul and rope with Gemma's graph."""

    args_type = Gemma3Args

    def __init__(self, model, *, llamacpp_numerics: bool = True):
        super().__init__(model, llamacpp_numerics=llamacpp_numerics)
        need = [
            f"blk.{i}.{n}.weight"
            for i in range(self.args.block_count)
            for n in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")
        ]
        missing = [n for n in need if n not in self._tensors]
        if missing:
            raise EvalError(f"{model.path}: missing tensor(s) {', '.join(missing[:4])}")

    def _layer(self, i: int):
        w, types = super()._layer(i)
        for n in ("post_attention_norm", "post_ffw_norm"):
            w[n] = self._weight(f"blk.{i}.{n}.weight")
        return w, types

    def _layer_ropes(self, n_pos: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """cos, sin per layer: local layers at rope_freq_base_swa unscaled, global ones at the model's."""
        a = self.args
        local = self._rope_tables(n_pos, base=a.rope_freq_base_swa, freq_scale=1.0)
        glob = self._rope_tables(n_pos)
        return [local if swa else glob for swa in a.swa_layers]

    @fused.single_blas
    def hidden(
        self, tokens: np.ndarray, *, group: int = 8, start: int = 0, resid: np.ndarray | None = None,
        keep: dict | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Final-norm hidden states [C, T, n_embd] of chunks tokens [C, T] (each chunk its own sequence),
        layer-major as LlamaModel.hidden."""
        a = self.args
        tokens = self._checked_tokens(tokens)
        C, T = tokens.shape
        D = a.embedding_length
        x = self._stream(tokens, start, resid)
        ropes = self._layer_ropes(T)
        scale = a.attention_scale
        eps = a.layer_norm_rms_epsilon
        H, Hkv, dk = a.head_count, a.head_count_kv, a.key_length
        for il in range(start, a.block_count):
            if keep is not None:
                keep[il] = x.copy()
            w, ty = self._layer(il)
            cos, sin = ropes[il]
            window = a.sliding_window if a.swa_layers[il] else 0
            nm = self._observed_names(il)
            for c0 in range(0, C, group):
                n = min(group, C - c0)
                xs = x[c0 * T : (c0 + n) * T]  # a view: updated in place
                h = rms_norm(xs, w["attn_norm"], eps)
                rounded: dict = {}  # h rounded per vec_dot type, shared by q, k, v of the same type
                q = self._matmul(h, w["attn_q"], ty["attn_q"], rounded, name=nm["attn_q"]).reshape(
                    n, T, H, dk
                )
                k = self._matmul(h, w["attn_k"], ty["attn_k"], rounded, name=nm["attn_k"]).reshape(
                    n, T, Hkv, dk
                )
                v = self._matmul(h, w["attn_v"], ty["attn_v"], rounded, name=nm["attn_v"]).reshape(
                    n, T, Hkv, -1
                )
                q = rms_norm(q, w["attn_q_norm"], eps)
                k = rms_norm(k, w["attn_k_norm"], eps)
                self._rope(q, cos, sin)
                self._rope(k, cos, sin)
                q *= scale
                if self.llamacpp_numerics:  # llama.cpp's KV cache is F16
                    k = f16_round(k)
                    v = f16_round(v)
                att = self._attention(q, k, v, scale=1, window=window)
                att = self._matmul(att, w["attn_output"], ty["attn_output"], name=nm["attn_output"])
                xs += rms_norm(att, w["post_attention_norm"], eps)
                h = rms_norm(xs, w["ffn_norm"], eps)
                rounded = {}
                gate = self._matmul(h, w["ffn_gate"], ty["ffn_gate"], rounded, name=nm["ffn_gate"])
                up = self._matmul(h, w["ffn_up"], ty["ffn_up"], rounded, name=nm["ffn_up"])
                down = self._matmul(geglu(gate, up), w["ffn_down"], ty["ffn_down"], name=nm["ffn_down"])
                xs += rms_norm(down, w["post_ffw_norm"], eps)
            del w
        if keep is not None:
            keep[a.block_count] = x.copy()
        return rms_norm(x, self._weight("output_norm.weight"), eps).reshape(C, T, D)

    def _embed_stream(self, tokens: np.ndarray) -> np.ndarray:
        x = super()._embed_stream(tokens)
        x *= np.sqrt(np.float32(self.args.embedding_length))  # ggml_scale(inp, sqrtf(n_embd))
        return x

    def _softcap(self, logits: np.ndarray) -> np.ndarray:
        """In place: c * tanh(logits * (1/c)) in float32 (ggml_scale, ggml_tanh, ggml_scale)."""
        c = self.args.final_logit_softcapping
        if c:
            logits *= np.float32(1.0 / np.float32(c))
            np.tanh(logits, out=logits)
            logits *= np.float32(c)
        return logits

    def chunk_logits(
        self, tokens: np.ndarray, *, first: int = 0, group: int = 8, resident_bytes: int = 1 << 29, **resume
    ) -> Iterator[np.ndarray]:
        """For each chunk of tokens [C, T], the logits [T - first, n_vocab] of positions first..T-1,
        softcapped when the model says so. Passes as LlamaModel.chunk_logits; the output weight is
        dequantized once per pass (its F32 [n_vocab, n_embd] form: 0.7 GB on Gemma 3 270M)."""
        for logits in super().chunk_logits(
            tokens, first=first, group=group, resident_bytes=resident_bytes, **resume
        ):
            yield self._softcap(logits)
