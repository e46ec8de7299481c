"""A config.json with no weights beside it (a folder or file holding only the configuration, or a typical
shape from sizes.py) -> ModelInfo. A folder with its safetensors is read by sources.from_checkpoint instead,
from convert's dry run.

The architectures and tensors are the converter's (conversion/hf.py ARCHITECTURES, conversion/tensors.py
config_tensors: the tensors a complete checkpoint of the configuration converts to). A few architectures
the converter does not take are still estimated from their config (_ESTIMATE_ONLY), with _other_tensors'
llama-family approximation of their tensors."""

from __future__ import annotations

import json
from pathlib import Path

from ..conversion.hf import ARCHITECTURES
from ..errors import MemoryEstimateError
from ..gguf.types import GGMLQuantizationType as T
from .model import ModelInfo, swa_layers

# HF classes ggufkit cannot convert whose shapes the estimate still knows, and their GGUF architecture as
# convert_hf_to_gguf.py names it (Mixtral converts to "llama"; Gemma 3's multimodal class nests the LM).
_ESTIMATE_ONLY = {
    "MixtralForCausalLM": ("llama", "mixtral"),
    "Gemma2ForCausalLM": ("gemma2", "gemma2"),
    "Gemma3ForConditionalGeneration": ("gemma3", "gemma3"),
    "GemmaForCausalLM": ("gemma", "gemma"),
    "Phi3ForCausalLM": ("phi3", "phi3"),
}
# HF class -> GGUF arch; config.json model_type -> GGUF arch (for a config that names no known class)
HF_ARCH = {cls: arch for cls, (arch, _) in ARCHITECTURES.items()} | {
    cls: arch for cls, (arch, _) in _ESTIMATE_ONLY.items()
}
_MODEL_TYPE_ARCH = {types[0]: arch for arch, types in ARCHITECTURES.values()} | {
    model_type: arch for arch, model_type in _ESTIMATE_ONLY.values()
}
# GGUF arch -> an HF class of it (sizes.py writes configs with it); the converter's classes first
HF_CLASS = {arch: cls for cls, arch in reversed(HF_ARCH.items())}
_CONVERTED = {arch for arch, _ in ARCHITECTURES.values()}
# BPE merge counts of the well-known vocabularies (by size), for sources without a tokenizer file:
# Llama 3, Qwen2/2.5, SmolLM2. SentencePiece vocabularies (Llama 2, Mistral, Gemma) have none.
_MERGES_BY_VOCAB = {128256: 280147, 151936: 151387, 152064: 151387, 49152: 48900}
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def from_config(
    cfg: dict, *, name: str, kind: str, path: Path | None = None, note: str = "", n_merges: int | None = None
) -> ModelInfo:
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers (Gemma 3) nest the LM
        outer = cfg
        cfg = dict(cfg["text_config"])
        cfg.setdefault("architectures", outer.get("architectures"))
        cfg.setdefault("vocab_size", outer.get("vocab_size"))
    missing = [k for k in _HF_REQUIRED if cfg.get(k) is None]
    if missing:
        raise MemoryEstimateError(f"{name}: config.json lacks {', '.join(missing)}, needed for the estimate")
    archs = cfg.get("architectures") or []
    arch = next((HF_ARCH[a] for a in archs if isinstance(a, str) and a in HF_ARCH), None)
    arch = arch or _MODEL_TYPE_ARCH.get(cfg.get("model_type") or "", "llama")
    try:
        d = int(cfg["hidden_size"])
        n_layer = int(cfg["num_hidden_layers"])
        n_head = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_head)
        hd = int(cfg.get("head_dim") or d // n_head)
        n_ff = int(cfg["intermediate_size"])
        n_vocab = int(cfg["vocab_size"])
        n_expert = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        n_used = int(cfg.get("num_experts_per_tok") or 0)
        n_ff_exp = int(cfg.get("moe_intermediate_size") or (n_ff if n_expert else 0))
        n_swa = int(cfg.get("sliding_window") or 0) if arch in ("gemma2", "gemma3", "phi3") else 0
    except (TypeError, ValueError) as e:
        raise MemoryEstimateError(f"{name}: config.json has a non-integer size field ({e})") from None
    tied = bool(cfg.get("tie_word_embeddings", arch.startswith("gemma")))
    layer_types = cfg.get("layer_types")
    pattern = [t == "sliding_attention" for t in layer_types] if isinstance(layer_types, list) else None
    is_swa = swa_layers(
        arch, n_layer, n_swa, pattern if pattern is not None else cfg.get("sliding_window_pattern")
    )
    info = ModelInfo(
        name=name,
        kind=kind,
        arch=arch,
        n_layer=n_layer,
        n_embd=d,
        n_head=n_head,
        n_head_kv=[n_kv] * n_layer,
        head_dim_k=hd,
        head_dim_v=hd,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(cfg.get("max_position_embeddings") or 0),
        n_merges=_MERGES_BY_VOCAB.get(n_vocab, 0) if n_merges is None else n_merges,
        n_swa=n_swa,
        is_swa=is_swa,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_ff_exp=n_ff_exp,
        path=path,
        note=note,
    )
    if arch in _CONVERTED and not n_expert:
        info.tensors = _converted_tensors(arch, cfg, tied=tied)
    else:
        info.tensors = _other_tensors(info, tied=tied)
    return info


def _converted_tensors(arch: str, cfg: dict, *, tied: bool) -> list:
    """The tensors `ggufkit convert --type F16` writes for a complete checkpoint of this config."""
    from ..conversion.tensors import config_tensors, output_type
    from ..errors import GgufkitError
    from ..quantize.plan import TensorSpec

    try:
        planned = config_tensors(arch, cfg, tied=tied)
    except (GgufkitError, KeyError, TypeError, ValueError) as e:
        raise MemoryEstimateError(f"config.json: cannot shape the {arch} tensors ({e})") from None
    return [TensorSpec(t.name, t.ggml_shape, output_type(t, "F16")) for t in planned]


def _other_tensors(m: ModelInfo, *, tied: bool) -> list:
    """An architecture the converter does not take (_ESTIMATE_ONLY, or a mixture of experts): the tensors of
    a llama-family model with its extra norms and experts (ggml order, F16 matrices, F32 vectors), named as
    llama.cpp names them -- an approximation, not what any converter is known to write."""
    from ..quantize.plan import TensorSpec

    F16, F32 = T.F16, T.F32
    d, hd, q = m.n_embd, m.head_dim_k, m.n_head * m.head_dim_k
    specs = [
        TensorSpec("token_embd.weight", (d, m.n_vocab), F16),
        TensorSpec("output_norm.weight", (d,), F32),
    ]
    if not tied:
        specs.append(TensorSpec("output.weight", (d, m.n_vocab), F16))
    for i in range(m.n_layer):
        kv = m.n_head_kv[i] * hd
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (d,), F32),
            TensorSpec(b + "attn_q.weight", (d, q), F16),
            TensorSpec(b + "attn_k.weight", (d, kv), F16),
            TensorSpec(b + "attn_v.weight", (d, m.n_head_kv[i] * m.head_dim_v), F16),
            TensorSpec(b + "attn_output.weight", (m.n_head * m.head_dim_v, d), F16),
            TensorSpec(b + "ffn_norm.weight", (d,), F32),
        ]
        if m.arch == "gemma2":
            specs += [
                TensorSpec(b + "post_attention_norm.weight", (d,), F32),
                TensorSpec(b + "post_ffw_norm.weight", (d,), F32),
            ]
        if m.n_expert:
            e, f = m.n_expert, m.n_ff_exp
            specs += [
                TensorSpec(b + "ffn_gate_inp.weight", (d, e), F32),
                TensorSpec(b + "ffn_gate_exps.weight", (d, f, e), F16),
                TensorSpec(b + "ffn_up_exps.weight", (d, f, e), F16),
                TensorSpec(b + "ffn_down_exps.weight", (f, d, e), F16),
            ]
        else:
            specs += [
                TensorSpec(b + "ffn_gate.weight", (d, m.n_ff), F16),
                TensorSpec(b + "ffn_up.weight", (d, m.n_ff), F16),
                TensorSpec(b + "ffn_down.weight", (m.n_ff, d), F16),
            ]
    return specs


def from_folder(folder: Path) -> ModelInfo:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MemoryEstimateError(f"{folder}: no config.json (a Hugging Face model folder has one)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemoryEstimateError(f"{cfg_path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise MemoryEstimateError(f"{cfg_path}: not a JSON object")
    note = "config.json only, no weights"
    return from_config(
        cfg, name=folder.name, kind="config", path=folder, note=note, n_merges=_hf_merges(folder)
    )


def _hf_merges(folder: Path) -> int | None:
    """The BPE merge count of the folder's tokenizer.json, if it has one."""
    try:
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        merges = tok["model"].get("merges")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return len(merges) if isinstance(merges, list) else 0
