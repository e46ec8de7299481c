"""How much memory a model needs under llama.cpp: weights + KV cache + compute buffers + runtime overhead.

The estimate follows what llama.cpp (the tree vendored in llama-cpp-python 0.3.36) allocates and touches
when it runs a model on the CPU with its defaults (n_batch 2048, n_ubatch 512, f16 K/V, flash attention
"auto", which resolves to on for the CPU backend, one sequence, mmap). Every term is the *resident* size,
what the OS counts in the process's peak RSS:

- weights: the GGUF's tensors, mapped and read in full at load. Tensors that the CPU backend repacks into
  interleaved layouts (ggml-cpu/repack.cpp: Q4_0, Q4_K and IQ4_NL with AVX2, Q2_K with AVX-512, more on
  ARM; matmul weights with rows a multiple of 8) are copied into anonymous memory; llama.cpp then unmaps
  only the file's head and tail outside the span of the tensors left in the mapping, so a repacked tensor
  inside that span counts twice (`reclaimable_bytes`: clean file pages never read again, which the kernel
  drops under memory pressure; `needed_bytes` leaves them out and is what the fit decisions use).
- KV cache (llama-kv-cache.cpp): per attention layer, K = row_size(type_k, head_dim_k * n_head_kv) and
  V = row_size(type_v, head_dim_v * n_head_kv) bytes per cell, times the cells: n_ctx rounded up to 256
  (llama-context.cpp). Sliding-window layers keep min(n_ctx, pad(n_swa + n_ubatch, 256)) cells
  (llama-kv-cache-iswa.cpp, swa_full off as in llama-cli/llama-server). The buffer is cleared at creation,
  so all of it is resident from the start.
- compute: the scheduler reserves a worst-case graph (n_ubatch tokens, all of them outputs: the logits
  alone are n_vocab * n_ubatch * 4 bytes), but malloc'd pages become resident only when written, and a
  generation run asks for one output per batch. What is touched is the real graph's live set: the KQ mask
  input (n_kv * n_ubatch, f16 under flash attention), the largest layer working set (residual, norm, Q/K/V
  or gate/up/glu activations in f32), the CPU work buffer (the activations converted to the weights'
  vec_dot type) and the output rows. `compute_reserved_bytes` reports the reservation for reference.
- output: the host logits buffer, n_vocab * 4 bytes per sequence.
- overhead: the llama.cpp runtime itself (program text, libraries, the vocabulary's tables, thread
  stacks, graph tables), a linear model of vocabulary, merges and tensor count fitted to llama-bench
  (see OVERHEAD_BASE).

Sources: a GGUF (header and tensor table only), a Hugging Face folder (config.json), or a bare size such as
"7B" or "qwen2:1.5B" resolved to an architecture family's typical shape (the _SHAPES table below).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType as T

from .errors import GgufkitError, MemoryEstimateError

__all__ = [
    "ModelInfo",
    "Estimate",
    "FitTable",
    "load_source",
    "estimate",
    "fit_table",
    "parse_bytes",
    "parse_param_count",
    "available_memory",
    "DEFAULT_LEVELS",
    "DEFAULT_CONTEXTS",
    "runtime_overhead",
    "GIB",
]

GIB = 1 << 30
KV_PAD = 256  # llama-context.cpp pads n_ctx (and the SWA cache) to a multiple of 256 cells
GGUF_ALIGNMENT = 32  # tensors in a file llama-quantize writes start on 32-byte boundaries

# The llama.cpp runtime's own resident memory, beyond weights, KV, compute and output: the program and its
# libraries, the thread pool, the GGUF metadata copy, the vocabulary's tables (token texts, token -> id map,
# piece cache; BPE merge ranks) and the graph/scheduler tables (sized by the graph, 8 nodes per tensor).
# A linear model fitted to llama-bench's peak RSS minus the other terms (benchmarks/bench_memory.py, x86-64
# Linux, 2 threads, n_ctx 2048): small 4-layer models with 49k, 100k and 200k-token vocabularies, with and
# without as many merges, and SmolLM2-135M (272 tensors). Over n_ctx 512..8192 the measured residual moves
# by about -2..+1 MiB around it.
OVERHEAD_BASE = 11_860 * 1024
OVERHEAD_PER_TOKEN = 202  # bytes per vocabulary entry (text of BPE-sized pieces)
OVERHEAD_PER_MERGE = 133  # bytes per BPE merge rule
OVERHEAD_PER_TENSOR = 13_000  # bytes per model tensor (graph and scheduler tables)


def runtime_overhead(model: ModelInfo) -> int:
    """llama.cpp's own resident memory for this model (see OVERHEAD_BASE)."""
    return (
        OVERHEAD_BASE
        + OVERHEAD_PER_TOKEN * model.n_vocab
        + OVERHEAD_PER_MERGE * model.n_merges
        + OVERHEAD_PER_TENSOR * len(model.tensors)
    )


