"""The estimate: what llama.cpp keeps resident while it runs a model, term by term.

It follows what llama.cpp (the tree vendored in llama-cpp-python 0.3.36) allocates and touches
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
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

from ..errors import GgufkitError, MemoryEstimateError
from ..gguf.layout import pad, row_nbytes
from ..gguf.types import FLOAT_TYPES
from ..gguf.types import GGMLQuantizationType as T
from ..quants.registry import FORMATS
from .model import ModelInfo

KV_PAD = 256  # llama-context.cpp pads n_ctx (and the SWA cache) to a multiple of 256 cells

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


_KV_TYPES = {f.name.lower(): f.ggml_type for f in FORMATS.values() if f.kv_cache}  # llama.cpp's -ctk/-ctv


def _repacked(machine: str) -> set:
    return {f.ggml_type for f in FORMATS.values() if machine in f.cpu_repack}


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
        types = _repacked("avx2") if has_avx2 else set()
        if " avx512f" in flags:
            types |= _repacked("avx512")
        return frozenset(types)
    if machine in ("aarch64", "arm64"):
        if " asimddp" in flags or " i8mm" in flags or not flags:
            return frozenset(_repacked("arm"))
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
    from ..quantize.levels import level as level_of
    from ..quantize.plan import plan_quantization

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
        offset += pad(nbytes)  # llama-quantize aligns every tensor to 32 bytes
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
    if kv_t not in FLOAT_TYPES and not flash_attn:
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

    cells = pad(n_ctx, KV_PAD)
    n_ub = min(n_ubatch, n_batch)
    # llama-kv-cache-iswa.cpp: the SWA layers keep the window plus one ubatch (one sequence, swa_full off)
    swa_cells = pad(min(cells, model.n_swa + n_ub), KV_PAD) if model.n_swa else 0
    kv = 0
    for il in range(model.n_layer):
        heads = model.n_head_kv[il]
        if not heads:
            continue
        n_cells = swa_cells if (swa_cells and model.is_swa[il]) else cells
        kv += (
            row_nbytes(kv_t, model.head_dim_k * heads) + row_nbytes(kv_t, model.head_dim_v * heads)
        ) * n_cells
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
