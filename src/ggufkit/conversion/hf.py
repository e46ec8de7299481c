"""config.json → the hyperparameters llama.cpp's converter sees, and the `<arch>.*` KVs it writes from them.

`load_model_config` reads config.json, checks the architecture and model_type (ggufkit converts
LlamaForCausalLM, MistralForCausalLM, Qwen2/Qwen3ForCausalLM, Gemma3ForCausalLM), and resolves hparams as
convert_hf_to_gguf.py's `ModelBase.load_hparams` gets them from transformers 4.57.6's
`AutoConfig.from_pretrained(folder).to_dict()`; that emulation of the config classes (defaults,
normalisations, validation; `READ_KEYS`) lives in hf_defaults.py. Where transformers would raise (a
`rope_scaling` missing a key its rope type requires), the reference falls back to config.json as written;
we refuse (ConvertError).

`arch_kvs` then follows `TextModel.set_gguf_parameters` and the subclasses' additions key by key
(`find_hparam`: the first key PRESENT wins, even with a null value); `rope_parameters` is
`TextModel.__init__`'s. Keys the reference writes twice (Gemma 3 re-adds some) keep their first position and
take the last value, as gguf-py's writer does.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ggufkit.errors import ConvertError
from ggufkit.gguf.types import GGUFValueType as V
from ggufkit.quantize.levels import LEVELS

from .hf_defaults import (
    CONTEXT_KEYS,
    EMBEDDING_KEYS,
    FEED_FORWARD_KEYS,
    HEAD_KEYS,
    KV_HEAD_KEYS,
    LAYER_KEYS,
    MOE_KEYS,
    READ_KEYS,
    transformers_hparams,
)

__all__ = [
    "ARCHITECTURES",
    "FILE_TYPES",
    "KV",
    "READ_KEYS",
    "HFConfig",
    "arch_kvs",
    "load_model_config",
    "read_config_json",
    "rope_parameters",
]

# HF class name -> (GGUF arch, the config.json model_types whose transformers config class we mirror)
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "LlamaForCausalLM": ("llama", ("llama", "mistral", "qwen2", "qwen3")),
    "MistralForCausalLM": ("llama", ("mistral", "llama")),
    "Qwen2ForCausalLM": ("qwen2", ("qwen2",)),
    "Qwen3ForCausalLM": ("qwen3", ("qwen3",)),
    "Gemma3ForCausalLM": ("gemma3", ("gemma3_text",)),
}

# convert_hf_to_gguf.py's --outtype choices, which convert writes itself (every other level goes through the
# quantize plan), and their general.file_type: the llama_ftype of llama-quantize's level of the same name
OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
FILE_TYPES = {name: LEVELS[name].ftype_id for name in OUTTYPES}

KV = tuple  # (key, GGUFValueType, value) or (key, ARRAY, list, sub_type)


@dataclass
class HFConfig:
    """A checkpoint's model configuration: its HF class, GGUF arch, and hparams as the reference sees them."""

    architecture: str
    arch: str
    hparams: dict
    raw: dict = field(repr=False)  # config.json as written (metadata and vocab read it raw)
    folder: Path | None = None


def _supported() -> str:
    return ", ".join(ARCHITECTURES)


