"""The tensor plan of a conversion: which GGUF tensor each checkpoint tensor becomes, in which order, through
which transforms, and stored as which type (llama.cpp convert_hf_to_gguf.py, conversion/base.py and the
architecture classes in conversion/llama.py, qwen.py, gemma.py; spec §2).

Order (§2.1): the generated llama3 `rope_freqs.weight` first, then the checkpoint's tensors in the order the
reference reads them (shards in file-name order, names sorted within a shard: Checkpoint.tensors keeps it).
Names (§2.2): names.py. Transforms (§2.3 steps 1-2): recorded here per tensor, applied by transforms.py.
The stored type (§2.3 step 3): 1-D tensors and `*_norm.weight` are F32, every other weight the --type (F32,
F16, BF16, Q8_0); Q8_0 falls back to F16 when a row is not a whole number of 32-value blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConvertError
from ..gguf.types import GGMLQuantizationType as T
from ..quantize.levels import LEVELS
from .hf import FILE_TYPES, OUTTYPES
from .hparams import expected_shapes, find_hparam, rope_freqs
from .names import BLOCK, BLOCK_BY_ARCH, REQUIRED_BLOCK, TOP, filtered_name, gguf_name
from .safetensors import DTYPES

__all__ = [
    "ConvertTensor",
    "OUTPUT_TYPES",
    "config_tensors",
    "header_tensors",
    "output_type",
    "plan_tensors",
    "source_ftype",
]

# The --type values convert writes itself (what convert_hf_to_gguf.py --outtype writes) and their
# general.file_type (LlamaFileType): every other level goes through the quantize plan.
OUTPUT_TYPES = {name: (LEVELS[name].default_type, FILE_TYPES[name]) for name in OUTTYPES}
_DTYPES = {name: T[name] for name in DTYPES}  # a safetensors dtype -> the ggml type of the same name


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


def plan_tensors(ckpt, cfg, *, n_vocab_real: int | None = None) -> list[ConvertTensor]:
    """Every output tensor in the reference's order, with its transforms; ConvertError for a tensor the
    architecture does not have, a required one that is missing, or a shape config.json contradicts.
    n_vocab_real: gemma3's vocabulary size (the embedding rows kept)."""
    arch, hp = cfg.arch, cfg.hparams
    if arch not in BLOCK_BY_ARCH:
        raise ConvertError(f"architecture {arch!r} has no tensor map (supported: {', '.join(BLOCK_BY_ARCH)})")
    n_layer = int(hp["num_hidden_layers"])
    vocab = int(hp["vocab_size"])
    out: list[ConvertTensor] = []
    freqs = rope_freqs(hp) if arch == "llama" else None
    if freqs is not None:
        out.append(ConvertTensor("rope_freqs.weight", None, "F32", (int(freqs.shape[0]),)))
    n_head = int(find_hparam(hp, "n_heads", "num_attention_heads"))
    n_kv = find_hparam(hp, "n_kv_heads", "num_key_value_heads")
    expected = expected_shapes(arch, hp, vocab)
    unknown, seen = [], {}
    for hf_name, ref in ckpt.tensors.items():
        name = filtered_name(hf_name, arch)
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
        for base in REQUIRED_BLOCK[arch]:
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
    if arch not in REQUIRED_BLOCK:
        raise ConvertError(
            f"architecture {arch!r} has no tensor map (supported: {', '.join(REQUIRED_BLOCK)})"
        )
    to_hf = {gguf: hf for hf, gguf in {**TOP, **BLOCK, **BLOCK_BY_ARCH[arch]}.items()}
    expected = expected_shapes(arch, hparams, int(hparams["vocab_size"]))
    wanted = ["token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"])]
    names = {f"{to_hf[n.split('.')[0]]}.weight": expected[n] for n in wanted}
    for i in range(int(hparams["num_hidden_layers"])):
        for required in REQUIRED_BLOCK[arch]:
            base, _, suffix = required.partition(".")
            suffix = suffix or "weight"
            names[f"model.layers.{i}.{to_hf[base]}.{suffix}"] = expected[f"{base}.{suffix}"]
    ckpt = _ImpliedCheckpoint({n: _HeaderRef(dtype, names[n]) for n in sorted(names)})
    return plan_tensors(ckpt, _Config(f"config.json ({arch})", arch, hparams))
