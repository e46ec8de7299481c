"""The quantization plan: every tensor's destination type, what decided it, and its size, in llama.cpp's
output order (llama_model_quantize_impl in llama.cpp src/llama-quant.cpp).

The tensors as the policy sees them (TensorSpec), the model facts it reads (Hparams), and the walk that
applies rules.py's decisions in llama.cpp's order and records them (plan_quantization). A TensorPlan's
meaning is in its fields (kind, fallback); its reason is text for people.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..errors import QuantizeError
from ..gguf.types import FLOAT_TYPES
from ..gguf.types import GGMLQuantizationType as T
from .levels import Level, block_size, level, parse_ggml_type, row_bytes
from .rules import (
    Choice,
    Mixer,
    TensorKind,
    category,
    fallback_note,
    fallback_type,
    not_quantized_reason,
    order_key,
    parse_patterns,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SUPPORTED_ARCHS",
    "Hparams",
    "Plan",
    "TensorKind",
    "TensorPlan",
    "TensorSpec",
    "hparams_from_gguf",
    "plan_for_gguf",
    "plan_quantization",
]

# -- model facts ------------------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
    """A tensor as the policy sees it. shape is in ggml order: shape[0] = ne0 = row length. nbytes: its
    bytes in the source file when known (a tensor copied verbatim keeps them, whatever its type)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: T
    nbytes: int | None = None


