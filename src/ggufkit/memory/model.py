"""What the estimate knows about a model (ModelInfo), however it was found, and the per-layer rules that
several sources share (per-layer hparams, which layers use a sliding window)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MemoryEstimateError


@dataclass
class ModelInfo:
    """What the estimate needs to know about a model. Per-layer lists have one entry per layer."""

    name: str
    kind: str  # "gguf", "hf" (a checkpoint folder), "config" (a config.json alone) or "size"
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: list[int]  # 0 for a layer without attention
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 0
    n_merges: int = 0  # BPE merge rules of the tokenizer (0 for SentencePiece vocabularies)
    n_swa: int = 0
    is_swa: list[bool] = field(default_factory=list)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    tensors: list = field(default_factory=list, repr=False)  # quantize.plan.TensorSpec, source types
    file_tensors: list = field(
        default_factory=list, repr=False
    )  # a GGUF's (name, shape, type, nbytes, offset)
    file_type: str = "F16"  # what the tensors are as given ("as is")
    path: Path | None = None
    note: str = ""  # how a bare size was resolved
    plans: dict = field(default_factory=dict, repr=False)  # level -> planned tensors (cache)
    weights_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def hparams(self):
        from ..quantize.plan import Hparams

        return Hparams(
            arch=self.arch,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv[0] if self.n_head_kv else 0,
            n_expert=self.n_expert,
            n_embd=self.n_embd,
        )


def per_layer(value, n_layer: int, what: str) -> list[int]:
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        values = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
        if len(values) != n_layer:
            raise MemoryEstimateError(f"{what} has {len(values)} entries for {n_layer} layers")
        return values
    return [int(value)] * n_layer


_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "llama4": 4, "cohere2": 4}


def swa_layers(arch: str, n_layer: int, n_swa: int, pattern) -> list[bool]:
    """Which layers use the sliding window (llama_hparams::set_swa_pattern and the arch loaders)."""
    if not n_swa:
        return [False] * n_layer
    if isinstance(pattern, (list, tuple)) or hasattr(pattern, "tolist"):
        values = [bool(v) for v in (pattern.tolist() if hasattr(pattern, "tolist") else pattern)]
        if len(values) == n_layer:
            return values
    # a pattern n from the GGUF, else the arch loader's default (src/models/<arch>.cpp load_swa_pattern);
    # n = 0 means every layer. Other archs are taken as having no SWA layer (the larger, safe estimate).
    if isinstance(pattern, int):
        n_pattern = pattern
    elif arch in _SWA_PATTERN:
        n_pattern = _SWA_PATTERN[arch]
    else:
        return [False] * n_layer
    if n_pattern == 0:
        return [True] * n_layer
    return [il % n_pattern < n_pattern - 1 for il in range(n_layer)]


def describe(model: ModelInfo) -> str:
    """One line of the model facts the estimate used."""
    kv = sorted(set(model.n_head_kv))
    kv_text = "/".join(map(str, kv))
    swa = f", SWA {model.n_swa} on {sum(model.is_swa)} layers" if model.n_swa and any(model.is_swa) else ""
    moe = f", {model.n_expert} experts ({model.n_expert_used} used)" if model.n_expert else ""
    how = f" [{model.note}]" if model.note else ""
    return (
        f"{model.name}{how}: {model.arch}, {model.n_params / 1e9:.2f}B params, {model.n_layer} layers, "
        f"{model.n_embd} wide, {model.n_head} heads / {kv_text} KV x {model.head_dim_k}, ffn {model.n_ff}, "
        f"vocab {model.n_vocab}{swa}{moe}; tensors {model.file_type}"
    )
