"""Off-grid full-precision bases: a quantized model's F32 with seeded noise below its own quantization step.

A model that ships quantized (SmolLM2-135M-Instruct as Q4_1) gives, dequantized, an F32 base whose weights
sit on a grid; a search that re-finds that grid (every Q4_1 block is a Q5_1 block; Q4_1 re-finds its own
scale and min) reproduces the base with no error, a gain no full-precision model would give. `offgrid_base`
takes the grid away without moving any weight by more than a stated fraction of its own step:

    for every tensor stored in a block format in the source whose step element_steps reads (Q4_0, Q4_1,
    Q5_0, Q5_1, Q8_0: the 2-D matmul weights and token_embd of SmolLM2; Q4_K, Q5_K, Q6_K: Gemma 3 270M's
    K-quant tensors), each element x of step d (the distance between neighbouring levels where it sits:
    a legacy block's fp16 d, a K-quant super-block's d times its sub-block's scale, read from the source's
    bytes) becomes
        x + float32(u * size * |d|),   u ~ Uniform[-1, 1) independently per element,
    u drawn as numpy's Generator(PCG64(seed)).uniform(-1, 1, n) per tensor in the source's tensor order,
    in float64, the product rounded to float32 and added in float32. Every other tensor (the F32 norms) is
    copied unchanged.

x is llama.cpp's own F32 of the source (`base_model(src, "F32")`: llama_model_quantize, so the metadata is
llama.cpp's) and is checked to equal ggufkit's dequantization of the source blocks; the output is that file
with the noise added to the data of those tensors, cached in ~/.cache/ggufkit/bases by (source sha256, seed,
size). With size = 0.5 (the default) a weight moves by at most half a step, and its position relative to
the source grid (and to every grid that contains it with a step d/k, such as Q5_1's d/2) is uniform: the
source grid is no closer to the weights than any other grid of the same step, so recovering it gains
nothing. The noise is as large as Q4_1's own rounding error (rms |d|/sqrt(12)), so the off-grid model is
a slightly different model from the shipped one; it is a base to measure against, not a better model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ggufkit.cache import cache_dir, sha256_file
from ggufkit.gguf.reader import open_gguf
from ggufkit.quants import registry

from .llama_programs import base_model

DEFAULT_SEED = 0
DEFAULT_SIZE = 0.5


def _k4_scales(raw: np.ndarray) -> np.ndarray:
    """The eight 6-bit sub-block scales of Q4_K / Q5_K blocks [n, 8] (ggml's get_scale_min_k4: bytes 4..15
    of the block hold 8 scales and 8 mins, the high two bits of the last four packed into the first eight)."""
    q = raw[:, 4:16].astype(np.int32)
    low = q[:, 0:4] & 63
    high = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    return np.concatenate([low, high], axis=1)


def element_steps(tensor) -> np.ndarray:
    """The quantization step of every element of a quantized tensor (ggufkit's reader and registry), float32
    [n_blocks, block_size] in storage order: the distance between neighbouring levels where that element
    sits. Legacy blocks (Q4_0 ... Q8_0) start with their scale d as fp16, one step per block; a Q4_K / Q5_K
    super-block has d (fp16, bytes 0-1) times a 6-bit scale per 32 elements; a Q6_K super-block has d (fp16,
    its last two bytes) times an int8 scale per 16 elements. Other formats raise ValueError."""
    fmt = registry.get_format(tensor.ggml_type)
    raw = np.asarray(tensor.data()).reshape(-1, fmt.type_size)

    def f16(lo: int) -> np.ndarray:
        return raw[:, lo : lo + 2].copy().view(np.float16).reshape(-1).astype(np.float32)

    if fmt.kernels == "legacy":
        sub = np.abs(f16(0))[:, None]
    elif fmt.name in ("Q4_K", "Q5_K"):
        sub = np.abs(f16(0)[:, None] * _k4_scales(raw).astype(np.float32))
    elif fmt.name == "Q6_K":
        scales = raw[:, 192:208].copy().view(np.int8).astype(np.float32)
        sub = np.abs(f16(208)[:, None] * scales)
    else:
        raise ValueError(f"tensor {tensor.name}: no step per element for {fmt.name} here")
    return np.repeat(sub, fmt.block_size // sub.shape[1], axis=1)


PERTURBED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # element_steps knows these


def perturbed_tensors(src) -> list[str]:
    """The names of the tensors `offgrid_base` perturbs: those stored in `src` in a PERTURBED format."""
    with open_gguf(src) as g:
        return [t.name for t in g.tensors if registry.get_format(t.ggml_type).name in PERTURBED]


def write_offgrid(src, dst, *, seed: int = DEFAULT_SEED, size: float = DEFAULT_SIZE) -> Path:
    """Write the off-grid F32 base of the quantized GGUF `src` at `dst` (the recipe in the module docstring).
    0 < size < 1: the noise bound as a fraction of each block's step."""
    if not 0.0 < size < 1.0:
        raise ValueError(f"noise size {size} must be in (0, 1): a fraction of the quantization step")
    on_grid = base_model(src, "F32")
    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(on_grid, tmp)
    rng = np.random.Generator(np.random.PCG64(seed))
    try:
        with open_gguf(src) as g, open_gguf(tmp) as out:
            data = np.memmap(tmp, dtype=np.uint8, mode="r+")
            for t in g.tensors:
                fmt = registry.get_format(t.ggml_type)
                if fmt.name not in PERTURBED:
                    continue
                o = out.tensor(t.name)
                if o.ggml_type.name != "F32" or o.shape != t.shape:
                    raise ValueError(f"tensor {t.name}: {o.ggml_type.name} {o.shape} in {on_grid}, not F32")
                start = out.data_offset + o.offset
                x = data[start : start + o.nbytes].view(np.float32).reshape(-1, fmt.block_size)
                deq = registry.dequantize(np.asarray(t.data()), t.ggml_type, (t.n_elements,))
                if not np.array_equal(x.reshape(-1), deq):
                    raise ValueError(f"tensor {t.name}: llama.cpp's F32 is not ggufkit's dequantization")
                step = element_steps(t).astype(np.float64)
                u = rng.uniform(-1.0, 1.0, size=x.shape)
                x += (u * (size * step)).astype(np.float32)
            data.flush()
            del data
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def offgrid_base(src, *, seed: int = DEFAULT_SEED, size: float = DEFAULT_SIZE) -> Path:
    """The cached off-grid F32 base of `src` (made once per source content, seed and size)."""
    src = Path(src)
    key = sha256_file(src)[:16]
    target = cache_dir("bases") / f"{src.stem}-offgrid-{key}-seed{seed}-size{size:g}.gguf"
    if not target.exists():
        write_offgrid(src, target, seed=seed, size=size)
    return target


def parse_base(spec: str) -> tuple[str, int, float]:
    """`f32` or `offgrid[:SEED[:SIZE]]` (benchmarks' --base) -> (kind, seed, size)."""
    kind, *rest = spec.split(":")
    if kind == "f32" and not rest:
        return kind, DEFAULT_SEED, DEFAULT_SIZE
    if kind != "offgrid" or len(rest) > 2:
        raise ValueError(f"--base {spec!r}: expected f32 or offgrid[:SEED[:SIZE]]")
    seed = int(rest[0]) if rest and rest[0] else DEFAULT_SEED
    size = float(rest[1]) if len(rest) > 1 else DEFAULT_SIZE
    return kind, seed, size
