"""The hyper-parameters of a GGUF model as the engine reads them: ModelArgs from the {arch}.* metadata keys,
unknown keys ignored, for the llama family (llama, qwen2, qwen3); an architecture with keys of its own
subclasses it (engine/gemma3.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import EvalError
from ..gguf.reader import GGUFModel

__all__ = ["ARCHITECTURES", "ModelArgs"]

# Architecture -> NeoX rope (rotate halves) instead of llama's adjacent pairs (llama_model_rope_type).
ARCHITECTURES = {"llama": False, "qwen2": True, "qwen3": True}


@dataclass
class ModelArgs:
    """Hyper-parameters from GGUF metadata ({arch}.* keys). Unknown keys are ignored."""

    architecture: str
    block_count: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int = 0
    key_length: int = 0  # head dim; 0 -> embedding_length // head_count
    value_length: int = 0
    rope_dimension_count: int = 0  # 0 -> key_length
    rope_freq_base: float = 10000.0
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    layer_norm_rms_epsilon: float = 1e-5
    vocab_size: int = 0
    expert_count: int = 0
    expert_used_count: int = 0
    expert_weights_scale: float = 0.0
    rope_neox: bool = False

    # the architectures these arguments describe -> NeoX rope (a subclass names its own)
    ARCHITECTURES: ClassVar[dict[str, bool]] = ARCHITECTURES

    def __post_init__(self):
        if not self.head_count_kv:
            self.head_count_kv = self.head_count
        if not self.key_length:
            self.key_length = self.embedding_length // self.head_count
        if not self.value_length:
            self.value_length = self.key_length
        if not self.rope_dimension_count:
            self.rope_dimension_count = self.key_length

    @classmethod
    def from_gguf(cls, model: GGUFModel) -> ModelArgs:
        arch = model.architecture
        if arch not in cls.ARCHITECTURES:
            raise EvalError(
                f"{model.path}: architecture {arch!r} is not supported by the built-in engine "
                f"(supported: {', '.join(cls.ARCHITECTURES)})"
            )
        prefix = f"{arch}."
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, object] = {"architecture": arch, "rope_neox": cls.ARCHITECTURES[arch]}
        for key, kv in model.kv.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :].replace(".", "_").replace("attention_", "")
            if name in fields and not isinstance(kv.value, (list, np.ndarray)):
                values[name] = kv.value
        if "vocab_size" not in values:
            tokens = model.get("tokenizer.ggml.tokens")
            embd = next((t.shape[1] for t in model.tensors if t.name == "token_embd.weight"), 0)
            values["vocab_size"] = len(tokens) if tokens is not None else embd
        missing = [
            n
            for n in ("block_count", "embedding_length", "feed_forward_length", "head_count")
            if n not in values
        ]
        if missing:
            raise EvalError(f"{model.path}: metadata lacks {', '.join(prefix + m for m in missing)}")
        return cls(**values)

    @property
    def freq_scale(self) -> float:
        if self.rope_scaling_type == "linear" and self.rope_scaling_factor:
            return 1.0 / self.rope_scaling_factor
        if self.rope_scaling_type not in ("none", "linear"):
            raise EvalError(
                f"rope scaling {self.rope_scaling_type!r} is not supported by the built-in engine "
                "(supported: none, linear)"
            )
        return 1.0