DEFAULT_LEVELS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
DEFAULT_CONTEXTS = (2048, 8192, 32768)


# -- model facts --------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What the estimate needs to know about a model. Per-layer lists have one entry per layer."""

    name: str
    kind: str  # "gguf", "hf" or "size"
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
    tensors: list = field(default_factory=list, repr=False)  # recipes.TensorSpec, source types
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
        from .recipes import Hparams

        return Hparams(
            arch=self.arch,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv[0] if self.n_head_kv else 0,
            n_expert=self.n_expert,
            n_embd=self.n_embd,
        )


def _per_layer(value, n_layer: int, what: str) -> list[int]:
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        values = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
        if len(values) != n_layer:
            raise MemoryEstimateError(f"{what} has {len(values)} entries for {n_layer} layers")
        return values
    return [int(value)] * n_layer


_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "llama4": 4, "cohere2": 4}
_SWA_DEFAULT = {"gemma2": 4096, "llama4": 8192}  # window when the GGUF has no sliding_window key


def _swa_layers(arch: str, n_layer: int, n_swa: int, pattern) -> list[bool]:
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


def _info_from_gguf(path: Path) -> ModelInfo:
    from .gguf_file import open_gguf
    from .recipes import TensorSpec

    try:
        model = open_gguf(path)
    except GgufkitError:
        raise
    except OSError as e:
        raise MemoryEstimateError(f"{path}: cannot read: {e.strerror or e}") from None
    arch = model.architecture
    if not arch:
        raise MemoryEstimateError(f"{path}: GGUF has no general.architecture")

    def key(name, default=None, *, required=True):
        value = model.get(f"{arch}.{name}", default)
        if value is None and required:
            raise MemoryEstimateError(f"{path}: GGUF lacks {arch}.{name}, needed for the estimate")
        return value

    n_layer = int(key("block_count"))
    n_embd = int(key("embedding_length"))
    head_count = key("attention.head_count")
    n_head = _per_layer(head_count, n_layer, f"{arch}.attention.head_count")[0]
    n_head_kv = _per_layer(
        key("attention.head_count_kv", head_count), n_layer, f"{arch}.attention.head_count_kv"
    )
    hd_k = int(key("attention.key_length", n_embd // max(n_head, 1)))
    hd_v = int(key("attention.value_length", hd_k))
    n_ff = max(_per_layer(key("feed_forward_length", 0), n_layer, f"{arch}.feed_forward_length"))
    tokens = model.get("tokenizer.ggml.tokens")
    merges = model.get("tokenizer.ggml.merges")
    n_vocab = int(key("vocab_size", len(tokens) if tokens is not None else None))
    n_swa = int(key("attention.sliding_window", _SWA_DEFAULT.get(arch, 0)))
    is_swa = _swa_layers(arch, n_layer, n_swa, key("attention.sliding_window_pattern", None, required=False))
    specs = [TensorSpec(t.name, tuple(t.shape), T(t.ggml_type)) for t in model.tensors]
    file_type = _file_type_name(model.get("general.file_type"), specs)
    return ModelInfo(
        name=path.name,
        kind="gguf",
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=hd_k,
        head_dim_v=hd_v,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length", 0)),
        n_merges=len(merges) if merges is not None else 0,
        n_swa=n_swa,
        is_swa=is_swa,
        n_expert=int(key("expert_count", 0)),
        n_expert_used=int(key("expert_used_count", 0)),
        n_ff_exp=int(key("expert_feed_forward_length", 0)),
        tensors=specs,
        file_type=file_type,
        path=path,
        file_tensors=[(t.name, tuple(t.shape), T(t.ggml_type), t.nbytes, t.offset) for t in model.tensors],
    )


def _file_type_name(ftype, specs) -> str:
    from .recipes import LEVELS

    if ftype is not None:
        for lv in LEVELS.values():
            if lv.ftype_id == int(ftype):
                return lv.name
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.ggml_type.name] = counts.get(s.ggml_type.name, 0) + math.prod(s.shape)
    return max(counts, key=counts.get) if counts else "?"


# -- Hugging Face config.json and bare sizes ----------------------------------------------------------------

# HF architecture class -> GGUF architecture, as convert_hf_to_gguf.py names them (Mistral and Mixtral
# convert to "llama").
_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "GemmaForCausalLM": "gemma",
    "Phi3ForCausalLM": "phi3",
}
# BPE merge counts of the well-known vocabularies (by size), for sources without a tokenizer file:
# Llama 3, Qwen2/2.5, SmolLM2. SentencePiece vocabularies (Llama 2, Mistral, Gemma) have none.
_MERGES_BY_VOCAB = {128256: 280147, 151936: 151387, 152064: 151387, 49152: 48900}
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _info_from_config(
    cfg: dict, *, name: str, kind: str, path: Path | None = None, note: str = "", n_merges: int | None = None
) -> ModelInfo:
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers (Gemma 3) nest the LM
        outer = cfg
        cfg = dict(cfg["text_config"])
        cfg.setdefault("architectures", outer.get("architectures"))
        cfg.setdefault("vocab_size", outer.get("vocab_size"))
    missing = [k for k in _HF_REQUIRED if cfg.get(k) is None]
    if missing:
        raise MemoryEstimateError(f"{name}: config.json lacks {', '.join(missing)}, needed for the estimate")
    archs = cfg.get("architectures") or []
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None) or {
        "llama": "llama",
        "mistral": "llama",
        "mixtral": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma": "gemma",
        "gemma2": "gemma2",
        "gemma3_text": "gemma3",
        "gemma3": "gemma3",
        "phi3": "phi3",
    }.get(cfg.get("model_type", ""), "llama")
    try:
        d = int(cfg["hidden_size"])
        n_layer = int(cfg["num_hidden_layers"])
        n_head = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_head)
        hd = int(cfg.get("head_dim") or d // n_head)
        n_ff = int(cfg["intermediate_size"])
        n_vocab = int(cfg["vocab_size"])
        n_expert = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        n_used = int(cfg.get("num_experts_per_tok") or 0)
        n_ff_exp = int(cfg.get("moe_intermediate_size") or (n_ff if n_expert else 0))
        n_swa = int(cfg.get("sliding_window") or 0) if arch in ("gemma2", "gemma3", "phi3") else 0
    except (TypeError, ValueError) as e:
        raise MemoryEstimateError(f"{name}: config.json has a non-integer size field ({e})") from None
    tied = bool(cfg.get("tie_word_embeddings", arch.startswith("gemma")))
    layer_types = cfg.get("layer_types")
    pattern = [t == "sliding_attention" for t in layer_types] if isinstance(layer_types, list) else None
    is_swa = _swa_layers(
        arch, n_layer, n_swa, pattern if pattern is not None else cfg.get("sliding_window_pattern")
    )
    info = ModelInfo(
        name=name,
        kind=kind,
        arch=arch,
        n_layer=n_layer,
        n_embd=d,
        n_head=n_head,
        n_head_kv=[n_kv] * n_layer,
        head_dim_k=hd,
        head_dim_v=hd,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(cfg.get("max_position_embeddings") or 0),
        n_merges=_MERGES_BY_VOCAB.get(n_vocab, 0) if n_merges is None else n_merges,
        n_swa=n_swa,
        is_swa=is_swa,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_ff_exp=n_ff_exp,
        path=path,
        note=note,
    )
    info.tensors = _tensor_specs(info, tied=tied)
    return info


def _tensor_specs(m: ModelInfo, *, tied: bool) -> list:
    """The tensors convert_hf_to_gguf.py writes for a llama-family model (ggml order, F16 matrices, F32
    vectors), named as llama.cpp names them."""
    from .recipes import TensorSpec

    F16, F32 = T.F16, T.F32
    d, hd, q = m.n_embd, m.head_dim_k, m.n_head * m.head_dim_k
    specs = [
        TensorSpec("token_embd.weight", (d, m.n_vocab), F16),
        TensorSpec("output_norm.weight", (d,), F32),
    ]
    if not tied:
        specs.append(TensorSpec("output.weight", (d, m.n_vocab), F16))
    for i in range(m.n_layer):
        kv = m.n_head_kv[i] * hd
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (d,), F32),
            TensorSpec(b + "attn_q.weight", (d, q), F16),
            TensorSpec(b + "attn_k.weight", (d, kv), F16),
            TensorSpec(b + "attn_v.weight", (d, m.n_head_kv[i] * m.head_dim_v), F16),
            TensorSpec(b + "attn_output.weight", (m.n_head * m.head_dim_v, d), F16),
            TensorSpec(b + "ffn_norm.weight", (d,), F32),
        ]
        if m.arch == "qwen2":
            specs += [
                TensorSpec(b + "attn_q.bias", (q,), F32),
                TensorSpec(b + "attn_k.bias", (kv,), F32),
                TensorSpec(b + "attn_v.bias", (kv,), F32),
            ]
        if m.arch in ("qwen3", "gemma3"):
            specs += [
                TensorSpec(b + "attn_q_norm.weight", (hd,), F32),
                TensorSpec(b + "attn_k_norm.weight", (hd,), F32),
            ]
        if m.arch in ("gemma2", "gemma3"):
            specs += [
                TensorSpec(b + "post_attention_norm.weight", (d,), F32),
                TensorSpec(b + "post_ffw_norm.weight", (d,), F32),
            ]
        if m.n_expert:
            e, f = m.n_expert, m.n_ff_exp
            specs += [
                TensorSpec(b + "ffn_gate_inp.weight", (d, e), F32),
                TensorSpec(b + "ffn_gate_exps.weight", (d, f, e), F16),
                TensorSpec(b + "ffn_up_exps.weight", (d, f, e), F16),
                TensorSpec(b + "ffn_down_exps.weight", (f, d, e), F16),
            ]
        else:
            specs += [
                TensorSpec(b + "ffn_gate.weight", (d, m.n_ff), F16),
                TensorSpec(b + "ffn_up.weight", (d, m.n_ff), F16),
                TensorSpec(b + "ffn_down.weight", (m.n_ff, d), F16),
            ]
    return specs


