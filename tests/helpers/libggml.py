"""libggml from llama-cpp-python==0.3.36, called through ctypes: the reference for every block format.

`ggml_quantize(x, type, importance)` runs ggml_quantize_chunk (what llama-quantize calls per row chunk);
`ggml_dequantize(data, type, shape)` runs the type's to_float from ggml_get_type_traits.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@cache
def libggml() -> ctypes.CDLL:
    d = lib_dir()
    ctypes.CDLL(str(d / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(d / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def _qt(qtype) -> GGMLQuantizationType:
    return GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else GGMLQuantizationType(qtype)


def ggml_quantize(x: np.ndarray, qtype, importance: np.ndarray | None = None) -> np.ndarray:
    qt = _qt(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_per_row = x.shape
    blck, tsize = GGML_QUANT_SIZES[qt]
    out = np.zeros((n_rows, n_per_row // blck * tsize), dtype=np.uint8)
    imp = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        imp = importance.ctypes.data
    n = libggml().ggml_quantize_chunk(int(qt), x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imp)
    assert n == out.nbytes, (n, out.nbytes)
    return out


def ggml_dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    qt = _qt(qtype)
    data = np.ascontiguousarray(data).view(np.uint8)
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    traits = libggml().ggml_get_type_traits(int(qt)).contents
    if qt == GGMLQuantizationType.F32:
        out[:] = data.view(np.float32).reshape(-1)
    else:
        _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data, n)
    return out.reshape(shape)
