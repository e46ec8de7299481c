"""Built-in engine vs llama.cpp: prompt-processing tokens/s on the same file, text and threads, one run.

    PYTHONPATH=src python -m benchmarks.bench_engine [MODEL.gguf ...] [--ctx 512] [--chunks 4] [--threads 2]
                                                     [--gemm-ceiling]

from the repository root (the helpers are imported as tests.helpers).

Default models: SmolLM2-135M F16 (made by llama.cpp from the default model) and its Q4_K_M made by
llama-quantize. Both engines evaluate the same chunks the way llama-perplexity does (ctx tokens per
chunk, fresh context per chunk, logits for the second half). llama.cpp runs through llama-cpp-python
(flash attention on, like llama-perplexity's auto) with the model already loaded; the built-in engine is
timed from opening the file, so its dequantization is included. The two engines alternate `--repeat`
times and the best run of each is kept, which damps the noise of a shared machine. Generation speed is
llama.cpp's only (the built-in engine is a scoring engine: it has no incremental decode).

--gemm-ceiling also times, on the same threads, nothing but the float32 weight products numpy's BLAS does
for those chunks (every layer's weight matrices with ctx x chunks rows, the output head with the scored
half), on random data of the model's shapes: the tokens/s the built-in engine could reach if everything
else (attention, norms, rope, rounding, dequantization) cost nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def default_models() -> list[Path]:
    from ggufkit.models import default_model_path
    from tests.helpers.llama_programs import base_model, reference_quantized

    f16 = base_model(default_model_path(), "F16")
    return [f16, reference_quantized(f16, "Q4_K_M")]


def chunks_for(path, ctx: int, n: int) -> np.ndarray:
    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.evaluation import default_text
    from ggufkit.gguf.reader import open_gguf

    with open_gguf(path) as g:
        ids = load_tokenizer(g).encode(default_text())
    return ids[: n * ctx].reshape(n, ctx)


def time_builtin(path, chunks: np.ndarray, threads: int) -> float:
    from ggufkit.engine.llama import LlamaModel
    from ggufkit.engine.numerics import blas_threads
    from ggufkit.gguf.reader import open_gguf

    first = chunks.shape[1] // 2
    t0 = time.perf_counter()
    with blas_threads(threads), open_gguf(path) as g:
        for logits in LlamaModel(g).chunk_logits(chunks, first=first):
            logits.max()
    return time.perf_counter() - t0


def time_llamacpp(runner, chunks: np.ndarray) -> float:
    first = chunks.shape[1] // 2
    t0 = time.perf_counter()
    for c in chunks:
        runner.chunk_logits(c, first=first).max()
    return time.perf_counter() - t0


def gemm_ceiling(path, n_rows: int, n_scored: int, threads: int, repeat: int = 3) -> float:
    """Seconds for the float32 products x[n_rows, in] @ W[in, out] of every 2-D weight of the model's layers
    and x[n_scored, in] @ W_output (best of `repeat`), numpy's BLAS on `threads` threads."""
    from ggufkit.engine.numerics import blas_threads
    from ggufkit.gguf.reader import open_gguf

    with open_gguf(path) as g:
        shapes = [(t.name, tuple(int(d) for d in t.shape)) for t in g.tensors if len(t.shape) == 2]
    layer = [s for name, s in shapes if name.startswith("blk.")]
    head = [s for name, s in shapes if name == "output.weight"] or [
        s for name, s in shapes if name == "token_embd.weight"
    ]
    rng = np.random.default_rng(0)
    work = [(n_rows, s) for s in layer] + [(n_scored, s) for s in head]
    xs = {(m, s[0]): rng.standard_normal((m, s[0]), dtype=np.float32) for m, s in work}
    ws = {s: rng.standard_normal(s[::-1], dtype=np.float32).T for _, s in work}  # [in, out] views
    best = float("inf")
    with blas_threads(threads):
        for _ in range(repeat):
            t0 = time.perf_counter()
            for m, s in work:
                xs[(m, s[0])] @ ws[s]
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--gemm-ceiling", action="store_true", help="also time the weight products alone")
    args = ap.parse_args()

    from ggufkit.engine.llamacpp import LlamaCppRunner

    models = [Path(m) for m in args.models] or default_models()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"threads={args.threads}, load average {os.getloadavg()[0]:.1f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"ctx {args.ctx}, {args.chunks} chunks (logits for the second half of each), best of {args.repeat}")
    head = f"{'builtin pp t/s':>15} {'llama.cpp pp t/s':>17} {'ratio':>7} {'llama.cpp tg t/s':>17}"
    print(f"{'model':<48} {head}")
    for path in models:
        chunks = chunks_for(path, args.ctx, args.chunks)
        n = chunks.size
        with LlamaCppRunner(path, ctx=args.ctx, threads=args.threads) as runner:
            time_llamacpp(runner, chunks[:1])  # warm-up (first decode allocates)
            ours, theirs = [], []
            for _ in range(args.repeat):
                theirs.append(time_llamacpp(runner, chunks))
                ours.append(time_builtin(path, chunks, args.threads))
            tg = runner.generation_speed()
        pp_ours, pp_theirs = n / min(ours), n / min(theirs)
        print(
            f"{path.name:<48} {pp_ours:>15.1f} {pp_theirs:>17.1f} {pp_ours / pp_theirs:>6.2f}x {tg:>17.1f}",
            flush=True,
        )
        if args.gemm_ceiling:
            scored = chunks.shape[0] * (args.ctx - args.ctx // 2)
            ceiling = n / gemm_ceiling(path, n, scored, args.threads)
            print(
                f"{'  numpy float32 weight products alone':<48} {ceiling:>15.1f} {pp_theirs:>17.1f} "
                f"{ceiling / pp_theirs:>6.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
