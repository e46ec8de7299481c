"""Block formats: quantize and dequantize every llama.cpp weight type, byte-identical to libggml."""

from .registry import (
    BlockFormat,
    backend,
    dequantize,
    formats,
    get_format,
    get_threads,
    max_threads,
    quantize,
    row_bytes,
    set_backend,
    set_threads,
)

__all__ = [
    "BlockFormat",
    "backend",
    "dequantize",
    "formats",
    "get_format",
    "get_threads",
    "max_threads",
    "quantize",
    "row_bytes",
    "set_backend",
    "set_threads",
]