def read_config_json(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        text = path.read_bytes().decode("utf-8")
        raw = json.loads(text)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing (a Hugging Face checkpoint folder has a config.json)") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConvertError(f"{path}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: a JSON {type(raw).__name__}, not an object")
    return raw


def load_model_config(folder) -> HFConfig:
    """Read `folder/config.json` and resolve hparams as transformers 4.57.6 would. Raises ConvertError."""
    folder = Path(folder)
    raw = read_config_json(folder)
    path = folder / "config.json"
    arches = raw.get("architectures")
    if not isinstance(arches, list) or not arches or not isinstance(arches[0], str):
        raise ConvertError(
            f"{path}: no 'architectures' list naming the model class (supported: {_supported()})"
        )
    if "text_config" in raw:
        raise ConvertError(
            f"{path}: has a 'text_config' (a multimodal checkpoint); supported: {_supported()}"
        )
    architecture = arches[0]
    if architecture not in ARCHITECTURES:
        raise ConvertError(
            f"{path}: architecture {architecture!r} is not supported (supported: {_supported()})"
        )
    arch, model_types = ARCHITECTURES[architecture]
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConvertError(f"{path}: no 'model_type' key")
    if model_type not in model_types:
        raise ConvertError(
            f"{path}: model_type {str(model_type)[:40]!r} does not go with {architecture} "
            f"(expected {' or '.join(model_types)})"
        )
    if raw.get("quantization_config") is not None:
        raise ConvertError(f"{path}: a quantized checkpoint ('quantization_config'); convert a float one")
    hparams = transformers_hparams(raw, model_type)
    cfg = HFConfig(architecture, arch, hparams, raw, folder)
    arch_kvs(cfg, FILE_TYPES["F16"])  # every value the KVs need is there and well-typed, or ConvertError
    return cfg


# ---- the <arch>.* KVs ----------------------------------------------------------------------------------


def _lookup(h: dict, keys) -> tuple[str | None, object]:
    """find_hparam: the first of `keys` present in hparams (even with a null value), and its value."""
    for k in keys:
        if k in h:
            return k, h[k]
    return None, None


def _find(h: dict, keys, *, optional: bool = False):
    key, value = _lookup(h, keys)
    if key is None and not optional:
        raise ConvertError(f"config.json: none of the keys {', '.join(keys)} is present")
    return value


class _KVs:
    """An insertion-ordered KV list where a repeated key keeps its first position and takes the new value."""

    def __init__(self):
        self.items: dict[str, KV] = {}

    def add(self, key: str, vtype: V, value, what: str | None = None) -> None:
        self.items[key] = (key, vtype, _checked(key, vtype, value, what or key))


def _checked(key: str, vtype: V, value, what: str):
    bad = f"config.json: {what} = {str(value)[:60]!r} cannot be written as GGUF {key} ({vtype.name})"
    if vtype == V.UINT32:
        if not isinstance(value, int) or not 0 <= value < 2**32:  # bool is an int: struct packs it too
            raise ConvertError(bad)
        return int(value)
    if vtype == V.FLOAT32:
        if not isinstance(value, (int, float)):
            raise ConvertError(bad)
        try:
            struct.pack("<f", value)  # as gguf-py's writer packs it: too large for a float32 fails
        except (OverflowError, struct.error):
            raise ConvertError(bad) from None
        return float(value)
    if vtype == V.STRING:
        if not isinstance(value, str):
            raise ConvertError(bad)
        return value
    if vtype == V.BOOL:
        return bool(value)
    raise AssertionError(vtype)


def rope_parameters(h: dict) -> dict:
    """`TextModel.__init__`'s rope_parameters: rope_parameters or rope_scaling, globals mirrored in."""
    rp = h.get("rope_parameters", h.get("rope_scaling")) or {}
    if not isinstance(rp, dict):
        raise ConvertError(f"config.json: rope_scaling = {str(rp)[:60]!r} is not an object")
    rp = copy.deepcopy(rp)
    if "full_attention" not in rp and "sliding_attention" not in rp:
        theta = _find(
            h,
            ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"),
            optional=True,
        )
        local = _find(
            h,
            (
                "local_rope_theta",
                "rope_local_theta",
                "rope_theta_local",
                "swa_rope_theta",
                "rope_local_base_freq",
            ),
            optional=True,
        )
        partial = _find(h, ("partial_rotary_factor", "rope_pct", "rope_percent"), optional=True)
        orig = h.get("original_max_position_embeddings")
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
        if "partial_rotary_factor" not in rp and partial is not None:
            rp["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rp and orig is not None:
            rp["original_max_position_embeddings"] = orig
    return rp


def _full(rp: dict) -> dict:
    full = rp.get("full_attention", rp)
    if not isinstance(full, dict):
        raise ConvertError("config.json: rope parameters for full_attention are not an object")
    return full


def arch_kvs(cfg: HFConfig, file_type: int) -> list[KV]:
    """The `<arch>.*` KVs and general.file_type, in convert_hf_to_gguf.py's order and types."""
    h, a = cfg.hparams, cfg.arch
    kv = _KVs()
    kv.add(f"{a}.block_count", V.UINT32, _find(h, LAYER_KEYS), _lookup(h, LAYER_KEYS)[0])
    for key, names in (
        ("context_length", CONTEXT_KEYS),
        ("embedding_length", EMBEDDING_KEYS),
        ("feed_forward_length", FEED_FORWARD_KEYS),
        ("attention.head_count", HEAD_KEYS),
        ("attention.head_count_kv", KV_HEAD_KEYS),
    ):
        found, value = _lookup(h, names)
        if value is not None:
            kv.add(f"{a}.{key}", V.UINT32, value, found)
    if h.get("is_causal") is False:
        kv.add(f"{a}.attention.causal", V.BOOL, False)

    rp = rope_parameters(h)
    full = _full(rp)
    if (rope_type := full.get("rope_type")) is not None:
        factor = full.get("factor")
        if rope_type == "linear" and factor is not None:
            kv.add(f"{a}.rope.scaling.type", V.STRING, "linear")
            kv.add(f"{a}.rope.scaling.factor", V.FLOAT32, factor, "rope_scaling.factor")
        elif rope_type == "yarn" and factor is not None:
            kv.add(f"{a}.rope.scaling.type", V.STRING, "yarn")
            kv.add(f"{a}.rope.scaling.factor", V.FLOAT32, factor, "rope_scaling.factor")
            if "original_max_position_embeddings" not in full:
                raise ConvertError("config.json: yarn rope scaling without original_max_position_embeddings")
            kv.add(
                f"{a}.rope.scaling.original_context_length",
                V.UINT32,
                full["original_max_position_embeddings"],
            )
            for key, value in (
                ("yarn_ext_factor", full.get("extrapolation_factor")),
                ("yarn_attn_factor", full.get("attention_factor", full.get("attn_factor"))),
                ("yarn_beta_fast", full.get("beta_fast")),
                ("yarn_beta_slow", full.get("beta_slow")),
            ):
                if value is not None:
                    kv.add(f"{a}.rope.scaling.{key}", V.FLOAT32, value, f"rope_scaling {key}")
        elif rope_type in ("su", "longrope"):
            kv.add(f"{a}.rope.scaling.type", V.STRING, "longrope")
        elif not isinstance(rope_type, str):
            raise ConvertError(f"config.json: rope_type {str(rope_type)[:40]!r} is not a string")
    if "mrope_section" in rp:
        raise ConvertError(
            "config.json: mrope_section (multimodal rope) is not supported for these architectures"
        )
    if (theta := full.get("rope_theta")) is not None:
        kv.add(f"{a}.rope.freq_base", V.FLOAT32, theta, "rope_theta")
    sliding = rp.get("sliding_attention", {})
    if not isinstance(sliding, dict):
        raise ConvertError("config.json: rope parameters for sliding_attention are not an object")
    if (local := sliding.get("rope_theta")) is not None:
        kv.add(f"{a}.rope.freq_base_swa", V.FLOAT32, local, "local rope_theta")
    found, eps = _lookup(h, ("rms_norm_eps", "norm_eps"))
    if eps is not None:
        kv.add(f"{a}.attention.layer_norm_rms_epsilon", V.FLOAT32, eps, found)
    found, eps = _lookup(h, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))
    if eps is not None:
        kv.add(f"{a}.attention.layer_norm_epsilon", V.FLOAT32, eps, found)
    for names in MOE_KEYS:
        if _find(h, names, optional=True) is not None:
            raise ConvertError(f"config.json: {names[0]} (a mixture-of-experts model) is not supported")
    if (head_dim := h.get("head_dim")) is not None:
        kv.add(f"{a}.attention.key_length", V.UINT32, head_dim, "head_dim")
        kv.add(f"{a}.attention.value_length", V.UINT32, head_dim, "head_dim")
    kv.add("general.file_type", V.UINT32, file_type)

    if a == "llama":
        if "vocab_size" not in h:
            raise ConvertError("config.json: no 'vocab_size' key")
        kv.add("llama.vocab_size", V.UINT32, h["vocab_size"], "vocab_size")
        rope_dim = h.get("head_dim")
        if rope_dim is None:
            try:
                rope_dim = h["hidden_size"] // h["num_attention_heads"]
            except KeyError as e:
                raise ConvertError(
                    f"config.json: no {e.args[0]!r} key (needed for the rope dimension)"
                ) from None
            except (TypeError, ZeroDivisionError):
                raise ConvertError("config.json: hidden_size // num_attention_heads is not a size") from None
        kv.add("llama.rope.dimension_count", V.UINT32, rope_dim, "head_dim")
    elif a == "gemma3":
        kv.add(
            "gemma3.context_length",
            V.UINT32,
            h.get("max_position_embeddings", 131072),
            "max_position_embeddings",
        )
        kv.add(
            "gemma3.attention.head_count", V.UINT32, h.get("num_attention_heads", 8), "num_attention_heads"
        )
        kv.add(
            "gemma3.attention.layer_norm_rms_epsilon", V.FLOAT32, h.get("rms_norm_eps", 1e-6), "rms_norm_eps"
        )
        kv.add("gemma3.attention.key_length", V.UINT32, h.get("head_dim", 256), "head_dim")
        kv.add("gemma3.attention.value_length", V.UINT32, h.get("head_dim", 256), "head_dim")
        kv.add("gemma3.rope.freq_base", V.FLOAT32, full.get("rope_theta", 1_000_000.0), "rope_theta")
        if h.get("attn_logit_softcapping") is not None:
            raise ConvertError("config.json: attn_logit_softcapping is set; Gemma 3 has none (Gemma 2?)")
        if softcap := h.get("final_logit_softcapping"):
            kv.add("gemma3.final_logit_softcapping", V.FLOAT32, softcap, "final_logit_softcapping")
        if h.get("sliding_window_pattern") != 1:
            if "sliding_window" not in h:
                raise ConvertError("config.json: no 'sliding_window' key")
            kv.add("gemma3.attention.sliding_window", V.UINT32, h["sliding_window"], "sliding_window")
        kv.add(
            "gemma3.attention.head_count_kv", V.UINT32, h.get("num_key_value_heads", 4), "num_key_value_heads"
        )
    elif (cfg.folder is not None) and (Path(cfg.folder) / "modules.json").is_file():
        raise ConvertError(
            f"{cfg.folder}: a sentence-transformers folder (modules.json); pooling is not supported"
        )
    return list(kv.items.values())
