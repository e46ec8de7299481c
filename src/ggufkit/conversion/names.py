"""Hugging Face tensor names -> GGUF names, and the names the converter drops (llama.cpp
convert_hf_to_gguf.py: TextModel.filter_tensors, prepare_tensors and gguf-py's tensor map, for the
architectures convert takes; spec §2.2).

`model.layers.N.<suffix>` -> `blk.N.<gguf>`, `.weight`/`.bias` kept; the top-level tensors by TOP. Which
block tensors each architecture must have (REQUIRED_BLOCK) is the plan's check (tensors.plan_tensors).
"""

from __future__ import annotations

import re

__all__ = ["BLOCK", "BLOCK_BY_ARCH", "REQUIRED_BLOCK", "TOP", "filtered_name", "gguf_name"]

TOP = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
BLOCK_BY_ARCH = {
    "llama": {"post_attention_layernorm": "ffn_norm"},
    "qwen2": {"post_attention_layernorm": "ffn_norm"},
    "qwen3": {"post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm"},
    "gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm"},
}  # fmt: skip
# Every block of a checkpoint must have these (GGUF names without "blk.N."); output.weight is optional.
REQUIRED_BLOCK = {
    "llama": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
              "ffn_norm"),
    "qwen2": ("attn_norm", "attn_q", "attn_q.bias", "attn_k", "attn_k.bias", "attn_v", "attn_v.bias",
              "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"),
    "qwen3": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
              "ffn_norm", "attn_q_norm", "attn_k_norm"),
    "gemma3": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
               "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"),
}  # fmt: skip

# Names the reference drops before mapping (TextModel.filter_tensors: multimodal parts) ...
_SKIP_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                  "sound_projection.", "speech_embeddings.")  # fmt: skip
_SKIP_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
               "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
               "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")  # fmt: skip
# ... and after it (prepare_tensors: buffers some checkpoints save).
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(.+)\.(weight|bias)$")


def gguf_name(hf_name: str, arch: str) -> str | None:
    """The GGUF name of a (filtered) checkpoint tensor name; None when the architecture has no such one."""
    m = _LAYER.match(hf_name)
    if m:
        bid, part, suffix = m.groups()
        base = BLOCK.get(part) or BLOCK_BY_ARCH[arch].get(part)
        return None if base is None else f"blk.{int(bid)}.{base}.{suffix}"
    m = _TOP_RE.match(hf_name)
    if m and m.group(1) in TOP:
        return f"{TOP[m.group(1)]}.{m.group(2)}"
    return None


def filtered_name(name: str, arch: str) -> str | None:
    """The name as the reference keeps it (None: dropped) - TextModel/ModelBase.filter_tensors."""
    if name.startswith(_SKIP_PREFIXES) or any(p in name for p in _SKIP_PARTS):
        return None
    if arch == "llama" and "text_model." in name:
        name = name.replace("text_model.", "")
    if "language_model." in name:
        name = name.replace("language_model.", "")
    if name.endswith(_SKIP_SUFFIXES):
        return None
    return name
