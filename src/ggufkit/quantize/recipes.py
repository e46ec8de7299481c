"""Per-tensor type policy of `ggufkit quantize`: llama-quantize's levels and its rules, as a plan.

Pure policy: tensor names, shapes and types in, a `Plan` out (each tensor's destination type, why, and
its size). No tensor data is read and nothing here knows a bit layout; block sizes come from
ggml_types' table (the block format registry's source), so planning imports neither the kernels nor numpy.

Reference: llama.cpp src/llama-quant.cpp (llama_tensor_get_type, llama_tensor_get_type_impl,
tensor_type_fallback, tensor_allows_quantization) and tools/quantize/quantize.cpp, as vendored in
llama-cpp-python 0.3.36. The decisions, in llama.cpp's order, for each tensor:
  1. tensors that are never quantized keep their type (1-D, norms, names not ending in "weight", ...);
  2. --token-embedding-type / --output-tensor-type win for token_embd / output.weight, with no fallback;
  3. only for a quantized level: the first --tensor-type pattern that matches (regex search on the name),
     else (unless --pure) the level's mixture rules; then the row-length fallback.
Quirks kept on purpose:
  - "layer index" of the attn_v / ffn_down rules is a visiting counter over the sorted tensor list that
    advances only when the mixture rules run, so a --tensor-type override of one attn_v shifts the
    more-bits layers of the later ones (dense models; MoE models parse the layer from the name);
  - the output rule tests the row length against the *level's* default block size, then picks Q6_K,
    which the fallback may turn into Q8_0 (and that counts as a fallback);
  - attn_qkv counts as "attn_v-like", so the attn_v branch catches it and llama.cpp's own attn_qkv branch
    is never reached;
  - with tied embeddings (no tensor named output.weight) token_embd follows the output rule.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import QuantizeError
from ..gguf.types import FLOAT_TYPES, GGML_QUANT_SIZES
from ..gguf.types import GGMLQuantizationType as T
from ..gguf.writer import n_dims

if TYPE_CHECKING:
    import numpy as np

# -- levels -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
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
    if key.isdigit():
        for lv in LEVELS.values():
            if lv.ftype_id == int(key):
                return lv
    known = ", ".join([*LEVELS, *_ALIASES])
    raise QuantizeError(f"unknown quantization type {name!r}; known: {known}")


# Tensor types a plan may target: those the levels above produce, plus what the override options can name
# among the formats ggufkit implements (the block kernels in ggufkit.quants).
TARGET_TYPES = frozenset(
    T[n] for n in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS".split()
)


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


def _block_size(qt: T) -> int:
    """Elements per block, from ggml_types' table (the block format registry's source; importing the
    registry would import numpy, which planning does not need)."""
    return GGML_QUANT_SIZES[qt][0]


def _row_bytes(qt: T, n_per_row: int) -> int:
    """ggml_row_size; the caller has checked that the row is a whole number of blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return n_per_row // block_size * type_size


# -- model facts ------------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    """A tensor as the policy sees it. shape is in ggml order: shape[0] = ne0 = row length."""

    name: str
    shape: tuple[int, ...]
    ggml_type: T


