"""llama-quantize's levels (its TYPE argument) and the ggml tensor types a plan may target.

A level is a llama_ftype: its id (written as general.file_type) and its default tensor type
(llama_ftype_get_default_type in llama.cpp src/llama-quant.cpp); the per-tensor rules are in rules.py.
Block facts (elements per block, bytes per row) come from the block format registry (quants/registry.py),
which imports numpy only inside its array functions, so planning never loads it.
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import QuantizeError
from ..gguf.types import GGMLQuantizationType as T
from ..quants.registry import FORMATS, get_format
from ..quants.registry import row_bytes as _registry_row_bytes


class Level(NamedTuple):
    """A llama-quantize TYPE: its llama_ftype (written as general.file_type) and default tensor type."""

    name: str
    ftype_id: int
    default_type: T
    description: str


def _levels() -> dict[str, Level]:
    rows = [  # name, llama_ftype (include/llama.h), default type (llama_ftype_get_default_type), usage text
        ("Q4_0", 2, T.Q4_0, "4.34G, +0.4685 ppl @ Llama-3-8B"),
        ("Q4_1", 3, T.Q4_1, "4.78G, +0.4511 ppl @ Llama-3-8B"),
        ("Q5_0", 8, T.Q5_0, "5.21G, +0.1316 ppl @ Llama-3-8B"),
        ("Q5_1", 9, T.Q5_1, "5.65G, +0.1062 ppl @ Llama-3-8B"),
        ("Q2_K", 10, T.Q2_K, "2.96G, +3.5199 ppl @ Llama-3-8B"),
        ("Q2_K_S", 21, T.Q2_K, "2.96G, +3.1836 ppl @ Llama-3-8B"),
        ("Q3_K_S", 11, T.Q3_K, "3.41G, +1.6321 ppl @ Llama-3-8B"),
        ("Q3_K_M", 12, T.Q3_K, "3.74G, +0.6569 ppl @ Llama-3-8B"),
        ("Q3_K_L", 13, T.Q3_K, "4.03G, +0.5562 ppl @ Llama-3-8B"),
        ("IQ4_NL", 25, T.IQ4_NL, "4.50 bpw non-linear quantization"),
        ("IQ4_XS", 30, T.IQ4_XS, "4.25 bpw non-linear quantization"),
        ("Q4_K_S", 14, T.Q4_K, "4.37G, +0.2689 ppl @ Llama-3-8B"),
        ("Q4_K_M", 15, T.Q4_K, "4.58G, +0.1754 ppl @ Llama-3-8B"),
        ("Q5_K_S", 16, T.Q5_K, "5.21G, +0.1049 ppl @ Llama-3-8B"),
        ("Q5_K_M", 17, T.Q5_K, "5.33G, +0.0569 ppl @ Llama-3-8B"),
        ("Q6_K", 18, T.Q6_K, "6.14G, +0.0217 ppl @ Llama-3-8B"),
        ("Q8_0", 7, T.Q8_0, "7.96G, +0.0026 ppl @ Llama-3-8B"),
        ("F16", 1, T.F16, "14.00G, +0.0020 ppl @ Mistral-7B"),
        ("BF16", 32, T.BF16, "14.00G, -0.0050 ppl @ Mistral-7B"),
        ("F32", 0, T.F32, "26.00G @ 7B"),
    ]
    return {name: Level(name, ftype, default, text) for name, ftype, default, text in rows}


LEVELS: dict[str, Level] = _levels()
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # llama-quantize's "alias for ..."


def level(name: str) -> Level:
    """The level for a llama-quantize TYPE name (case-insensitive, aliases Q3_K/Q4_K/Q5_K) or ftype number."""
    key = str(name).strip().upper()
    key = _ALIASES.get(key, key)
    if key in LEVELS:
        return LEVELS[key]
    if key.isdecimal():  # not isdigit: int() refuses digits such as "²"
        for lv in LEVELS.values():
            if lv.ftype_id == int(key):
                return lv
    known = ", ".join([*LEVELS, *_ALIASES])
    raise QuantizeError(f"unknown quantization type {name!r}; known: {known}")


# Tensor types a plan may target: the block formats ggufkit has kernels for (the registry's FORMATS), which
# include every type the levels above produce and the row-length fallbacks lead to.
TARGET_TYPES = frozenset(f.ggml_type for f in FORMATS.values())


def parse_ggml_type(value) -> T:
    """A ggml tensor type from a name as llama-quantize takes it ("q8_0", "Q6_K"; case-insensitive), an id
    or a GGMLQuantizationType; it must be one ggufkit can write."""
    if isinstance(value, T):
        qt = value
    else:
        text = str(value).strip()
        try:
            qt = T(int(text)) if text.isdigit() else T[text.upper()]
        except (KeyError, ValueError):
            raise QuantizeError(
                f"unknown ggml type {value!r}; supported: {', '.join(t.name for t in sorted(TARGET_TYPES))}"
            ) from None
    if qt not in TARGET_TYPES:
        raise QuantizeError(
            f"ggml type {qt.name} is not supported by ggufkit; supported: "
            f"{', '.join(t.name for t in sorted(TARGET_TYPES))}"
        )
    return qt


def block_size(qt: T) -> int:
    """Elements per block of a target type (ggml_blck_size), from the registry."""
    return get_format(qt).block_size


def row_bytes(qt: T, n_per_row: int) -> int:
    """ggml_row_size of a target type, from the registry; the row must be a whole number of blocks."""
    try:
        return _registry_row_bytes(qt, n_per_row)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
