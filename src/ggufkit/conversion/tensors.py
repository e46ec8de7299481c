"""The tensor plan of a conversion: which GGUF tensor each checkpoint tensor becomes, in which order, through
which transforms, and stored as which type (llama.cpp convert_hf_to_gguf.py, conversion/base.py and the
architecture classes in conversion/llama.py, qwen.py, gemma.py; spec §2).

Order (§2.1): the generated llama3 `rope_freqs.weight` first, then the checkpoint's tensors in the order the
reference reads them (shards in file-name order, names sorted within a shard: Checkpoint.tensors keeps it).
Names (§2.2): `model.layers.N.<suffix>` -> `blk.N.<gguf>`, `.weight`/`.bias` kept.
Transforms (§2.3, in this order):
  1. a BF16 tensor is widened to float32 (exact); F16 and F32 stay as they are;
  2. llama/mistral: q_proj rows permuted per head (rows [0, d/2) and [d/2, d) interleaved: new row 2i = old
     row i, 2i+1 = old d/2+i; k_proj with the KV head count); gemma3: the embedding cut to the vocabulary's
     real size, and every `*norm.weight` + 1.0 computed in the tensor's current dtype (float16 for an F16
     checkpoint: the sum in float32 then rounded to half, as torch does it on the CPU);
  3. the stored type: 1-D tensors and `*_norm.weight` are F32, every other weight the --type (F32, F16,
     BF16, Q8_0); Q8_0 falls back to F16 when a row is not a whole number of 32-value blocks.
A tensor reaches the block kernels in its "work" type: F16 when the checkpoint holds it as F16 and the
transforms keep it so, BF16 when it is BF16 and nothing changes its values (a BF16 -> F32 -> X widening is
exact, so the kernels' BF16 input gives the same bytes), float32 otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConvertError
from ..gguf.types import GGMLQuantizationType as T
from ..quantize.levels import LEVELS
from .hf import FILE_TYPES, OUTTYPES
from .safetensors import DTYPES

__all__ = [
    "ConvertTensor",
    "OUTPUT_TYPES",
    "config_tensors",
    "gguf_name",
    "output_type",
    "plan_tensors",
    "rope_freqs",
    "source_ftype",
    "work_array",
]

# The --type values convert writes itself (what convert_hf_to_gguf.py --outtype writes) and their
# general.file_type (LlamaFileType): every other level goes through the quantize plan.
OUTPUT_TYPES = {name: (LEVELS[name].default_type, FILE_TYPES[name]) for name in OUTTYPES}
_DTYPES = {name: T[name] for name in DTYPES}  # a safetensors dtype -> the ggml type of the same name

_TOP = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_BLOCK_BY_ARCH = {
    "llama": {"post_attention_layernorm": "ffn_norm"},
    "qwen2": {"post_attention_layernorm": "ffn_norm"},
    "qwen3": {"post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm"},
    "gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm"},
}  # fmt: skip
# Every block of a checkpoint must have these (GGUF names without "blk.N."); output.weight is optional.
_REQUIRED_BLOCK = {
    "llama": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
              "ffn_norm"),
    "qwen2": ("attn_norm", "attn_q", "attn_q.bias", "attn_k", "attn_k.bias", "attn_v", "attn_v.bias",
              "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"),
    "qwen3": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
              "ffn_norm", "attn_q_norm", "attn_k_norm"),
    "gemma3": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
               "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"),
}  # fmt: skip

# Names the reference drops before mapping (TextModel.filter_tensors: multimodal parts) ...
_SKIP_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                  "sound_projection.", "speech_embeddings.")  # fmt: skip
_SKIP_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
               "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
               "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")  # fmt: skip
# ... and after it (prepare_tensors: buffers some checkpoints save).
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class ConvertTensor:
    """One output tensor. shape: numpy order (rows first) after the transforms; src: the checkpoint tensor
    (None for the generated rope_freqs); src_dtype: "F32" | "F16" | "BF16" (the checkpoint's)."""

    name: str
    src: str | None
    src_dtype: str
    shape: tuple[int, ...]
    permute_heads: int = 0  # llama q/k: the head count of the row permutation (0: none)
    add_one: bool = False  # gemma3 norms
    keep_rows: int | None = None  # gemma3 embedding: the first rows kept

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_norm_or_1d(self) -> bool:
        return len(self.shape) <= 1 or self.name.endswith("_norm.weight")

    @property
    def work_type(self) -> T:
        """The type the tensor has after the transforms (step 1-2), as it is handed to the kernels."""
        if self.src is None:
            return T.F32
        if self.src_dtype == "F16":
            return T.F16
        if self.src_dtype == "BF16" and not self.add_one:
            return T.BF16  # widening to F32 is exact: the BF16 bits carry the same values
        return T.F32

    @property
    def ggml_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


def output_type(t: ConvertTensor, out: str) -> T:
    """The type convert_hf_to_gguf.py --outtype `out` stores t as (§2.3 step 3)."""
    if t.is_norm_or_1d or not t.name.endswith(".weight"):
        return T.F32
    qtype = OUTPUT_TYPES[out][0]
    if qtype == T.Q8_0 and t.shape[-1] % 32:
        return T.F16  # gguf-py's QuantError -> "falling back to F16"
    return qtype


def source_ftype(ckpt) -> str:
    """The checkpoint's dtype as convert --outtype names it ("F32", "F16", "BF16"): the dtype of its first
    tensor of two or more dimensions, in the reference's order (F32 when there is none)."""
    for ref in ckpt.tensors.values():
        if len(ref.shape) >= 2:
            return ref.dtype
    return "F32"


def gguf_name(hf_name: str, arch: str) -> str | None:
    """The GGUF name of a (filtered) checkpoint tensor name; None when the architecture has no such one."""
    m = _LAYER.match(hf_name)
    if m:
        bid, part, suffix = m.groups()
        base = _BLOCK.get(part) or _BLOCK_BY_ARCH[arch].get(part)
        return None if base is None else f"blk.{int(bid)}.{base}.{suffix}"
    m = _TOP_RE.match(hf_name)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def _filtered(name: str, arch: str) -> str | None:
    """The name as the reference keeps it (None: dropped) - TextModel/ModelBase.filter_tensors."""
    if name.startswith(_SKIP_PREFIXES) or any(p in name for p in _SKIP_PARTS):
        return None
    if arch == "llama" and "text_model." in name:
        name = name.replace("text_model.", "")
    if "language_model." in name:
        name = name.replace("language_model.", "")
    if name.endswith(_SKIP_SUFFIXES):
        return None
    return name


def _hp(hparams: dict, *keys, default=None):
    """find_hparam: the value of the first key present (even when None)."""
    for k in keys:
        if k in hparams:
            return hparams[k]
    return default


def _rope_params(hparams: dict) -> dict:
    """TextModel.__init__'s rope_parameters (the part the llama3 factors read)."""
    rp = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    if "full_attention" in rp:
        return dict(rp["full_attention"] or {})
    if "rope_theta" not in rp:
        theta = _hp(hparams, "global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                    "rotary_emb_base")  # fmt: skip
        if theta is not None:
            rp["rope_theta"] = theta
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    if "original_max_position_embeddings" not in rp:
        omp = hparams.get("original_max_position_embeddings")
        if omp is not None:
            rp["original_max_position_embeddings"] = omp
    return rp


def _head_dim(hparams: dict) -> int:
    hd = hparams.get("head_dim")
    return int(hd) if hd is not None else int(hparams["hidden_size"]) // int(hparams["num_attention_heads"])


def rope_freqs(hparams: dict):
    """Llama 3's rope_freqs.weight (float32 [head_dim / 2]), or None when the rope type is not llama3.

    LlamaModel.generate_extra_tensors computes it with float32 torch ops; torch's `scalar / tensor` is a
    reciprocal then a multiply, and a comparison of a float32 tensor with a Python float casts the float
    to float32: both are reproduced here (spec §2.4).
    """
    import numpy as np

    rp = _rope_params(hparams)
    if not rp or str(rp.get("rope_type", "")).lower() != "llama3":
        return None
    f32 = np.float32
    base = rp.get("rope_theta", 10000.0)
    dim = _head_dim(hparams)
    factor = rp.get("factor", 8.0)
    lo = rp.get("low_freq_factor", 1.0)
    hi = rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = f32(old / lo), f32(old / hi)
    with np.errstate(all="ignore"):
        exps = np.arange(0, dim, 2, dtype=f32) / f32(dim)
        freqs = np.reciprocal(np.power(f32(base), exps)) * f32(1.0)
        out = []
        for freq in freqs:
            wavelen = np.reciprocal(freq) * f32(2 * math.pi)
            if wavelen < high_wl:
                out.append(f32(1.0))
            elif wavelen > low_wl:
                out.append(f32(factor))
            else:
                smooth = (np.reciprocal(wavelen) * f32(old) - f32(lo)) / f32(hi - lo)
                out.append(np.reciprocal((f32(1.0) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


def _expected_shapes(arch: str, hp: dict, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Shapes config.json implies, by GGUF name pattern (numpy order), for the shape check."""
    d = int(hp["hidden_size"])
    ff = int(_hp(hp, "intermediate_size", default=0) or 0)
    nh = int(hp["num_attention_heads"])
    nkv = int(hp.get("num_key_value_heads") or nh)
    hd = _head_dim(hp)
    return {
        "token_embd.weight": (n_vocab, d),
        "output.weight": (int(hp["vocab_size"]), d),
        "output_norm.weight": (d,),
        "attn_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "post_attention_norm.weight": (d,),
        "post_ffw_norm.weight": (d,),
        "attn_q.weight": (nh * hd, d),
        "attn_k.weight": (nkv * hd, d),
        "attn_v.weight": (nkv * hd, d),
        "attn_q.bias": (nh * hd,),
        "attn_k.bias": (nkv * hd,),
        "attn_v.bias": (nkv * hd,),
        "attn_output.weight": (d, nh * hd),
        "ffn_gate.weight": (ff, d),
        "ffn_up.weight": (ff, d),
        "ffn_down.weight": (d, ff),
        "attn_q_norm.weight": (hd,),
        "attn_k_norm.weight": (hd,),
    }


def plan_tensors(ckpt, cfg, *, n_vocab_real: int | None = None) -> list[ConvertTensor]:
    """Every output tensor in the reference's order, with its transforms; ConvertError for a tensor the
    architecture does not have, a required one that is missing, or a shape config.json contradicts.
    n_vocab_real: gemma3's vocabulary size (the embedding rows kept)."""
    arch, hp = cfg.arch, cfg.hparams
    if arch not in _BLOCK_BY_ARCH:
        raise ConvertError(
            f"architecture {arch!r} has no tensor map (supported: {', '.join(_BLOCK_BY_ARCH)})"
        )
    n_layer = int(hp["num_hidden_layers"])
    vocab = int(hp["vocab_size"])
    out: list[ConvertTensor] = []
    freqs = rope_freqs(hp) if arch == "llama" else None
    if freqs is not None:
        out.append(ConvertTensor("rope_freqs.weight", None, "F32", (int(freqs.shape[0]),)))
    n_head = int(_hp(hp, "n_heads", "num_attention_heads"))
    n_kv = _hp(hp, "n_kv_heads", "num_key_value_heads")
    expected = _expected_shapes(arch, hp, vocab)
    unknown, seen = [], {}
    for hf_name, ref in ckpt.tensors.items():
        name = _filtered(hf_name, arch)
        if name is None:
            continue
        new = gguf_name(name, arch)
        if new is None:
            unknown.append(hf_name)
            continue
        if ref.dtype not in _DTYPES:
            raise ConvertError(f"tensor {hf_name!r} has dtype {ref.dtype}; convert reads F32, F16 and BF16")
        shape = tuple(int(s) for s in ref.shape)
        generic = re.sub(r"^blk\.\d+\.", "", new)
        m = re.match(r"^blk\.(\d+)\.", new)
        if m and int(m.group(1)) >= n_layer:
            unknown.append(hf_name)
            continue
        want = expected.get(generic)
        if want is not None and shape != want:
            raise ConvertError(
                f"tensor {hf_name!r} has shape {list(shape)}, config.json implies {list(want)}"
            )
        permute = 0
        if arch == "llama" and re.search(r"(q_proj|k_proj)\.(weight|bias)$", name):
            heads = n_head
            if "k_proj" in name and n_kv is not None and int(n_kv) != n_head:
                heads = int(n_kv)
            permute = heads
        keep = None
        if arch == "gemma3" and "embed_tokens.weight" in name and n_vocab_real is not None:
            keep = min(int(n_vocab_real), shape[0])
            shape = (keep, *shape[1:])
        add_one = arch == "gemma3" and name.endswith("norm.weight")
        seen[new] = ConvertTensor(new, hf_name, ref.dtype, shape, permute, add_one, keep)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ConvertError(
            f"{cfg.architecture}: no GGUF tensor for {', '.join(repr(n) for n in unknown[:5])}{more}"
        )
    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(n_layer):
        for base in _REQUIRED_BLOCK[arch]:
            required.append(f"blk.{i}.{base}" + ("" if base.endswith(".bias") else ".weight"))
    missing = [n for n in required if n not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConvertError(f"{cfg.architecture} checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")
    return out + list(seen.values())


@dataclass(frozen=True)
class _HeaderRef:
    """A checkpoint tensor as plan_tensors reads it (dtype and shape), without a file behind it."""

    dtype: str
    shape: tuple[int, ...]


class _ImpliedCheckpoint:
    def __init__(self, tensors: dict[str, _HeaderRef]):
        self.tensors = tensors


@dataclass(frozen=True)
class _Config:
    architecture: str
    arch: str
    hparams: dict


def header_tensors(cfg, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> list[ConvertTensor]:
    """plan_tensors over a checkpoint known only by its header, name -> (dtype, shape) (a model in memory,
    as save_pretrained would write it): the tensors convert would write, with their transforms."""
    ckpt = _ImpliedCheckpoint({n: _HeaderRef(d, tuple(int(x) for x in s)) for n, (d, s) in tensors.items()})
    return plan_tensors(ckpt, cfg)


def config_tensors(arch: str, hparams: dict, *, tied: bool, dtype: str = "F16") -> list[ConvertTensor]:
    """The tensors a complete checkpoint of this configuration converts to, when there is no checkpoint to
    read (an estimate from config.json alone): every tensor the architecture requires, lm_head unless the
    output is tied to the embeddings, shaped as config.json implies and stored as `dtype`, in the order of a
    single-file checkpoint (names sorted), through plan_tensors (llama3's rope_freqs included)."""
    if arch not in _REQUIRED_BLOCK:
        raise ConvertError(
            f"architecture {arch!r} has no tensor map (supported: {', '.join(_REQUIRED_BLOCK)})"
        )
    to_hf = {gguf: hf for hf, gguf in {**_TOP, **_BLOCK, **_BLOCK_BY_ARCH[arch]}.items()}
    expected = _expected_shapes(arch, hparams, int(hparams["vocab_size"]))
    wanted = ["token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"])]
    names = {f"{to_hf[n.split('.')[0]]}.weight": expected[n] for n in wanted}
    for i in range(int(hparams["num_hidden_layers"])):
        for required in _REQUIRED_BLOCK[arch]:
            base, _, suffix = required.partition(".")
            suffix = suffix or "weight"
            names[f"model.layers.{i}.{to_hf[base]}.{suffix}"] = expected[f"{base}.{suffix}"]
    ckpt = _ImpliedCheckpoint({n: _HeaderRef(dtype, names[n]) for n in sorted(names)})
    return plan_tensors(ckpt, _Config(f"config.json ({arch})", arch, hparams))


# -- data ------------------------------------------------------------------------------------------------


def _bf16_bits_to_f32(bits):
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def work_array(ckpt, t: ConvertTensor, hparams: dict):
    """The tensor after the transforms, in t.work_type: float32, float16, or uint16 BF16 bit patterns;
    C-contiguous, numpy shape t.shape. Refuses NaN and infinities by tensor name (ConvertError).

    Untransformed, it is a view of the checkpoint's map, whose pages the check releases span by span
    behind it (Checkpoint.release), so checking a large tensor does not make it all resident at once;
    transformed, it is a copy, and the checkpoint's pages are released when it is made."""
    import numpy as np

    if t.src is None:
        return rope_freqs(hparams)
    data = raw = ckpt.read(t.src)
    if t.keep_rows is not None:
        data = data[: t.keep_rows]
    if t.src_dtype == "BF16" and t.work_type == T.F32:
        data = _bf16_bits_to_f32(data)
    if t.permute_heads:
        n = t.permute_heads
        shape = data.shape
        data = data.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    if t.add_one:
        if data.dtype == np.float16:
            data = (data.astype(np.float32) + np.float32(1.0)).astype(np.float16)
        else:
            data = data.astype(np.float32) + np.float32(1.0)
    data = np.ascontiguousarray(data)
    if np.may_share_memory(data, raw):  # a prefix of the stored tensor: element i is at byte i * itemsize
        size = data.itemsize
        _check_finite(t, data, done=lambda a, b: ckpt.release(t.src, a * size, b * size))
    else:
        ckpt.release(t.src)
        _check_finite(t, data)
    return data


_CHECK_SPAN = 1 << 20  # elements per step of the check: its temporaries stay a few MB


def _check_finite(t: ConvertTensor, data, done=None) -> None:
    """ConvertError naming the first non-finite element's row, if any; done(begin, end) after each span of
    elements is checked."""
    import numpy as np

    flat = data.reshape(-1)
    for start in range(0, flat.size, _CHECK_SPAN):
        span = flat[start : start + _CHECK_SPAN]
        if data.dtype == np.uint16:  # BF16 bits: exponent all ones is an infinity or a NaN
            bad = (span & 0x7F80) == 0x7F80
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.add.reduce(span, dtype=np.float32)):
                    bad = None
                else:
                    bad = ~np.isfinite(span)
        if bad is not None and bad.any():
            _refuse_nonfinite(t, data, start + int(np.argmax(bad)))
        if done is not None:
            done(start, start + span.size)


def _refuse_nonfinite(t: ConvertTensor, data, flat: int) -> None:
    row = flat // data.shape[-1] if data.ndim > 1 else 0
    raise ConvertError(
        f"tensor {t.src!r} ({t.name}) has non-finite values (NaN or Inf) in row {row}; llama.cpp refuses "
        f"such weights"
    )