# Dense llama-family architectures whose quantization rules are covered by tests against llama.cpp.
# (Mistral 7B-style models are "llama" in GGUF; "mistral3" is llama.cpp's own arch for Ministral 3.)
SUPPORTED_ARCHS = ("llama", "mistral3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


@dataclass
class Hparams:
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


@dataclass
class TensorPlan:
    """One tensor's fate. kind: "copy" (bytes copied verbatim), "default" (the level's type), "mix" (a
    mixture rule), "fallback" (row length forced another type), "override" (a command-line option)."""

    name: str
    shape: tuple[int, ...]
    src_type: T
    dst_type: T
    reason: str
    kind: str
    quantize: bool  # False: the source bytes are copied verbatim
    use_importance: bool  # an imatrix entry is passed to the quantizer for this tensor
    nbytes: int  # destination bytes, without the 32-byte padding
    requires_imatrix: bool = False  # llama.cpp refuses to quantize it without an imatrix entry (Q2_K_S)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
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


def _layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.") as llama.cpp's weight_name_comparer does; -1 when it does not parse."""
    m = re.match(r"blk\.\s*([+-]?\d+)", name)
    if m is None:
        return -1
    value = int(m.group(1))
    return value if -(2**31) <= value < 2**31 else -1


def _order_key(name: str):
    return (_layer_of(name), name.encode("utf-8", "surrogateescape"))


# Substrings that keep a tensor out of quantization (tensor_allows_quantization), by the reason shown.
_NEVER = {
    "norm": "_norm.weight",
    "expert router": "ffn_gate_inp.weight ffn_gate_tid2eid.weight",
    "small": "altup laurel per_layer_model_proj ssm_conv1d shortconv.conv.weight indexer.k_proj.weight "
    "indexer.q_proj.weight attn_rel_b.weight",
    "rwkv": " ".join(
        f"time_mix_{s}.weight"
        for s in "first w0 w1 w2 v0 v1 v2 a0 a1 a2 g1 g2 decay_w1 decay_w2 lerp_fused".split()
    ),
    "multimodal": ".position_embd sam.pos_embd sam.neck. sam.net_ .rel_pos .patch_embd .patch_merger "
    "a.rvq.codebook mm.a.code_embd",
}
_NEVER_NEEDLES = [(needle, why) for why, needles in _NEVER.items() for needle in needles.split()]


def _not_quantized_reason(spec: TensorSpec, leave_output_tensor: bool) -> str | None:
    name = spec.name
    if n_dims(spec.shape) < 2:  # ggml_n_dims: a [576, 1] tensor is 1-D
        return "1-D"
    if not name.endswith("weight") and len(name) != 5:  # C: rfind("weight") == size() - 6, npos for size 5
        return "not a weight"
    if leave_output_tensor and name == "output.weight":
        return "--leave-output-tensor"
    if name in ("position_embd.weight", "token_types.weight"):
        return "positional embedding"
    return _first_match(name, _NEVER_NEEDLES)


# (substring, category) in tensor_get_category's order: the first match wins.
_CATEGORIES = [
    (f"{c}.weight" if c.startswith("attn") else c, c)
    for c in "attn_qkv attn_kv_b attn_v attn_k attn_q attn_output ffn_up ffn_gate ffn_down".split()
]


def _category(name: str) -> str:
    """tensor_get_category: exact names first, then the first matching substring."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return _first_match(name, _CATEGORIES) or "other"


def _first_match(name: str, table) -> str | None:
    """The value of the first (substring, value) in `table` whose substring occurs in `name` (the order is
    llama-quant.cpp's: the first match wins)."""
    for needle, value in table:
        if needle in name:
            return value
    return None


_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or _c_mod(i - n // 8, 3) == 2


def _c_mod(a: int, b: int) -> int:
    """C's % (the sign follows the dividend)."""
    return int(math.fmod(a, b))


class _Mixer:
    """llama_tensor_get_type_impl for the levels in LEVELS (the IQ1/IQ2/IQ3/TQ/MXFP4 branches are not
    reachable from them). State: the visiting counters and the tied-embeddings flag."""

    def __init__(
        self, lv: Level, hp: Hparams, names: Sequence[str], *, has_imatrix: bool, output_tensor_type: T | None
    ):
        self.lv, self.hp, self.f = lv, hp, lv.name
        self.has_imatrix = has_imatrix
        self.output_tensor_type = output_tensor_type
        self.n_attention_wv = sum(_category(n) in _ATTN_V_LIKE for n in names)
        self.n_ffn = hp.n_layer
        self.tied = "output.weight" not in names
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def _layer(self, counter: int, name: str) -> tuple[int, int]:
        if max(1, self.hp.n_expert) > 1:  # MoE: experts are not consecutive, the layer comes from the name
            m = re.match(r"blk\.\s*([+-]?\d+)", name)
            if m is None:
                raise QuantizeError(f"cannot determine the layer of tensor {name}")
            i = int(m.group(1))
            if not 0 <= i < self.n_ffn:
                raise QuantizeError(f"bad layer {i} for tensor {name}; must be in [0, {self.n_ffn})")
            return i, self.n_ffn
        return counter, self.n_ffn

    def choose(self, spec: TensorSpec, cat: str, new: T) -> tuple[T, str]:
        """(type, reason) for one tensor; `new` is the level's default type."""
        f, hp = self.f, self.hp
        tag = f"mix {f}"
        if cat == "output" or (self.tied and cat == "token_embd"):
            what = "output" if cat == "output" else "token_embd (tied to output)"
            if self.output_tensor_type is not None:
                return (
                    self.output_tensor_type,
                    f"--output-tensor-type {self.output_tensor_type.name} ({what})",
                )
            nx, qk = spec.shape[0], _block_size(new)
            if nx % qk != 0:
                return T.Q8_0, f"{tag}: {what}, row {nx} not a multiple of {qk} -> Q8_0"
            if new != T.Q8_0:
                return T.Q6_K, f"{tag}: {what} -> Q6_K"
            return new, f"default {new.name}"
        if cat == "token_embd":
            return new, f"default {new.name}"
        if cat in _ATTN_V_LIKE:
            i, n = self.i_attention_wv, self.n_attention_wv
            self.i_attention_wv += 1
            why = None
            if f == "Q2_K":
                new, why = (T.Q4_K, f"GQA {hp.n_gqa} >= 4") if hp.n_gqa >= 4 else (T.Q3_K, "")
            elif f == "Q2_K_S" and hp.n_gqa >= 4:
                new, why = T.Q4_K, f"GQA {hp.n_gqa} >= 4"
            elif f == "Q3_K_M":
                new, why = (T.Q5_K, f"one of the first 2 ({i})") if i < 2 else (T.Q4_K, "")
            elif f == "Q3_K_L":
                new, why = T.Q5_K, ""
            elif f in ("IQ4_NL", "IQ4_XS") and hp.n_gqa >= 4:
                new, why = T.Q5_K, f"GQA {hp.n_gqa} >= 4"
            elif f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
                new, why = T.Q6_K, f"more-bits layer {i}"
            elif f == "Q4_K_S" and i < 4:
                new, why = T.Q5_K, f"one of the first 4 ({i})"
            if hp.is_70b and new in (T.Q3_K, T.Q4_K):
                new, why = T.Q5_K, "70B model"
            if hp.n_expert == 8:
                new, why = T.Q8_0, "8 experts"
            return new, self._why(tag, cat, why, new)
        if cat == "attn_k":
            if hp.n_expert == 8:
                return T.Q8_0, f"{tag}: attn_k, 8 experts -> Q8_0"
            return new, f"default {new.name}"
        if cat == "ffn_down":
            i, n = self._layer(self.i_ffn_down, spec.name)
            self.i_ffn_down += 1
            why = None
            if f == "Q2_K":
                new, why = T.Q3_K, ""
            elif f == "Q2_K_S":
                if i < n // 8:
                    new, why = T.Q4_K, f"layer {i} < {n}/8"
            elif f == "Q3_K_M":
                new, why = (T.Q5_K, f"layer {i} < {n}/16") if i < n // 16 else (T.Q4_K, "")
            elif f == "Q3_K_L":
                new, why = T.Q5_K, ""
            elif f == "Q4_K_M":
                if _use_more_bits(i, n):
                    new, why = T.Q6_K, f"more-bits layer {i}"
            elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not self.has_imatrix:
                new, why = T.Q5_K, f"layer {i} < {n}/8, no imatrix"
            elif f == "Q5_K_M" and _use_more_bits(i, n):
                new, why = T.Q6_K, f"more-bits layer {i}"
            elif f == "Q4_K_S" and i < n // 8:
                new, why = T.Q5_K, f"layer {i} < {n}/8"
            elif f in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
                new, why = (T.Q4_1 if f == "Q4_0" else T.Q5_1), f"layer {i} < {n}/8, with imatrix"
            return new, self._why(tag, cat, why, new)
        if cat == "attn_output":
            why = None
            if hp.n_expert == 8:
                if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    new, why = T.Q5_K, "8 experts"
            elif f == "Q2_K":
                new, why = T.Q3_K, ""
            elif f == "Q3_K_M":
                new, why = T.Q4_K, ""
            elif f == "Q3_K_L":
                new, why = T.Q5_K, ""
            return new, self._why(tag, cat, why, new)
        if cat == "ffn_gate":  # only IQ3_XS has a rule; the counter still advances
            self._layer(self.i_ffn_gate, spec.name)
            self.i_ffn_gate += 1
        elif cat == "ffn_up":
            self._layer(self.i_ffn_up, spec.name)
            self.i_ffn_up += 1
        return new, f"default {new.name}"

    @staticmethod
    def _why(tag: str, cat: str, why: str | None, new: T) -> str:
        if why is None:
            return f"default {new.name}"
        return f"{tag}: {cat}{' ' + why if why else ''} -> {new.name}"


def _fallback(qt: T, ncols: int) -> T | None:
    """tensor_type_fallback: the type to use when ncols is not a multiple of qt's block (None: it is)."""
    qk = _block_size(qt)
    if ncols % qk == 0:
        return None
    if qt in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS):
        out = T.IQ4_NL
    elif qt in (T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0) or qt.name == "Q2_0":
        out = T.Q4_0
    elif qt == T.Q4_K:
        out = T.Q5_0
    elif qt == T.Q5_K:
        out = T.Q5_1
    elif qt == T.Q6_K:
        out = T.Q8_0
    elif qk <= 32:
        out = qt
    else:
        raise QuantizeError(f"no tensor type fallback is defined for type {qt.name}")
    return out if ncols % _block_size(out) == 0 else T.F16


def _parse_patterns(tensor_types) -> list[tuple[re.Pattern, str, T]]:
    """--tensor-type PATTERN=TYPE options (strings or (pattern, type) pairs). As llama-quantize does, the
    pattern is lower-cased; it is searched (std::regex_search, ECMAScript) in the tensor name."""
    out = []
    for item in tensor_types:
        if isinstance(item, str):
            pattern, sep, tname = item.partition("=")
            if not sep:
                raise QuantizeError(f"malformed --tensor-type {item!r}: expected PATTERN=TYPE")
        else:
            pattern, tname = item
        if not pattern:
            raise QuantizeError(f"--tensor-type {item!r}: missing tensor name")
        if not str(tname):
            raise QuantizeError(f"--tensor-type {item!r}: missing quantization type")
        pattern = pattern.lower()
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise QuantizeError(f"--tensor-type {pattern!r}: bad regular expression ({e})") from None
        out.append((rx, pattern, parse_ggml_type(tname)))
    return out


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
    patterns = _parse_patterns(tensor_types)
    imatrix = imatrix if imatrix else None
    specs = sorted(tensors, key=lambda s: _order_key(s.name))
    mixer = _Mixer(
        lv, hparams, [s.name for s in specs], has_imatrix=imatrix is not None, output_tensor_type=out_t
    )
    default = lv.default_type
    default_is_quantized = default not in FLOAT_TYPES
    n_fallback = 0
    plans = []
    for spec in specs:
        src = T(spec.ggml_type)
        shape = tuple(int(d) for d in spec.shape)
        cat = _category(spec.name)
        why_not = _not_quantized_reason(spec, leave_output_tensor)
        kind = "default"
        if why_not is not None:
            dst, reason, kind = src, f"not quantized: {why_not}", "copy"
        elif emb_t is not None and cat == "token_embd":
            dst, reason, kind = emb_t, f"--token-embedding-type {emb_t.name}", "override"
        elif out_t is not None and cat == "output":
            dst, reason, kind = out_t, f"--output-tensor-type {out_t.name}", "override"
        else:
            dst, reason = default, f"default {default.name}"
            if default_is_quantized:
                hit = next(((p, t) for rx, p, t in patterns if rx.search(spec.name)), None)
                if hit is not None:
                    dst, reason, kind = hit[1], f"--tensor-type {hit[0]}={hit[1].name.lower()}", "override"
                elif not pure:
                    dst, reason = mixer.choose(spec, cat, default)
                    if reason.startswith("--"):
                        kind = "override"
                    elif not reason.startswith("default"):
                        kind = "mix"
                to = _fallback(dst, shape[0])
                if to is not None:
                    n_fallback += 1
                    qk = _block_size(dst)
                    reason = (
                        f"{reason}; fallback {dst.name} -> {to.name}: row {shape[0]} not a multiple of {qk}"
                    )
                    dst, kind = to, "fallback"
        if shape[0] % _block_size(dst) != 0:
            raise QuantizeError(
                f"{spec.name}: type {dst.name} needs rows that are a multiple of "
                f"{_block_size(dst)}, the tensor's rows have {shape[0]} elements ({reason})"
            )
        quantize = dst != src
        if not quantize and kind != "copy":
            reason, kind = f"copy: already {src.name} ({reason})", "copy"
        vector = None
        if imatrix is not None and quantize:
            from .imatrix import (
                match_tensor,  # only with an imatrix: ggufkit.quantize.imatrix imports gguf-py
            )

            vector = match_tensor(imatrix, spec.name, shape)
        requires = dst == T.Q2_K and lv.name == "Q2_K_S" and cat not in ("token_embd", "output")
        n_rows = math.prod(shape[1:]) if len(shape) > 1 else 1
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
                nbytes=_row_bytes(dst, shape[0]) * n_rows,
                requires_imatrix=requires,
            )
        )
    return Plan(level=lv, tensors=plans, n_fallback=n_fallback, has_imatrix=imatrix is not None)


def plan_for_gguf(model, level_name: str, **options) -> Plan:
    """plan_quantization for an open ggufkit.gguf.reader.GGUFModel."""
    specs = [TensorSpec(t.name, tuple(t.shape), T(t.ggml_type)) for t in model.tensors]
    return plan_quantization(specs, hparams_from_gguf(model), level_name, **options)