def _info_from_hf_folder(folder: Path) -> ModelInfo:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MemoryEstimateError(f"{folder}: no config.json (a Hugging Face model folder has one)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemoryEstimateError(f"{cfg_path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise MemoryEstimateError(f"{cfg_path}: not a JSON object")
    return _info_from_config(cfg, name=folder.name, kind="hf", path=folder, n_merges=_hf_merges(folder))


def _hf_merges(folder: Path) -> int | None:
    """The BPE merge count of the folder's tokenizer.json, if it has one."""
    try:
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        merges = tok["model"].get("merges")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return len(merges) if isinstance(merges, list) else 0


# Typical shapes by family, as the published config.json files give them (hidden, layers, heads, KV
# heads, head_dim, ffn, vocab, tied, sliding window). A bare size resolves to the nearest one.
_SHAPES = {
    "llama": {  # Llama 3.x (1B, 3B, 8B, 70B) and Llama 2 (7B, 13B)
        "1B": (2048, 16, 32, 8, 64, 8192, 128256, True, 0),
        "3B": (3072, 28, 24, 8, 128, 8192, 128256, True, 0),
        "7B": (4096, 32, 32, 32, 128, 11008, 32000, False, 0),
        "8B": (4096, 32, 32, 8, 128, 14336, 128256, False, 0),
        "13B": (5120, 40, 40, 40, 128, 13824, 32000, False, 0),
        "70B": (8192, 80, 64, 8, 128, 28672, 128256, False, 0),
    },
    "qwen2": {  # Qwen2.5
        "0.5B": (896, 24, 14, 2, 64, 4864, 151936, True, 0),
        "1.5B": (1536, 28, 12, 2, 128, 8960, 151936, True, 0),
        "3B": (2048, 36, 16, 2, 128, 11008, 151936, True, 0),
        "7B": (3584, 28, 28, 4, 128, 18944, 152064, False, 0),
        "14B": (5120, 48, 40, 8, 128, 13824, 152064, False, 0),
        "32B": (5120, 64, 40, 8, 128, 27648, 152064, False, 0),
        "72B": (8192, 80, 64, 8, 128, 29568, 152064, False, 0),
    },
    "smollm2": {
        "135M": (576, 30, 9, 3, 64, 1536, 49152, True, 0),
        "360M": (960, 32, 15, 5, 64, 2560, 49152, True, 0),
        "1.7B": (2048, 24, 32, 32, 64, 8192, 49152, True, 0),
    },
    "mistral": {"7B": (4096, 32, 32, 8, 128, 14336, 32768, False, 0)},
    "gemma2": {
        "2B": (2304, 26, 8, 4, 256, 9216, 256000, True, 4096),
        "9B": (3584, 42, 16, 8, 256, 14336, 256000, True, 4096),
        "27B": (4608, 46, 32, 16, 128, 36864, 256000, True, 4096),
    },
    "gemma3": {
        "1B": (1152, 26, 4, 1, 256, 6912, 262144, True, 512),
        "4B": (2560, 34, 8, 4, 256, 10240, 262208, True, 1024),
        "12B": (3840, 48, 16, 8, 256, 15360, 262208, True, 1024),
        "27B": (5376, 62, 32, 16, 128, 21504, 262208, True, 1024),
    },
}
_FAMILY_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "smollm2": "llama",
    "mistral": "llama",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}
_SIZE_RE = re.compile(
    r"^\s*(?:(?P<family>[a-z][a-z0-9]*)[:\-])?(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[MmBbKk])\s*$"
)


def parse_param_count(text: str) -> int:
    """'7B' -> 7e9, '135M' -> 1.35e8, '1.5b' -> 1.5e9 (K, M, B)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MemoryEstimateError(
            f"unknown model size {text!r}: expected a number and K, M or B, such as 7B or 135M"
        )
    return int(float(m["num"]) * {"k": 1e3, "m": 1e6, "b": 1e9}[m["unit"].lower()])


def _config_of(family: str, label: str) -> dict:
    d, n_layer, n_head, n_kv, hd, ff, vocab, tied, swa = _SHAPES[family][label]
    arch = _FAMILY_ARCH[family]
    return {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "gemma2": "Gemma2ForCausalLM",
                "gemma3": "Gemma3ForCausalLM",
            }[arch]
        ],
        "hidden_size": d,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hd,
        "intermediate_size": ff,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "sliding_window": swa,
    }


def _info_from_size(text: str) -> ModelInfo:
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MemoryEstimateError(
            f"unknown model source {text!r}: not a file, not a folder with config.json, and not a size such "
            f"as 7B or qwen2:1.5B"
        )
    family = (m["family"] or "llama").lower()
    if family not in _SHAPES:
        raise MemoryEstimateError(f"unknown model family {family!r} in {text!r}; known: {', '.join(_SHAPES)}")
    want = parse_param_count(f"{m['num']}{m['unit']}")
    if want <= 0:
        raise MemoryEstimateError(f"model size {text!r} must be positive")
    shapes = {
        label: _info_from_config(_config_of(family, label), name=label, kind="size")
        for label in _SHAPES[family]
    }
    label, base = min(shapes.items(), key=lambda kv: abs(math.log(kv[1].n_params / want)))
    if abs(base.n_params / want - 1) <= 0.15:
        note = f"{family} {label} shape"
        return _info_from_config(_config_of(family, label), name=text.strip(), kind="size", note=note)
    # no typical shape within 15%: keep the nearest one's width and scale its depth to the size asked
    cfg = _config_of(family, label)
    per_layer = (base.n_params - _embedding_params(base)) / base.n_layer
    cfg["num_hidden_layers"] = max(1, round((want - _embedding_params(base)) / per_layer))
    note = f"{family} {label} shape scaled to {cfg['num_hidden_layers']} layers"
    return _info_from_config(cfg, name=text.strip(), kind="size", note=note)


def _embedding_params(m: ModelInfo) -> int:
    return sum(math.prod(t.shape) for t in m.tensors if not t.name.startswith("blk."))


def load_source(source: str | os.PathLike) -> ModelInfo:
    """A GGUF file, a Hugging Face model folder (config.json) or a bare size ("7B", "qwen2:1.5B")."""
    path = Path(source)
    if path.is_dir():
        return _info_from_hf_folder(path)
    if path.is_file():
        if path.name == "config.json":
            return _info_from_hf_folder(path.parent)
        return _info_from_gguf(path)
    if os.sep in str(source) or str(source).endswith(".gguf"):
        raise MemoryEstimateError(f"{source}: no such file or folder")
    return _info_from_size(str(source))


# -- the estimate -------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    model: str
    level: str  # a llama-quantize TYPE, or the file's own type for a GGUF taken as it is
    n_ctx: int  # as asked
    kv_cells: int  # after llama.cpp's padding
    kv_type: str
    n_ubatch: int
    weights_bytes: int
    weights_mapped_bytes: int  # part of weights_bytes: the file span that stays mapped
    weights_repacked_bytes: int  # part of weights_bytes: CPU repack copies
    reclaimable_bytes: int  # mapped pages of repacked tensors: resident, never read again, droppable
    kv_bytes: int
    compute_bytes: int
    compute_reserved_bytes: int  # the scheduler's reservation + work buffer (not all of it is ever touched)
    output_bytes: int
    overhead_bytes: int

    @property
    def needed_bytes(self) -> int:
        """What must fit in RAM: the peak resident size less the reclaimable pages."""
        return self.total_bytes - self.reclaimable_bytes

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes + self.overhead_bytes
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "needed_bytes": self.needed_bytes}


_KV_TYPES = {"f16": T.F16, "f32": T.F32, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}


def _kv_row(kv_type: T, n: int) -> int:
    from .quants import row_bytes

    try:
        return row_bytes(kv_type.name, n)
    except ValueError:  # format kernels not registered: gguf-py's table holds the same block facts
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[kv_type]
        return n // block * size


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def cpu_repack_types() -> frozenset:
    """Weight types the ggml CPU backend repacks on this machine (ggml-cpu/repack.cpp, x86-64 and ARM)."""
    machine = platform.machine().lower()
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        pass
    if machine in ("x86_64", "amd64"):
        has_avx2 = " avx2" in flags if flags else True
        types = {T.Q4_0, T.Q4_K, T.IQ4_NL} if has_avx2 else set()
        if " avx512f" in flags:
            types.add(T.Q2_K)
        return frozenset(types)
    if machine in ("aarch64", "arm64"):
        if " asimddp" in flags or " i8mm" in flags or not flags:
            return frozenset({T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.Q8_0})
    return frozenset()


def _weights(tensors, repack: frozenset) -> tuple[int, int, int, int]:
    """(resident, mapped, repacked, reclaimable) weight bytes; tensors: (name, shape, type, nbytes, offset).

    llama-model-loader.cpp maps the file, reads every tensor through the mapping (repacked ones are copied
    out), then unmaps the head and tail outside the span of the tensors that stay in the mapped buffer. So
    the resident file pages are that span (the "CPU_Mapped model buffer"), including any repacked tensor
    inside it, plus the repacked copies (the "CPU_REPACK model buffer")."""
    first, last, repacked, inside = None, 0, 0, []
    for name, shape, qtype, nbytes, offset in tensors:
        is_matmul = len(shape) >= 2 and name.endswith(".weight") and not name.startswith("token_embd")
        if qtype in repack and is_matmul and shape[1] % 8 == 0:
            repacked += nbytes
            inside.append((offset, nbytes))
        else:
            first = offset if first is None else min(first, offset)
            last = max(last, offset + nbytes)
    mapped = last - first if first is not None else 0
    reclaimable = sum(n for off, n in inside if first is not None and first <= off and off + n <= last)
    return mapped + repacked, mapped, repacked, reclaimable


def _planned(model: ModelInfo, level: str) -> tuple[str, list]:
    """(level name, tensors in file order with offsets) of llama-quantize's plan for this model."""
    from .recipes import level as level_of
    from .recipes import plan_quantization

    try:
        name = level_of(level).name
        if name not in model.plans:
            plan = plan_quantization(model.tensors, model.hparams(), name)
            model.plans[name] = _in_file_order(
                [(t.name, t.shape, t.dst_type, t.nbytes) for t in plan.tensors]
            )
    except GgufkitError as e:
        raise MemoryEstimateError(f"{model.name} at {level}: {e}") from None
    return name, model.plans[name]


def _in_file_order(tensors) -> list:
    """(name, shape, type, nbytes) in the order llama-quantize writes them -> with their data offsets."""
    out, offset = [], 0
    for name, shape, qtype, nbytes in tensors:
        out.append((name, shape, qtype, nbytes, offset))
        offset += _pad(nbytes, GGUF_ALIGNMENT)
    return out


def _compute(m: ModelInfo, *, n: int, kv_cells: int, swa_cells: int, weight_types: set, flash_attn: bool):
    """(resident, reserved) compute bytes for a ubatch of n tokens against a full cache."""
    f32 = 4
    d = m.n_embd
    q = m.n_head * m.head_dim_k
    kv = max(m.n_head_kv) * max(m.head_dim_k, m.head_dim_v)
    mask_el = 2 if flash_attn else 4
    mask = kv_cells * n * mask_el + (swa_cells * n * mask_el if any(m.is_swa) else 0)
    attn = n * f32 * (2 * d + q + 2 * kv)
    if not flash_attn:  # KQ and its softmax are materialized per layer: n_kv x n x n_head f32
        attn += kv_cells * n * m.n_head * f32
    if m.n_expert:
        ffn = n * f32 * (2 * d + m.n_expert + 3 * m.n_ff_exp * max(m.n_expert_used, 1))
    else:
        ffn = n * f32 * (2 * d + 3 * m.n_ff)
    # the CPU work buffer: activations converted to the weights' vec_dot type (F16 for F16 weights, Q8_K or
    # Q8_0 for quantized ones, about 1.1 bytes per element)
    k_max = max(d, m.n_ff, m.n_ff_exp, q)
    conv = 2.0 if T.F16 in weight_types or T.BF16 in weight_types else 1.15
    work = int(n * k_max * conv)
    tokens = n * (4 + 4 + 8 + 8)  # token ids, positions, K and V cell indices
    out1 = (d + m.n_vocab) * f32  # one output row
    resident = mask + max(attn, ffn) + work + tokens + out1
    reserved = mask + max(attn, ffn, n * (d + m.n_vocab) * f32) + tokens + work
    return resident, reserved


def estimate(
    model: ModelInfo,
    *,
    n_ctx: int,
    level: str | None = None,
    kv_type: str = "f16",
    n_batch: int = 2048,
    n_ubatch: int = 512,
    flash_attn: bool = True,
    repack: frozenset | None = None,
    overhead_bytes: int | None = None,
) -> Estimate:
    """Resident memory of llama.cpp running `model` at `level` (None: a GGUF as it is) with n_ctx cells."""
    if n_ctx <= 0:
        raise MemoryEstimateError(f"context size must be positive, got {n_ctx}")
    if n_batch <= 0 or n_ubatch <= 0:
        raise MemoryEstimateError(f"batch sizes must be positive, got --batch {n_batch} --ubatch {n_ubatch}")
    kv_t = _KV_TYPES.get(str(kv_type).lower())
    if kv_t is None:
        raise MemoryEstimateError(f"unknown KV cache type {kv_type!r}; known: {', '.join(_KV_TYPES)}")
    if kv_t not in (T.F16, T.F32, T.BF16) and not flash_attn:
        raise MemoryEstimateError(
            f"a {kv_type} KV cache needs flash attention (llama.cpp refuses it without)"
        )
    repack = cpu_repack_types() if repack is None else repack
    if level is None:
        if model.kind != "gguf":
            level = "F16"
        else:
            tensors = model.file_tensors
    if level is not None:
        level, tensors = _planned(model, level)
    key = (level, repack)
    if key not in model.weights_cache:
        model.weights_cache[key] = _weights(tensors, repack), {t[2] for t in tensors}
    (weights, mapped, repacked, reclaimable), weight_types = model.weights_cache[key]

    cells = _pad(n_ctx, KV_PAD)
    n_ub = min(n_ubatch, n_batch)
    # llama-kv-cache-iswa.cpp: the SWA layers keep the window plus one ubatch (one sequence, swa_full off)
    swa_cells = _pad(min(cells, model.n_swa + n_ub), KV_PAD) if model.n_swa else 0
    kv = 0
    for il in range(model.n_layer):
        heads = model.n_head_kv[il]
        if not heads:
            continue
        n_cells = swa_cells if (swa_cells and model.is_swa[il]) else cells
        kv += (_kv_row(kv_t, model.head_dim_k * heads) + _kv_row(kv_t, model.head_dim_v * heads)) * n_cells
    n = min(n_ub, cells)
    compute, reserved = _compute(
        model,
        n=n,
        kv_cells=cells,
        swa_cells=swa_cells,
        weight_types={t[2] for t in tensors},
        flash_attn=flash_attn,
    )
    return Estimate(
        model=model.name,
        level=level or model.file_type,
        n_ctx=n_ctx,
        kv_cells=cells,
        kv_type=kv_t.name.lower(),
        n_ubatch=n,
        weights_bytes=weights,
        weights_mapped_bytes=mapped,
        weights_repacked_bytes=repacked,
        reclaimable_bytes=reclaimable,
        kv_bytes=kv,
        compute_bytes=compute,
        compute_reserved_bytes=reserved,
        output_bytes=model.n_vocab * 4,
        overhead_bytes=runtime_overhead(model) if overhead_bytes is None else overhead_bytes,
    )


# -- what fits where ----------------------------------------------------------------------------------------


@dataclass
class FitTable:
    model: str
    levels: list[str]
    contexts: list[int]
    cells: list[list[Estimate]]  # [level][context]
    ram_bytes: int | None

    def fits(self, est: Estimate) -> bool | None:
        return None if self.ram_bytes is None else est.needed_bytes <= self.ram_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ram_bytes": self.ram_bytes,
            "levels": self.levels,
            "contexts": self.contexts,
            "rows": [
                {"level": lv, "cells": [{**e.to_dict(), "fits": self.fits(e)} for e in row]}
                for lv, row in zip(self.levels, self.cells)
            ],
        }


