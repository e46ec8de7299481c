"""Forward pass of llama-family GGUF models in numpy: llama (also Mistral, SmolLM), qwen2, qwen3.

The graph follows llama.cpp's (src/models/llama.cpp, qwen2.cpp, qwen3.cpp):
    x = token_embd[ids]
    per layer:  h = rms_norm(x) * attn_norm
                q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)      (qwen3: rms_norm per head on q and k)
                q, k = rope(q), rope(k)                            (llama: "normal" adjacent pairs;
                                                                    qwen2/qwen3: NeoX halves)
                x += softmax(q k^T / sqrt(head_dim) + causal) v  Wo
                h = rms_norm(x) * ffn_norm
                x += (silu(h Wgate) * h Wup) Wdown
    logits = (rms_norm(x) * output_norm) Woutput    (Woutput = token_embd when the file has no output.weight)
A mixture-of-experts layer (Mixtral: ffn_gate_inp + 3-D ffn_{gate,up,down}_exps, llama.cpp's build_moe_ffn
with softmax gating and norm_w) replaces the last line of a layer by
                p = softmax(h Wgate_inp);  top-k experts by p;  w = p[top] / sum(p[top])
                x += sum over the k slots of  w * (silu(h Wgate[e]) * h Wup[e]) Wdown[e]

An observer (LlamaModel(..., observer=f)) sees the input of every matrix multiplication:
f(weight_name, x, expert=e, n_expert=E) with x [rows, ne0] float32 as ggml's MUL_MAT / MUL_MAT_ID src1 holds
it, i.e. before the rounding to the weight's vec_dot type (ggml-cpu.c's ggml_compute_forward_mul_mat packs
src1 into its work buffer; the graph callback llama-imatrix uses sees the F32 node input); for an expert
tensor, only the rows routed to expert e. Without an observer nothing extra is computed.

Evaluation is LAYER-MAJOR: the residual stream of every chunk goes through layer 0, then layer 1, ...
so each layer's weights are dequantized once per evaluation (any block type the registry knows, into
float32) and dropped before the next layer: memory stays near the file size plus one layer in float32.
Matmuls are float32 BLAS (numpy @) on as many threads as asked; attention runs per chunk, causal
within the chunk (each chunk starts with an empty KV cache, as in llama-perplexity), as independent
single-BLAS-thread tasks (attention.py); norms, rope, SwiGLU and the F16 roundings are one pass each on the
same threads (fused.py). With STACK (weights.py), products sharing an input (q/k/v, gate/up) would be one
product on a stacked weight (fewer, larger BLAS calls), in another float summation order, i.e. another draw
of the rounding noise that the imatrix KLD test is sensitive to; so it is off (docs/benchmarks.md).

Numerics (llamacpp_numerics=True, the default): llama.cpp's CPU backend rounds the activations to the
weight's "vec_dot type" before each matmul (F16 for F16 weights, Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for
Q4_1/Q5_1, Q8_K for the K-quants and IQ4_XS) and keeps the KV cache in F16; this engine rounds the same
way and multiplies in float32. rms_norm (mean of squares summed in double) and the rope angles (a float32
chain theta *= base^(-2/n) per pair) are rounded as ggml rounds them. That rounding is part of the damage
llama-perplexity measures (about 0.003 KLD on SmolLM2-135M Q8_0), so leaving it out would under-report
every quantized level.

Fed llama.cpp's own intermediate tensors (tests/test_engine.py), every operation gives llama.cpp's output to
float32 summation order: the norms bit for bit; matmuls (checked for Q5_0, Q8_0, Q6_K and the Q4_K that
llama.cpp repacks), rope and attention to ~3e-7 relative. The summation order itself is not llama.cpp's
(BLAS here, tinyBLAS / repacked gemm / vec_dot lanes there), and 8-bit rounding amplifies such differences:
an input difference e becomes one of order sqrt(e * step), so after a few layers the two engines carry
independent draws of the same rounding noise. On SmolLM2-135M Q4_K_M the logits then differ by ~2.5 %
relative RMS and the argmax on ~4 % of positions, about as much as llama.cpp differs from itself when its
norm weights move by 1 ulp; PPL, KLD and same-top agree within the spread of those draws
(docs/benchmarks.md). With F16 weights (rounding steps of 2^-11) the logits agree to ~7e-4 relative RMS,
argmax 99.8 %.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import EvalError
from ..gguf.reader import GGUFModel
from . import fused
from .attention import attention
from .moe import MOE_FFN, moe_ffn
from .numerics import f16_round, rms_norm, round_activations, vec_dot
from .weights import GGUFWeights


class LlamaModel(GGUFWeights):
    """A llama-family GGUF, ready to run: the forward pass over GGUFWeights' weights (weights.py)."""

    def __init__(self, model: GGUFModel, *, llamacpp_numerics: bool = True, observer=None):
        self.observer = observer  # f(weight name, x, expert=, n_expert=) before each matmul (module doc)
        super().__init__(model, llamacpp_numerics=llamacpp_numerics)

    # -- products -----------------------------------------------------------------------------------

    def _matmul(
        self, x: np.ndarray, w: np.ndarray, wtype, cache: dict | None = None, *, name: str | None = None
    ) -> np.ndarray:
        """x [n, k] @ w.T, x first rounded as llama.cpp rounds it for a weight of type wtype. `name`: the
        weight's tensor name, shown to the observer with the unrounded x."""
        if name is not None and self.observer is not None:
            self.observer(name, x)
        if self.llamacpp_numerics and wtype is not None:
            key = (id(x), vec_dot(wtype))
            if cache is not None and key in cache:
                x = cache[key]
            else:
                xr = round_activations(x, wtype)
                if cache is not None:
                    cache[key] = xr
                x = xr
        return fused.matmul(x, w)

    def _rounds_to_f16(self, wtype) -> bool:
        return self.llamacpp_numerics and wtype is not None and vec_dot(wtype) == "F16"

    def _norm(self, x: np.ndarray, weight: np.ndarray, eps: float, wtype) -> tuple[np.ndarray, dict]:
        """rms_norm(x) * weight, and the rounding cache of _matmul with its F16 rounding already in it when
        the next products (weights of type wtype) round their input to F16 (one pass for both)."""
        if self._rounds_to_f16(wtype):
            h, hr = fused.rms_norm(x, weight, eps, rounded=True)
            return h, {(id(h), "F16"): hr}
        return fused.rms_norm(x, weight, eps), {}

    def _products(self, h, w, ty, rounded: dict, nm: dict, names: tuple[str, ...], stacked: str) -> list:
        """h @ w[n].T for each of `names`: one product with the stacked weight w[stacked] when _layer made
        one (the outputs are column views of it), else one each. The observer sees h once per name."""
        if w[stacked] is None:
            return [self._matmul(h, w[n], ty[n], rounded, name=nm[n]) for n in names]
        for n in names:
            if nm[n] is not None and self.observer is not None:
                self.observer(nm[n], h)
        out = self._matmul(h, w[stacked], ty[names[0]], rounded)
        cols = np.cumsum([0] + [w[n].shape[0] for n in names])
        return [out[:, c0:c1] for c0, c1 in zip(cols[:-1], cols[1:])]

    # -- rope ---------------------------------------------------------------------------------------
    def _rope_tables(
        self, n_pos: int, *, base: float | None = None, freq_scale: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [n_pos, rope_dim/2], with ggml's rounding: per position the angle starts at pos and is
        multiplied by s = base^(-2/n_dims) in float32 once per pair (so each angle carries the rounding of
        that chain), divided by the rope frequency factor, scaled by freq_scale; cos and sin are taken of
        that float32 angle and rounded to float32. base and freq_scale default to the model's (an
        architecture with per-layer rope passes the layer's)."""
        a = self.args
        half = a.rope_dimension_count // 2
        s = np.float32(
            np.power(
                np.float64(a.rope_freq_base if base is None else base),
                np.float64(np.float32(-2.0) / np.float32(a.rope_dimension_count)),
            )
        )
        theta = np.empty((n_pos, half), np.float32)
        acc = np.arange(n_pos, dtype=np.float32)
        for i in range(half):
            theta[:, i] = acc
            acc = acc * s
        if self._rope_freqs is not None:
            theta = theta / self._rope_freqs.reshape(-1)[:half]
        theta = theta * np.float32(a.freq_scale if freq_scale is None else freq_scale)
        theta = theta.astype(np.float64)
        return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x [..., T, heads, head_dim] rotated in place over its first rope_dim dims."""
        return fused.rope(x, cos, sin, self.args.rope_dimension_count, self.args.rope_neox)

    # -- forward ------------------------------------------------------------------------------------
    def _attention(self, q, k, v, *, scale: float | None = None, window: int = 0, block: int = 128):
        """Causal attention of one group of chunks, q [C,T,H,d], k/v [C,T,Hkv,d] -> [C*T, H*dv]
        (engine/attention.py)."""
        return attention(q, k, v, scale=scale, window=window, block=block)

    def _checked_tokens(self, tokens) -> np.ndarray:
        """tokens as a [chunks, ctx] array of ids the vocabulary has (EvalError otherwise)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [chunks, ctx], got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.n_vocab):
            raise EvalError(f"token id out of range for a vocabulary of {self.n_vocab}")
        return tokens

    @fused.single_blas
    def hidden(
        self, tokens: np.ndarray, *, group: int = 8, start: int = 0, resid: np.ndarray | None = None,
        keep: dict | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Final-norm hidden states [C, T, n_embd] of chunks tokens [C, T] (each chunk its own sequence).

        Layer-major: every chunk goes through layer i before any goes through layer i+1; the work inside a
        layer runs `group` chunks at a time to bound the temporary memory. keep: a dict that receives the
        residual stream [C*T, n_embd] entering each layer (key block_count: leaving the last); start and
        resid: resume from such a stream at layer `start` (the layers before it are not run)."""
        a = self.args
        tokens = self._checked_tokens(tokens)
        C, T = tokens.shape
        D = a.embedding_length
        x = self._stream(tokens, start, resid)  # the residual stream of every chunk
        cos, sin = self._rope_tables(T)
        eps = a.layer_norm_rms_epsilon
        H, Hkv, dk = a.head_count, a.head_count_kv, a.key_length
        for il in range(start, a.block_count):
            if keep is not None:
                keep[il] = x.copy()
            w, ty = self._layer(il)
            nm = self._observed_names(il)
            for c0 in range(0, C, group):
                n = min(group, C - c0)
                xs = x[c0 * T : (c0 + n) * T]  # a view: updated in place
                h, rounded = self._norm(xs, w["attn_norm"], eps, ty["attn_q"])
                q, k, v = self._products(h, w, ty, rounded, nm, ("attn_q", "attn_k", "attn_v"), "qkv")
                if w["attn_q_b"] is not None:
                    q += w["attn_q_b"]
                if w["attn_k_b"] is not None:
                    k += w["attn_k_b"]
                if w["attn_v_b"] is not None:
                    v += w["attn_v_b"]
                q = q.reshape(n, T, H, dk)
                k = k.reshape(n, T, Hkv, dk)
                v = v.reshape(n, T, Hkv, -1)
                if w["attn_q_norm"] is not None:
                    q = rms_norm(q, w["attn_q_norm"], eps)
                if w["attn_k_norm"] is not None:
                    k = rms_norm(k, w["attn_k_norm"], eps)
                self._rope(q, cos, sin)
                self._rope(k, cos, sin)
                if self.llamacpp_numerics:  # llama.cpp's KV cache is F16
                    k = f16_round(k)
                    v = f16_round(v)
                xs += self._matmul(
                    self._attention(q, k, v), w["attn_output"], ty["attn_output"], name=nm["attn_output"]
                )
                if w["ffn_gate_inp"] is not None:
                    xs += moe_ffn(self, rms_norm(xs, w["ffn_norm"], eps), w, ty, nm)
                    continue
                h, rounded = self._norm(xs, w["ffn_norm"], eps, ty["ffn_gate"])
                g, u = self._products(h, w, ty, rounded, nm, ("ffn_gate", "ffn_up"), "gate_up")
                f16 = self._rounds_to_f16(ty["ffn_down"])
                y = fused.swiglu(g, u, rounded=f16)
                y, rounded = (y[0], {(id(y[0]), "F16"): y[1]}) if f16 else (y, None)
                xs += self._matmul(y, w["ffn_down"], ty["ffn_down"], rounded, name=nm["ffn_down"])
            del w
        if keep is not None:
            keep[a.block_count] = x.copy()
        return fused.rms_norm(x, self._weight("output_norm.weight"), eps).reshape(C, T, D)

    def _stream(self, tokens: np.ndarray, start: int, resid: np.ndarray | None) -> np.ndarray:
        """The residual stream entering layer `start`: the embeddings (start 0) or a copy of resid."""
        C, T = tokens.shape
        D = self.args.embedding_length
        if resid is None:
            if start != 0:
                raise ValueError("resuming at a later layer needs the residual stream entering it")
            return self._embed_stream(tokens)
        if resid.shape != (C * T, D) or not 0 <= start <= self.args.block_count:
            raise ValueError(f"resume at layer {start} with a stream of shape {resid.shape}")
        return np.array(resid, dtype=np.float32, copy=True)

    def _embed_stream(self, tokens: np.ndarray) -> np.ndarray:
        C, T = tokens.shape
        return self._embed(tokens.reshape(-1)).reshape(C * T, self.args.embedding_length)

    def _observed_names(self, il: int) -> dict[str, str | None]:
        """Short name -> the tensor name the observer is told (None: not observed, or no observer). A fused
        attn_qkv is one matmul in llama.cpp: it is shown once, with q."""
        p = f"blk.{il}."
        short = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", *MOE_FFN)
        if self.observer is None:
            return dict.fromkeys(short)
        names = {n: p + n + ".weight" for n in short}
        if p + "attn_q.weight" not in self._tensors:
            names |= {"attn_q": p + "attn_qkv.weight", "attn_k": None, "attn_v": None}
        return names

    def chunk_logits(
        self, tokens: np.ndarray, *, first: int = 0, group: int = 8, resident_bytes: int = 1 << 29, **resume
    ) -> Iterator[np.ndarray]:
        """For each chunk of tokens [C, T], the logits [T - first, n_vocab] of positions first..T-1.

        Chunks go layer-major in passes whose residual streams fit in `resident_bytes` (one pass for
        everything up to ~450 chunks of 512 tokens on a 576-wide model), so the weights are dequantized
        once per pass and memory stays near the file size. resume: hidden's start, resid and keep (one
        pass only)."""
        tokens = np.asarray(tokens)
        C, T = tokens.shape
        per_pass = max(1, resident_bytes // (T * self.args.embedding_length * 4))
        if resume and C > per_pass:
            raise ValueError("resuming a residual stream needs the chunks in one pass")
        name = self._output_name()
        wtype = self._type(name)
        for c0 in range(0, C, per_pass):
            h = self.hidden(tokens[c0 : c0 + per_pass], group=group, **resume)
            out = self._weight(name)
            for c in range(h.shape[0]):
                yield self._matmul(np.ascontiguousarray(h[c, first:]), out, wtype)
            del out, h

    def logits(self, tokens) -> np.ndarray:
        """Logits [T, n_vocab] of one sequence of token ids."""
        return next(self.chunk_logits(np.asarray(tokens)[None, :]))
