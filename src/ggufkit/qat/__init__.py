"""Quantization-aware training: llama.cpp's block formats as a differentiable torch op.

    fake_quantize(w, "Q4_K", importance=None)   dequantize(quantize(w)) bit for bit, straight-through grads

The only package of ggufkit that imports torch (the optional extra: pip install 'ggufkit[qat]'); nothing
outside it imports this package, so `import ggufkit` and every other command stay torch-free.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs torch
    raise ImportError("ggufkit.qat needs torch: pip install 'ggufkit[qat]'") from None

from .fake import FakeQuantize, fake_quantize

__all__ = ["FakeQuantize", "fake_quantize"]
