"""Emulation of transformers 4.57.6's config classes: config.json → the hparams convert_hf_to_gguf.py sees.

The reference's `ModelBase.load_hparams` (conversion/base.py) takes `AutoConfig.from_pretrained(folder)
.to_dict()`, not the raw file. `transformers_hparams` reproduces that for the keys the reference reads
(`READ_KEYS`), per supported `model_type`, mirroring the `__init__` of transformers' LlamaConfig,
MistralConfig, Qwen2Config, Qwen3Config and Gemma3TextConfig (and PretrainedConfig's `max_length` and
`torch_dtype` → `dtype`): the constructor defaults (`_DEFAULTS`), the config.json values over them, then what
the constructor derives — `num_key_value_heads` null → the head count; Llama's `head_dim` null →
hidden_size // heads; Qwen2/3's `sliding_window` kept only with `use_sliding_window`; `rope_scaling["type"]`
mirrored to `rope_type` (Llama, Qwen); Gemma 3's bidirectional `sliding_window // 2 + 1`. Where transformers
raises instead (`rope_config_validation`, `layer_type_validation`), we raise ConvertError.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ggufkit.errors import ConvertError

__all__ = ["READ_KEYS", "transformers_hparams"]

# transformers 4.57.6: each config class's constructor defaults for the keys the reference reads, in the
# constructors' order (transformers_defaults.json; Qwen3's is derived below).
_COMMON = {"max_length": 20}  # PretrainedConfig's generation default, present in every to_dict()
_DEFAULTS: dict[str, dict] = {
    model_type: defaults
    for model_type, defaults in json.loads(
        Path(__file__).with_name("transformers_defaults.json").read_text(encoding="utf-8")
    ).items()
    if not model_type.startswith("_")
}

# convert_hf_to_gguf.py's find_hparam lists for the block counts and sizes: the first key present wins.
LAYER_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_ctx",
    "n_positions",
    "max_length",
    "max_sequence_length",
    "model_max_length",
)
EMBEDDING_KEYS = ("hidden_size", "n_embd", "dim")
FEED_FORWARD_KEYS = (
    "prefix_dense_intermediate_size",
    "dense_intermediate_size",
    "intermediate_size",
    "n_inner",
    "hidden_dim",
)
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads")

# The mixture-of-experts find_hparam lists: a checkpoint with any of them is refused (no MoE architecture).
MOE_KEYS = (
    ("num_local_experts", "num_experts", "n_routed_experts"),
    ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"),
    ("n_group",),
    ("topk_group",),
    (
        "score_function",
        "scoring_func",
        "score_func",
        "moe_router_activation",
        "moe_router_activation_func",
        "expert_selection_fn",
    ),
)

# Every hparams key convert_hf_to_gguf.py reads for these architectures (find_hparam lists, .get()s).
READ_KEYS = (
    *LAYER_KEYS,
    *CONTEXT_KEYS,
    *EMBEDDING_KEYS,
    *FEED_FORWARD_KEYS,
    *HEAD_KEYS,
    *KV_HEAD_KEYS,
    "is_causal",
    "rope_parameters",
    "rope_scaling",
    "global_rope_theta",
    "rope_global_theta",
    "rope_theta_global",
    "rope_theta",
    "rotary_emb_base",
    "local_rope_theta",
    "rope_local_theta",
    "rope_theta_local",
    "swa_rope_theta",
    "rope_local_base_freq",
    "partial_rotary_factor",
    "rope_pct",
    "rope_percent",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "norm_epsilon",
    *(key for names in MOE_KEYS for key in names),
    "head_dim",
    "vocab_size",
    "vocab_size_per_layer_input",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "sliding_window_pattern",
    "sliding_window",
    "tie_word_embeddings",
    "quantization_config",
    "text_config",
)


# rope types whose transformers validation raises KeyError when these keys are missing (4.57.6)
def _with_head_dim(defaults: dict, head_dim: int) -> dict:
    """Qwen3Config's defaults: Qwen2Config's, and a head_dim right after num_key_value_heads (its order)."""
    out = {}
    for key, value in defaults.items():
        out[key] = value
        if key == "num_key_value_heads":
            out["head_dim"] = head_dim
    return out


_DEFAULTS["qwen3"] = _with_head_dim(_DEFAULTS["qwen2"], 128)


_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_rope(rope, max_pos) -> None:
    """Refuse a rope_scaling transformers' rope_config_validation (4.57.6) raises on, naming the key.

    (The reference would then fall back to config.json without transformers' defaults; we refuse instead.)
    """
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ConvertError(f"config.json: rope_scaling = {str(rope)[:60]!r} is not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str):
        raise ConvertError(f"config.json: rope_scaling.rope_type = {str(rope_type)[:40]!r} is not a string")
    if rope_type not in _ROPE_REQUIRED:
        return  # transformers only warns
    keys = set(rope) - {"type"}
    for key in ("rope_type", *_ROPE_REQUIRED[rope_type]):
        if key not in keys:
            raise ConvertError(f"config.json: rope_scaling for rope_type {rope_type!r} lacks the key {key!r}")
    for key in (
        "factor",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "original_max_position_embeddings",
        "low_freq_factor",
        "high_freq_factor",
    ):
        if rope.get(key) is not None and not _number(rope[key]):
            raise ConvertError(f"config.json: rope_scaling.{key} = {str(rope[key])[:40]!r} is not a number")
    if rope_type == "yarn" and rope.get("original_max_position_embeddings") is not None:
        if not _number(max_pos) or rope["original_max_position_embeddings"] == 0:
            raise ConvertError("config.json: yarn original_max_position_embeddings cannot scale the context")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope[key], list):
                raise ConvertError(f"config.json: rope_scaling.{key} is not a list")


def transformers_hparams(raw: dict, model_type: str) -> dict:
    """config.json as AutoConfig(...).to_dict() gives it (READ_KEYS); ConvertError where that raises."""
    h = {**_COMMON, **copy.deepcopy(_DEFAULTS[model_type])}
    for k, v in raw.items():
        h[k] = copy.deepcopy(v)
    if "torch_dtype" in h:  # PretrainedConfig renames it
        h["dtype"] = h.pop("torch_dtype")
    if model_type != "gemma3_text" and h.get("num_key_value_heads") is None:
        h["num_key_value_heads"] = h["num_attention_heads"]
    if model_type == "llama" and h.get("head_dim") is None:
        try:
            h["head_dim"] = h["hidden_size"] // h["num_attention_heads"]
        except (TypeError, ZeroDivisionError):
            raise ConvertError("config.json: hidden_size // num_attention_heads is not a head size") from None
    if model_type in ("qwen2", "qwen3") and not h.get("use_sliding_window"):
        h["sliding_window"] = None
    if model_type == "gemma3_text" and h.get("use_bidirectional_attention"):
        try:
            h["sliding_window"] = h["sliding_window"] // 2 + 1
        except TypeError:
            raise ConvertError("config.json: sliding_window is not a number") from None
    rope = h.get("rope_scaling")
    if model_type in ("llama", "qwen2", "qwen3") and isinstance(rope, dict) and "type" in rope:
        rope["rope_type"] = rope["type"]
    if model_type != "mistral":  # MistralConfig takes no rope_scaling: it is kept as given, unchecked
        _check_rope(rope, h.get("max_position_embeddings"))
        _check_layer_types(h, model_type)
    return h


_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "linear_attention")


def _check_layer_types(h: dict, model_type: str) -> None:
    """Refuse what transformers' layer_type_validation (Qwen2/3, Gemma 3 configs) raises on."""
    if model_type == "llama":
        return
    n = h.get("num_hidden_layers")
    layer_types = h.get("layer_types")
    if layer_types is None:  # derived from num_hidden_layers (and Gemma 3's sliding_window_pattern)
        pattern = h.get("sliding_window_pattern", 6)
        if not _is_int(n) or (model_type == "gemma3_text" and (not _number(pattern) or pattern == 0)):
            raise ConvertError(
                "config.json: num_hidden_layers / sliding_window_pattern cannot give layer types"
            )
        return
    if not isinstance(layer_types, (list, str)) or not all(t in _LAYER_TYPES for t in layer_types):
        raise ConvertError(f"config.json: layer_types entries must be in {_LAYER_TYPES}")
    if n is not None and n != len(layer_types):
        raise ConvertError(
            f"config.json: num_hidden_layers ({str(n)[:20]}) != len(layer_types) ({len(layer_types)})"
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
