"""llama-quantize's per-tensor type policy: which type each tensor gets at a level, and why.

Pure policy: a tensor's name, shape and the level in, a `Choice` (type, kind, detail) out; plan.py walks
the tensors in order and records the choices as a `Plan`. No tensor data is read and nothing here knows a
bit layout; block sizes come from the block format registry (levels.block_size), without numpy.

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

import enum
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..errors import QuantizeError
from ..gguf.types import GGMLQuantizationType as T
from ..gguf.writer import n_dims
from .levels import Level, block_size, parse_ggml_type

if TYPE_CHECKING:
    from .plan import Hparams, TensorSpec


class TensorKind(enum.Enum):
    """What decided a tensor's type."""

    COPY = "copy"  # the bytes are copied verbatim (never quantized, or already of the planned type)
    DEFAULT = "default"  # the level's default type
    MIX = "mix"  # one of the level's mixture rules
    FALLBACK = "fallback"  # the row length forced another type (TensorPlan.fallback: (wanted, used))
    OVERRIDE = "override"  # a command-line option (--tensor-type, --output-tensor-type, ...)


class Choice(NamedTuple):
    """One decision of the policy, before the row-length fallback. detail: for MIX the rule ("attn_v
    more-bits layer 3"), for OVERRIDE the option ("--tensor-type attn_v=q8_0"), for COPY why not."""

    type: T
    kind: TensorKind
    detail: str = ""

    def reason(self, level_name: str) -> str:
        """The text shown to users (dry-run table, summaries); nothing parses it."""
        if self.kind is TensorKind.MIX:
            return f"mix {level_name}: {self.detail} -> {self.type.name}"
        if self.kind is TensorKind.OVERRIDE:
            return self.detail
        if self.kind is TensorKind.COPY:
            return f"not quantized: {self.detail}"
        return f"default {self.type.name}"


def fallback_note(wanted: T, used: T, n_per_row: int) -> str:
    """The row-length fallback as shown to users: "fallback Q4_K -> Q5_0: row 576 not a multiple of 256"."""
    return f"fallback {wanted.name} -> {used.name}: row {n_per_row} not a multiple of {block_size(wanted)}"


def layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.") as llama.cpp's weight_name_comparer does; -1 when it does not parse."""
    m = re.match(r"blk\.\s*([+-]?\d+)", name)
    if m is None:
        return -1
    value = int(m.group(1))
    return value if -(2**31) <= value < 2**31 else -1


def order_key(name: str):
    """llama.cpp's output order (weight_name_comparer): layer number, then the name's bytes."""
    return (layer_of(name), name.encode("utf-8", "surrogateescape"))


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


def not_quantized_reason(spec: TensorSpec, leave_output_tensor: bool) -> str | None:
    """Why tensor_allows_quantization (and llama_model_quantize_impl) keep a tensor's type, or None."""
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


def category(name: str) -> str:
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


class Mixer:
    """llama_tensor_get_type_impl for the levels in LEVELS (the IQ1/IQ2/IQ3/TQ/MXFP4 branches are not
    reachable from them). State: the visiting counters and the tied-embeddings flag."""

    def __init__(
        self, lv: Level, hp: Hparams, names: Sequence[str], *, has_imatrix: bool, output_tensor_type: T | None
    ):
        self.lv, self.hp, self.f = lv, hp, lv.name
        self.has_imatrix = has_imatrix
        self.output_tensor_type = output_tensor_type
        self.n_attention_wv = sum(category(n) in _ATTN_V_LIKE for n in names)
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

    def choose(self, spec: TensorSpec, cat: str, new: T) -> Choice:
        """The choice for one tensor of category `cat`; `new` is the level's default type."""
        f, hp = self.f, self.hp
        if cat == "output" or (self.tied and cat == "token_embd"):
            what = "output" if cat == "output" else "token_embd (tied to output)"
            if self.output_tensor_type is not None:
                out = self.output_tensor_type
                return Choice(out, TensorKind.OVERRIDE, f"--output-tensor-type {out.name} ({what})")
            nx, qk = spec.shape[0], block_size(new)
            if nx % qk != 0:
                return Choice(T.Q8_0, TensorKind.MIX, f"{what}, row {nx} not a multiple of {qk}")
            if new != T.Q8_0:
                return Choice(T.Q6_K, TensorKind.MIX, what)
            return Choice(new, TensorKind.DEFAULT)
        if cat == "token_embd":
            return Choice(new, TensorKind.DEFAULT)
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
            return self._rule(cat, why, new)
        if cat == "attn_k":
            if hp.n_expert == 8:
                return Choice(T.Q8_0, TensorKind.MIX, "attn_k, 8 experts")
            return Choice(new, TensorKind.DEFAULT)
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
            return self._rule(cat, why, new)
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
            return self._rule(cat, why, new)
        if cat == "ffn_gate":  # only IQ3_XS has a rule; the counter still advances
            self._layer(self.i_ffn_gate, spec.name)
            self.i_ffn_gate += 1
        elif cat == "ffn_up":
            self._layer(self.i_ffn_up, spec.name)
            self.i_ffn_up += 1
        return Choice(new, TensorKind.DEFAULT)

    @staticmethod
    def _rule(cat: str, why: str | None, new: T) -> Choice:
        """why None: no rule applied (the default); "": a rule without a condition worth showing."""
        if why is None:
            return Choice(new, TensorKind.DEFAULT)
        return Choice(new, TensorKind.MIX, f"{cat}{' ' + why if why else ''}")


def fallback_type(qt: T, ncols: int) -> T | None:
    """tensor_type_fallback: the type to use when ncols is not a multiple of qt's block (None: it is)."""
    qk = block_size(qt)
    if ncols % qk == 0:
        return None
    if qt in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS):
        out = T.IQ4_NL
    elif qt in (T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0):
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
    return out if ncols % block_size(out) == 0 else T.F16


def parse_patterns(tensor_types) -> list[tuple[re.Pattern, str, T]]:
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
