"""Float formats F32, F16, BF16 (ggml_fp32_to_fp16_row / ggml_fp32_to_bf16_row_ref).

F16: IEEE round-to-nearest-even, which numpy's astype(float16) is bit for bit (|x| >= 65520 -> inf,
NaN keeps its sign as 0x7E00|sign). BF16: NaN -> (bits >> 16) | 0x40 (quiet, sign kept); otherwise
round-to-nearest-even on the top 16 bits. None of them use importance weights.
"""

from __future__ import annotations

import numpy as np

from .registry import register


def _quantize_f32(x: np.ndarray, importance) -> np.ndarray:
    return x.view(np.uint8).copy()


def _dequantize_f32(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return data.view(np.float32).copy()


def _quantize_f16(x: np.ndarray, importance) -> np.ndarray:
    h = x.astype(np.float16)
    bits = h.view(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # ggml: 0x7E00 with the input's sign, whatever the payload
        bits[nan] = (x.view(np.uint32)[nan] >> 16).astype(np.uint16) & np.uint16(0x8000) | np.uint16(0x7E00)
    return bits.view(np.uint8)


def _dequantize_f16(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return data.view(np.float16).astype(np.float32)


def _quantize_bf16(x: np.ndarray, importance) -> np.ndarray:
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.view(np.uint8)


def _dequantize_bf16(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


register("F32", quantize_rows=_quantize_f32, dequantize_rows=_dequantize_f32, uses_importance=False)
register("F16", quantize_rows=_quantize_f16, dequantize_rows=_dequantize_f16, uses_importance=False)
register("BF16", quantize_rows=_quantize_bf16, dequantize_rows=_dequantize_bf16, uses_importance=False)
