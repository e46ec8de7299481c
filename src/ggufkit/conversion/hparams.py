"""The hyper-parameters the tensor plan reads from config.json (convert_hf_to_gguf.py's find_hparam and
TextModel.__init__'s rope_parameters, as hparams hold them): the head size, llama3's generated
`rope_freqs.weight` (spec §2.4), and the shape config.json implies for each tensor.
"""

from __future__ import annotations

import math

__all__ = ["expected_shapes", "find_hparam", "head_dim", "rope_freqs"]


def find_hparam(hparams: dict, *keys, default=None):
    """convert_hf_to_gguf.py's find_hparam: the value of the first key present (even when None)."""
    for k in keys:
        if k in hparams:
            return hparams[k]
    return default


def _rope_params(hparams: dict) -> dict:
    """TextModel.__init__'s rope_parameters (the part the llama3 factors read)."""
    rp = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    if "full_attention" in rp:
        return dict(rp["full_attention"] or {})
    if "rope_theta" not in rp:
        theta = find_hparam(hparams, "global_rope_theta", "rope_global_theta", "rope_theta_global",
                            "rope_theta", "rotary_emb_base")  # fmt: skip
        if theta is not None:
            rp["rope_theta"] = theta
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    if "original_max_position_embeddings" not in rp:
        omp = hparams.get("original_max_position_embeddings")
        if omp is not None:
            rp["original_max_position_embeddings"] = omp
    return rp


def head_dim(hparams: dict) -> int:
    hd = hparams.get("head_dim")
    return int(hd) if hd is not None else int(hparams["hidden_size"]) // int(hparams["num_attention_heads"])


def rope_freqs(hparams: dict):
    """Llama 3's rope_freqs.weight (float32 [head_dim / 2]), or None when the rope type is not llama3.

    LlamaModel.generate_extra_tensors computes it with float32 torch ops; torch's `scalar / tensor` is a
    reciprocal then a multiply, and a comparison of a float32 tensor with a Python float casts the float
    to float32: both are reproduced here (spec §2.4).
    """
    import numpy as np

    rp = _rope_params(hparams)
    if not rp or str(rp.get("rope_type", "")).lower() != "llama3":
        return None
    f32 = np.float32
    base = rp.get("rope_theta", 10000.0)
    dim = head_dim(hparams)
    factor = rp.get("factor", 8.0)
    lo = rp.get("low_freq_factor", 1.0)
    hi = rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = f32(old / lo), f32(old / hi)
    with np.errstate(all="ignore"):
        exps = np.arange(0, dim, 2, dtype=f32) / f32(dim)
        freqs = np.reciprocal(np.power(f32(base), exps)) * f32(1.0)
        out = []
        for freq in freqs:
            wavelen = np.reciprocal(freq) * f32(2 * math.pi)
            if wavelen < high_wl:
                out.append(f32(1.0))
            elif wavelen > low_wl:
                out.append(f32(factor))
            else:
                smooth = (np.reciprocal(wavelen) * f32(old) - f32(lo)) / f32(hi - lo)
                out.append(np.reciprocal((f32(1.0) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


def expected_shapes(arch: str, hp: dict, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Shapes config.json implies, by GGUF name pattern (numpy order), for the shape check."""
    d = int(hp["hidden_size"])
    ff = int(find_hparam(hp, "intermediate_size", default=0) or 0)
    nh = int(hp["num_attention_heads"])
    nkv = int(hp.get("num_key_value_heads") or nh)
    hd = head_dim(hp)
    return {
        "token_embd.weight": (n_vocab, d),
        "output.weight": (int(hp["vocab_size"]), d),
        "output_norm.weight": (d,),
        "attn_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "post_attention_norm.weight": (d,),
        "post_ffw_norm.weight": (d,),
        "attn_q.weight": (nh * hd, d),
        "attn_k.weight": (nkv * hd, d),
        "attn_v.weight": (nkv * hd, d),
        "attn_q.bias": (nh * hd,),
        "attn_k.bias": (nkv * hd,),
        "attn_v.bias": (nkv * hd,),
        "attn_output.weight": (d, nh * hd),
        "ffn_gate.weight": (ff, d),
        "ffn_up.weight": (ff, d),
        "ffn_down.weight": (d, ff),
        "attn_q_norm.weight": (hd,),
        "attn_k_norm.weight": (hd,),
    }
