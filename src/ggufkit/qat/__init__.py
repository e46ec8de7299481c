"""Quantization-aware training: llama.cpp's block formats as a differentiable torch op.

    fake_quantize(w, "Q4_K", importance=None)   dequantize(quantize(w)) bit for bit, straight-through grads
    prepare(model, "Q4_K_M")                    a transformers model's weights fake-quantized as convert
                                                at that level will store them; finish(model) before saving
    train(hf_dir, out_dir, level="Q4_0")        the recipe: self-distillation on calibration text through
                                                the level's types, checkpointed, resumable (`ggufkit qat`)

The only package of ggufkit that imports torch (the optional extra: pip install 'ggufkit[qat]'); nothing
outside it imports this package, so `import ggufkit` and every other command stay torch-free.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs torch
    raise ImportError("ggufkit.qat needs torch: pip install 'ggufkit[qat]'") from None

from .fake import FakeQuantize, fake_quantize
from .prepare import Prepared, finish, plan_model, prepare
from .train import TrainResult, train

__all__ = [
    "FakeQuantize",
    "Prepared",
    "TrainResult",
    "fake_quantize",
    "finish",
    "plan_model",
    "prepare",
    "train",
]
