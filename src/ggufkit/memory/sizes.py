"""A bare size ("7B", "135M", "qwen2:1.5B") -> the architecture family's typical shape (the _SHAPES table),
scaled in depth when no typical shape is near the size asked."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import MemoryEstimateError
from .hf_config import HF_CLASS, from_config
from .model import ModelInfo

# Typical shapes by family, as the published config.json files give them (shapes.json): a bare size resolves
# to the nearest one.
_TABLE = json.loads(Path(__file__).with_name("shapes.json").read_text(encoding="utf-8"))
_SHAPES = {family: entry["sizes"] for family, entry in _TABLE["families"].items()}
_FAMILY_ARCH = {family: entry["architecture"] for family, entry in _TABLE["families"].items()}
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
    return {
        "architectures": [HF_CLASS[_FAMILY_ARCH[family]]],
        **dict(zip(_TABLE["fields"], _SHAPES[family][label])),
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