def fit_table(model: ModelInfo, *, levels, contexts, ram_bytes: int | None = None, **options) -> FitTable:
    """Estimates for every level x context. A level may be None: a GGUF as it is."""
    cells = [[estimate(model, n_ctx=c, level=lv, **options) for c in contexts] for lv in levels]
    names = [f"{row[0].level} file" if lv is None else row[0].level for lv, row in zip(levels, cells)]
    return FitTable(model.name, names, list(contexts), cells, ram_bytes)


def format_table(table: FitTable) -> str:
    """The what-fits-where table as text: rows = levels, columns = contexts, cells = GiB, marked against
    the budget (fits / does not) when there is one."""
    head = "what fits where (GiB"
    if table.ram_bytes is not None:
        head += f"; budget {table.ram_bytes / GIB:.2f} GiB: + fits, x does not"
    lines = [head + ")", f"{'level':<12}" + "".join(f"{'n_ctx ' + str(c):>14}" for c in table.contexts)]
    for name, row in zip(table.levels, table.cells):
        cells = []
        for e in row:
            fits = table.fits(e)
            mark = "" if fits is None else (" +" if fits else " x")
            cells.append(f"{e.needed_bytes / GIB:.2f}{mark}".rjust(14))
        lines.append(f"{name:<12}" + "".join(cells))
    return "\n".join(lines)


def default_contexts(model: ModelInfo) -> list[int]:
    """The table's columns when none are asked: 2048, 8192, 32768 up to the trained context (and it)."""
    train = model.n_ctx_train
    if not train:
        return list(DEFAULT_CONTEXTS)
    cols = [c for c in DEFAULT_CONTEXTS if c < train]
    return cols + [train] if train <= 131072 else cols + [131072]


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


# -- sizes --------------------------------------------------------------------------------------------------

_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'16G', '16GiB', '512M', '8GB' -> bytes. K/M/G/T and KiB.. are powers of 1024; KB/MB/GB/TB are
    powers of 1000; a bare number is bytes."""
    m = _BYTES_RE.match(str(text))
    if not m or (m[3].lower() == "i"):
        raise MemoryEstimateError(
            f"unknown memory size {text!r}: expected a number and K, M, G or T, such as 16G"
        )
    unit = m[2].upper()
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if m[3].upper() == "B" and unit else 1024
    return int(float(m[1]) * base**power)


def available_memory() -> int:
    """The memory the OS says is available to a new process (Linux MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise MemoryEstimateError("cannot read the machine's available memory; pass --ram SIZE") from None