# Dense llama-family architectures whose quantization rules are covered by tests against llama.cpp.
# (Mistral 7B-style models are "llama" in GGUF; "mistral3" is llama.cpp's own arch for Ministral 3.)
SUPPORTED_ARCHS = ("llama", "mistral3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


class Hparams(NamedTuple):
    """The model facts the rules read (llama.cpp's hparams; head counts of layer 0)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    n_embd: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, set by the arch loaders (models/llama.cpp, models/qwen2.cpp)."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return self.arch == "qwen2" and self.n_layer == 80


def _first(value):
    """A per-layer array KV (head counts may be one per layer) -> the value for layer 0."""
    np = sys.modules.get("numpy")  # a numpy array value means numpy is loaded (it is not imported here)
    if isinstance(value, (list, tuple)) or (np is not None and isinstance(value, np.ndarray)):
        return int(value[0]) if len(value) else 0
    return int(value)


def hparams_from_gguf(model) -> Hparams:
    """Hparams from a ggufkit.gguf.reader.GGUFModel (keys <arch>.block_count, .attention.head_count, ...)."""
    arch = model.architecture
    if arch not in SUPPORTED_ARCHS:
        raise QuantizeError(
            f"architecture {arch!r} is not supported for quantization; supported: "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )

    def get(key: str, default=None):
        value = model.get(f"{arch}.{key}", default)
        if value is None:
            raise QuantizeError(f"{model.path}: missing metadata key {arch}.{key}")
        try:
            return _first(value)
        except (TypeError, ValueError):
            raise QuantizeError(
                f"{model.path}: metadata key {arch}.{key} is not an integer: {value!r}"
            ) from None

    n_head = get("attention.head_count", 0)
    return Hparams(
        arch=arch,
        n_layer=get("block_count"),
        n_head=n_head,
        n_head_kv=get("attention.head_count_kv", n_head),
        n_expert=get("expert_count", 0),
        n_embd=get("embedding_length", 0),
    )


# -- the plan ---------------------------------------------------------------------------------------------


class TensorPlan(NamedTuple):
    """One tensor's fate: its destination type, what decided it (kind) and, when the row length forced
    another type than the rules chose, the (wanted, used) pair. reason: the same, as text for people."""

    name: str
    shape: tuple[int, ...]
    src_type: T
    dst_type: T
    reason: str
    kind: TensorKind
    quantize: bool  # False: the source bytes are copied verbatim
    use_importance: bool  # an imatrix entry is passed to the quantizer for this tensor
    nbytes: int  # destination bytes, without the 32-byte padding
    requires_imatrix: bool = False  # llama.cpp refuses to quantize it without an imatrix entry (Q2_K_S)
    # (wanted, used) when tensor_type_fallback changed the type; kept when `used` is the source type and the
    # tensor is then copied (kind COPY), as llama.cpp still counts that fallback
    fallback: tuple[T, T] | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def fallback_note(self) -> str:
        """The fallback as shown to users ("fallback Q4_K -> Q5_0: row 576 not a multiple of 256"), or ""."""
        return fallback_note(*self.fallback, self.shape[0]) if self.fallback else ""


class Plan(NamedTuple):
    level: Level
    tensors: list[TensorPlan]  # in llama.cpp's output order
    n_fallback: int  # llama.cpp's count of row-length fallbacks (its "N of M tensor(s)" warning)
    has_imatrix: bool = False

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' destination sizes, unpadded (llama-quantize's "quant size")."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.n_elements if self.n_elements else 0.0

    def fallbacks(self) -> list[TensorPlan]:
        """Tensors quantized to another type than the rules chose because of their row length."""
        return [t for t in self.tensors if t.kind is TensorKind.FALLBACK]

    def missing_imatrix(self) -> list[TensorPlan]:
        """Tensors llama.cpp will not quantize without an imatrix entry (it stops with an error)."""
        return [t for t in self.tensors if t.quantize and t.requires_imatrix and not t.use_importance]

    def check_imatrix_requirement(self) -> None:
        """Raise QuantizeError as a real llama-quantize run would (a dry run only warns)."""
        missing = self.missing_imatrix()
        if missing:
            t = missing[0]
            raise QuantizeError(
                f"{self.level.name} needs an importance matrix (--imatrix) for {t.name} "
                f"({t.dst_type.name}); {len(missing)} tensor(s) have none"
            )


def plan_quantization(
    tensors: Sequence[TensorSpec],
    hparams: Hparams,
    level_name: str,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    output_tensor_type=None,
    token_embedding_type=None,
    tensor_types: Sequence = (),
    pure: bool = False,
    leave_output_tensor: bool = False,
) -> Plan:
    """The per-tensor plan llama-quantize would follow for these tensors at `level_name`.

    imatrix: the importance vectors by tensor name as llama-quantize passes them (after
    --include/--exclude-weights); its presence alone changes some choices (Q4_0/Q5_0/IQ4 ffn_down). An
    empty mapping counts as none, as in llama-quantize. A vector whose size does not match its tensor
    (ne0, times the experts of a 3-D tensor) raises QuantizeError, except for token_embd (it is then just
    not used), like llama.cpp does for the tensors it quantizes.
    """
    lv = level(level_name)
    out_t = parse_ggml_type(output_tensor_type) if output_tensor_type is not None else None
    emb_t = parse_ggml_type(token_embedding_type) if token_embedding_type is not None else None
    patterns = parse_patterns(tensor_types)
    imatrix = imatrix if imatrix else None
    specs = sorted(tensors, key=lambda s: order_key(s.name))
    mixer = Mixer(
        lv, hparams, [s.name for s in specs], has_imatrix=imatrix is not None, output_tensor_type=out_t
    )
    default = lv.default_type
    default_is_quantized = default not in FLOAT_TYPES
    n_fallback = 0
    plans = []
    for spec in specs:
        src = T(spec.ggml_type)
        shape = tuple(int(d) for d in spec.shape)
        cat = category(spec.name)
        why_not = not_quantized_reason(spec, leave_output_tensor)
        fallback = None
        if why_not is not None:
            choice = Choice(src, TensorKind.COPY, why_not)
        elif emb_t is not None and cat == "token_embd":
            choice = Choice(emb_t, TensorKind.OVERRIDE, f"--token-embedding-type {emb_t.name}")
        elif out_t is not None and cat == "output":
            choice = Choice(out_t, TensorKind.OVERRIDE, f"--output-tensor-type {out_t.name}")
        elif not default_is_quantized:
            choice = Choice(default, TensorKind.DEFAULT)
        else:
            hit = next(((p, t) for rx, p, t in patterns if rx.search(spec.name)), None)
            if hit is not None:
                choice = Choice(hit[1], TensorKind.OVERRIDE, f"--tensor-type {hit[0]}={hit[1].name.lower()}")
            elif not pure:
                choice = mixer.choose(spec, cat, default)
            else:
                choice = Choice(default, TensorKind.DEFAULT)
            used = fallback_type(choice.type, shape[0])
            if used is not None:
                fallback = (choice.type, used)
        dst, kind, reason = choice.type, choice.kind, choice.reason(lv.name)
        if fallback is not None:
            n_fallback += 1
            dst, kind = fallback[1], TensorKind.FALLBACK
            reason = f"{reason}; {fallback_note(*fallback, shape[0])}"
        quantize = dst != src
        if quantize and shape[0] % block_size(dst) != 0:
            raise QuantizeError(
                f"{spec.name}: type {dst.name} needs rows that are a multiple of "
                f"{block_size(dst)}, the tensor's rows have {shape[0]} elements ({reason})"
            )
        if not quantize and kind is not TensorKind.COPY:
            reason, kind = f"copy: already {src.name} ({reason})", TensorKind.COPY
        vector = None
        if imatrix is not None and quantize:
            from .imatrix import (
                match_tensor,  # only with an imatrix: ggufkit.quantize.imatrix imports gguf-py
            )

            vector = match_tensor(imatrix, spec.name, shape)
        requires = dst == T.Q2_K and lv.name == "Q2_K_S" and cat not in ("token_embd", "output")
        n_rows = math.prod(shape[1:]) if len(shape) > 1 else 1
        copied_bytes = spec.nbytes if not quantize else None
        plans.append(
            TensorPlan(
                name=spec.name,
                shape=shape,
                src_type=src,
                dst_type=dst,
                reason=reason,
                kind=kind,
                quantize=quantize,
                use_importance=vector is not None,
                nbytes=copied_bytes if copied_bytes is not None else row_bytes(dst, shape[0]) * n_rows,
                requires_imatrix=requires,
                fallback=fallback,
            )
        )
    return Plan(level=lv, tensors=plans, n_fallback=n_fallback, has_imatrix=imatrix is not None)


def plan_for_gguf(model, level_name: str, **options) -> Plan:
    """plan_quantization for an open ggufkit.gguf.reader.GGUFModel."""
    specs = [TensorSpec(t.name, tuple(t.shape), T(t.ggml_type), t.nbytes) for t in model.tensors]
    return plan_quantization(specs, hparams_from_gguf(model), level_name, **options)
