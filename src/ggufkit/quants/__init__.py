"""Block formats: quantize and dequantize every llama.cpp weight type, byte-identical to libggml."""

from .registry import BlockFormat, dequantize, formats, get_format, quantize, row_bytes

__all__ = ["BlockFormat", "dequantize", "formats", "get_format", "quantize", "row_bytes"]
