"""A GGUF model's tensors as the forward pass takes them: the tensors a llama-family graph needs, checked at
load; each weight dequantized to float32 (any block type the registry knows) when a layer asks for it, so
that the caller can drop a layer's weights before the next; token_embd's rows dequantized only for the ids
looked up.

GGUFWeights is the loading half of a model class: LlamaModel (llama.py) adds the forward pass, an
architecture's own module subclasses LlamaModel (gemma3.py).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import EvalError
from ..gguf.reader import GGUFModel
from ..gguf.types import GGMLQuantizationType
from ..quants import dequantize
from .args import ModelArgs
from .moe import MOE_FFN
from .numerics import f16_to_f32, vec_dot

__all__ = ["STACK", "GGUFWeights"]

STACK = False  # products sharing an input as one stacked product (another float summation order: off)


class GGUFWeights:
    """A GGUF's hyper-parameters and weights, loaded as a layer needs them. Weights stay in the (mapped)
    file until then."""

    args_type: ClassVar[type[ModelArgs]] = ModelArgs  # an architecture's subclass names its own

    def __init__(self, model: GGUFModel, *, llamacpp_numerics: bool = True):
        self.gguf = model
        self.llamacpp_numerics = llamacpp_numerics  # _stacked: only weights whose inputs round alike
        self.args = self.args_type.from_gguf(model)
        a = self.args
        self._tensors = {t.name: t for t in model.tensors}
        need = ["token_embd.weight", "output_norm.weight"]
        for i in range(a.block_count):
            ffn = MOE_FFN if a.expert_count else ("ffn_gate", "ffn_up", "ffn_down")
            need += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_output", "ffn_norm", *ffn)]
        missing = [n for n in need if n not in self._tensors]
        if missing:
            raise EvalError(f"{model.path}: missing tensor(s) {', '.join(missing[:4])}")
        self.n_vocab = self._tensors["token_embd.weight"].shape[1]
        self._rope_freqs = self._weight("rope_freqs.weight") if "rope_freqs.weight" in self._tensors else None

    def _weight(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, numpy order (rows = ggml's ne1, columns = ne0)."""
        t = self._tensors[name]
        shape = tuple(reversed(t.shape))
        if t.ggml_type == GGMLQuantizationType.F32:  # no copy: a read-only view of the mapped file
            return np.frombuffer(t.data(), dtype="<f4").reshape(shape)
        if (
            t.ggml_type == GGMLQuantizationType.F16
        ):  # numpy's astype values (ggml's, NaN payloads aside), on numba's threads
            return f16_to_f32(np.frombuffer(t.data(), dtype="<u2")).reshape(shape)
        return dequantize(t.data(), t.ggml_type, shape)

    def _maybe(self, name: str) -> np.ndarray | None:
        return self._weight(name) if name in self._tensors else None

    def _type(self, name: str):
        t = self._tensors.get(name)
        return None if t is None else t.ggml_type

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of token_embd for `ids`, dequantizing only the rows used."""
        t = self._tensors["token_embd.weight"]
        n_embd, n_rows = t.shape
        raw = t.data().reshape(n_rows, -1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = dequantize(np.ascontiguousarray(raw[uniq]), t.ggml_type, (len(uniq), n_embd))
        return rows[inverse.ravel()]

    def _layer(self, i: int) -> tuple[dict[str, np.ndarray | None], dict[str, GGMLQuantizationType | None]]:
        p = f"blk.{i}."
        w = {
            n: self._maybe(p + n + ".weight")
            for n in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "attn_q_norm",
                "attn_k_norm",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                *MOE_FFN,
            )
        }
        for n in ("attn_q", "attn_k", "attn_v"):
            w[n + "_b"] = self._maybe(p + n + ".bias")
        types = {
            n: self._type(p + n + ".weight")
            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", *MOE_FFN)
        }
        if w["attn_q"] is None:  # fused QKV (some converters write one attn_qkv tensor)
            a = self.args
            qkv = self._maybe(p + "attn_qkv.weight")
            if qkv is None:
                raise EvalError(f"{self.gguf.path}: layer {i} has neither attn_q nor attn_qkv")
            nq, nk = a.head_count * a.key_length, a.head_count_kv * a.key_length
            w["attn_q"], w["attn_k"], w["attn_v"] = qkv[:nq], qkv[nq : nq + nk], qkv[nq + nk :]
            types["attn_q"] = types["attn_k"] = types["attn_v"] = self._type(p + "attn_qkv.weight")
            w["qkv"] = qkv
        else:
            w["qkv"] = self._stacked(w, types, ("attn_q", "attn_k", "attn_v"))
        w["gate_up"] = self._stacked(w, types, ("ffn_gate", "ffn_up"))
        return w, types

    def _stacked(self, w: dict, types: dict, names: tuple[str, ...]) -> np.ndarray | None:
        """The weights `names` (same input) stacked into one matrix, so that one product computes them all,
        and w[name] made a view of its rows; None when one is missing or their activations are rounded
        differently (then each is its own product)."""
        if not STACK or any(w[n] is None for n in names):
            return None
        if self.llamacpp_numerics and len({vec_dot(types[n]) for n in names}) != 1:
            return None
        both = np.concatenate([w[n] for n in names])
        r0 = 0
        for n in names:
            r1 = r0 + w[n].shape[0]
            w[n] = both[r0:r1]
            r0 = r1
        return both

    def _output_name(self) -> str:
        """The output projection [n_vocab, n_embd] (token_embd when the file ties them)."""
        return "output.weight" if "output.weight" in self._tensors else "token_embd.weight"
