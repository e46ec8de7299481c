"""A bare size ("7B", "135M", "qwen2:1.5B") -> the architecture family's typical shape (the _SHAPES table),
scaled in depth when no typical shape is near the size asked."""

from __future__ import annotations

import math
import re

from ..errors import MemoryEstimateError
from .hf_config import HF_CLASS, from_config
from .model import ModelInfo

# Typical shapes by family, as the published config.json files give them (hidden, layers, heads, KV
# heads, head_dim, ffn, vocab, tied, sliding window). A bare size resolves to the nearest one.
_SHAPES = {
    "llama": {  # Llama 3.x (1B, 3B, 8B, 70B) and Llama 2 (7B, 13B)
        "1B": (2048, 16, 32, 8, 64, 8192, 128256, True, 0),
        "3B": (3072, 28, 24, 8, 128, 8192, 128256, True, 0),
        "7B": (4096, 32, 32, 32, 128, 11008, 32000, False, 0),
        "8B": (4096, 32, 32, 8, 128, 14336, 128256, False, 0),
        "13B": (5120, 40, 40, 40, 128, 13824, 32000, False, 0),
        "70B": (8192, 80, 64, 8, 128, 28672, 128256, False, 0),
    },
    "qwen2": {  # Qwen2.5
        "0.5B": (896, 24, 14, 2, 64, 4864, 151936, True, 0),
        "1.5B": (1536, 28, 12, 2, 128, 8960, 151936, True, 0),
        "3B": (2048, 36, 16, 2, 128, 11008, 151936, True, 0),
        "7B": (3584, 28, 28, 4, 128, 18944, 152064, False, 0),
        "14B": (5120, 48, 40, 8, 128, 13824, 152064, False, 0),
        "32B": (5120, 64, 40, 8, 128, 27648, 152064, False, 0),
        "72B": (8192, 80, 64, 8, 128, 29568, 152064, False, 0),
    },
    "smollm2": {
        "135M": (576, 30, 9, 3, 64, 1536, 49152, True, 0),
        "360M": (960, 32, 15, 5, 64, 2560, 49152, True, 0),
        "1.7B": (2048, 24, 32, 32, 64, 8192, 49152, True, 0),
    },
    "mistral": {"7B": (4096, 32, 32, 8, 128, 14336, 32768, False, 0)},
    "gemma2": {
        "2B": (2304, 26, 8, 4, 256, 9216, 256000, True, 4096),
        "9B": (3584, 42, 16, 8, 256, 14336, 256000, True, 4096),
        "27B": (4608, 46, 32, 16, 128, 36864, 256000, True, 4096),
    },
    "gemma3": {
        "1B": (1152, 26, 4, 1, 256, 6912, 262144, True, 512),
        "4B": (2560, 34, 8, 4, 256, 10240, 262208, True, 1024),
        "12B": (3840, 48, 16, 8, 256, 15360, 262208, True, 1024),
        "27B": (5376, 62, 32, 16, 128, 21504, 262208, True, 1024),
    },
}
_FAMILY_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "smollm2": "llama",
    "mistral": "llama",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}
_SIZE_RE = re.compile(
    r"^\s*(?:(?P<family>[a-z][a-z0-9]*)[:\-])?(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[MmBbKk])\s*$"
)


def parse_param_count(text: str) -> int:
    """'7B' -> 7e9, '135M' -> 1.35e8, '1.5b' -> 1.5e9 (K, M, B)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MemoryEstimateError(
            f"unknown model size {text!r}: expected a number and K, M or B, such as 7B or 135M"
        )
    return int(float(m["num"]) * {"k": 1e3, "m": 1e6, "b": 1e9}[m["unit"].lower()])


def _config_of(family: str, label: str) -> dict:
    d, n_layer, n_head, n_kv, hd, ff, vocab, tied, swa = _SHAPES[family][label]
    arch = _FAMILY_ARCH[family]
    return {
        "architectures": [HF_CLASS[arch]],
        "hidden_size": d,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hd,
        "intermediate_size": ff,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "sliding_window": swa,
    }


def from_size(text: str) -> ModelInfo:
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MemoryEstimateError(
            f"unknown model source {text!r}: not a file, not a folder with config.json, and not a size such "
            f"as 7B or qwen2:1.5B"
        )
    family = (m["family"] or "llama").lower()
    if family not in _SHAPES:
        raise MemoryEstimateError(f"unknown model family {family!r} in {text!r}; known: {', '.join(_SHAPES)}")
    want = parse_param_count(f"{m['num']}{m['unit']}")
    if want <= 0:
        raise MemoryEstimateError(f"model size {text!r} must be positive")
    shapes = {
        label: from_config(_config_of(family, label), name=label, kind="size") for label in _SHAPES[family]
    }
    label, base = min(shapes.items(), key=lambda kv: abs(math.log(kv[1].n_params / want)))
    if abs(base.n_params / want - 1) <= 0.15:
        note = f"{family} {label} shape"
        return from_config(_config_of(family, label), name=text.strip(), kind="size", note=note)
    # no typical shape within 15%: keep the nearest one's width and scale its depth to the size asked
    cfg = _config_of(family, label)
    per_layer = (base.n_params - _embedding_params(base)) / base.n_layer
    cfg["num_hidden_layers"] = max(1, round((want - _embedding_params(base)) / per_layer))
    note = f"{family} {label} shape scaled to {cfg['num_hidden_layers']} layers"
    return from_config(cfg, name=text.strip(), kind="size", note=note)


def _embedding_params(m: ModelInfo) -> int:
    return sum(math.prod(t.shape) for t in m.tensors if not t.name.startswith("blk."))
