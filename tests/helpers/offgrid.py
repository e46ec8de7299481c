"""Off-grid full-precision bases: a quantized model's F32 with seeded noise below its own quantization step.

A model that ships quantized (SmolLM2-135M-Instruct as Q4_1) gives, dequantized, an F32 base whose weights
sit on a grid; a search that re-finds that grid (every Q4_1 block is a Q5_1 block; Q4_1 re-finds its own
scale and min) reproduces the base with no error, a gain no full-precision model would give. `offgrid_base`
takes the grid away without moving any weight by more than a stated fraction of its own step:

    for every tensor stored in a legacy block format in the source (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the 2-D
    matmul weights and token_embd of SmolLM2), each element x in a block of scale d (the block's fp16 d,
    read from the source's bytes: the step between neighbouring levels of that block) becomes
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


def block_steps(tensor) -> np.ndarray:
    """The quantization step |d| of every block of a legacy-format tensor (ggufkit's reader and registry),
    float32 [n_blocks] in storage order. Legacy blocks start with their scale d as fp16
    (quants/legacy.py); the levels of a block are d apart."""
    fmt = registry.get_format(tensor.ggml_type)
    if fmt.kernels != "legacy":
        raise ValueError(
            f"tensor {tensor.name}: {fmt.name} has no single step per block (only the legacy formats do)"
        )
    blocks = np.asarray(tensor.data()).reshape(-1, fmt.type_size)
    d = blocks[:, :2].copy().view(np.float16).reshape(-1).astype(np.float32)
    return np.abs(d)


def perturbed_tensors(src) -> list[str]:
    """The names of the tensors `offgrid_base` perturbs: those stored in a legacy block format in `src`."""
    with open_gguf(src) as g:
        return [t.name for t in g.tensors if registry.get_format(t.ggml_type).kernels == "legacy"]


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
                if fmt.kernels != "legacy":
                    continue
                o = out.tensor(t.name)
                if o.ggml_type.name != "F32" or o.shape != t.shape:
                    raise ValueError(f"tensor {t.name}: {o.ggml_type.name} {o.shape} in {on_grid}, not F32")
                start = out.data_offset + o.offset
                x = data[start : start + o.nbytes].view(np.float32).reshape(-1, fmt.block_size)
                deq = registry.dequantize(np.asarray(t.data()), t.ggml_type, (t.n_elements,))
                if not np.array_equal(x.reshape(-1), deq):
                    raise ValueError(f"tensor {t.name}: llama.cpp's F32 is not ggufkit's dequantization")
                step = block_steps(t)[:, None].astype(np.float64)
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
