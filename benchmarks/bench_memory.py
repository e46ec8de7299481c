"""ggufkit ram's estimate vs llama.cpp's measured peak resident memory, for the record (docs/benchmarks.md).

For SmolLM2-135M at F16 (llama.cpp's own conversion), Q8_0 and Q4_K_M (llama-quantize) and contexts 512,
2048 and 8192, and for a synthetic llama whose rows are multiples of 256: llama-bench (built from the
llama-cpp-python 0.3.36 tree) runs a prompt of n_ctx - 16 tokens and 16 generated in one context of n_ctx
(-pg), 2 threads, and its peak RSS is read from the kernel. Printed: the estimate and its terms, the
measured peak, the error, and a naive "file size + KV cache" estimate for comparison; then the time of
one estimate vs one llama-bench run (the only other way to know).

From the repository root (the helpers are imported as tests.helpers):

    PYTHONPATH=src python -m benchmarks.bench_memory [--quick]   # --quick: skip the 8192-token runs
    PYTHONPATH=src python -m benchmarks.bench_memory --fit       # re-derive the runtime overhead constants
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ggufkit import memory
from ggufkit.cache import cache_dir
from ggufkit.memory import estimator
from ggufkit.models import default_model_path
from tests.helpers.llama_programs import base_model, reference_quantized
from tests.helpers.memory_oracle import llama_bench_peak_rss, make_small_model
from tests.helpers.synthetic import synthetic_llama


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def residual(path, n_ctx: int = 2048) -> tuple[float, memory.ModelInfo]:
    """Measured peak RSS minus the estimate's weights, KV, compute and output terms (bytes)."""
    model = memory.load_source(path)
    est = memory.estimate(model, n_ctx=n_ctx)
    return llama_bench_peak_rss(path, n_ctx) - (est.total_bytes - est.overhead_bytes), model


def fit_overhead(src: Path) -> None:
    """ggufkit.memory.estimator's OVERHEAD_* constants: small 4-layer llama models that differ only in
    vocabulary size and merge count give bytes per token and per merge; SmolLM2 (272 tensors vs 38) gives
    bytes per tensor; the rest is the base."""
    tokens, merges = 150_848, 150_848
    made = {}
    for name, kw in [
        ("v49k", {}),
        ("v200k", dict(extra_tokens=tokens)),
        ("v200k-merges", dict(extra_tokens=tokens, extra_merges=merges)),
    ]:
        path = cache_dir("bench") / f"fit-{name}.gguf"
        if not path.exists():
            make_small_model(path, src, arch="llama", **kw)
        made[name] = residual(path)
    (r0, m0), (r1, _), (r2, _) = made["v49k"], made["v200k"], made["v200k-merges"]
    per_token = (r1 - r0) / tokens
    per_merge = (r2 - r1) / merges
    r_smol, m_smol = residual(base_model(src, "F16"))
    vocab = lambda m: per_token * m.n_vocab + per_merge * m.n_merges  # noqa: E731
    per_tensor = ((r_smol - vocab(m_smol)) - (r0 - vocab(m0))) / (len(m_smol.tensors) - len(m0.tensors))
    base = r0 - vocab(m0) - per_tensor * len(m0.tensors)
    print(
        f"OVERHEAD_BASE = {base / 1024:.0f} KiB, OVERHEAD_PER_TOKEN = {per_token:.0f} B, "
        f"OVERHEAD_PER_MERGE = {per_merge:.0f} B, OVERHEAD_PER_TENSOR = {per_tensor:.0f} B"
    )
    print(
        f"in ggufkit.memory.estimator: {estimator.OVERHEAD_BASE / 1024:.0f} KiB, "
        f"{estimator.OVERHEAD_PER_TOKEN} B, {estimator.OVERHEAD_PER_MERGE} B, "
        f"{estimator.OVERHEAD_PER_TENSOR} B"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip n_ctx 8192")
    ap.add_argument("--only", metavar="TEXT", help="only the models whose name contains TEXT")
    ap.add_argument("--fit", action="store_true", help="re-derive the runtime overhead constants")
    args = ap.parse_args()
    if args.fit:
        fit_overhead(default_model_path())
        return 0

    src = default_model_path()
    f16 = base_model(src, "F16")
    files = {
        ("SmolLM2-135M", "F16"): f16,
        ("SmolLM2-135M", "Q8_0"): reference_quantized(f16, "Q8_0"),
        ("SmolLM2-135M", "Q4_K_M"): reference_quantized(f16, "Q4_K_M"),
    }
    syn = synthetic_llama(src, seed=0, dtype="F16")
    files[("synthetic 256-row", "F16")] = syn
    files[("synthetic 256-row", "Q4_K_M")] = reference_quantized(syn, "Q4_K_M")
    gemma2 = cache_dir("bench") / "gemma2-swa.gguf"
    files[("synthetic gemma2 SWA", "F16")] = gemma2 if gemma2.exists() else make_small_model(gemma2, src)
    big = cache_dir("bench") / "llama-vocab-150k.gguf"
    if not big.exists():
        make_small_model(big, src, arch="llama", extra_tokens=150_000 - 49_152, extra_merges=60_000)
    files[("synthetic 150k vocab", "F16")] = big
    contexts = (512, 2048) if args.quick else (512, 2048, 8192)

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} {cpu}, "
        f"{os.cpu_count()} cores, llama-bench -pg (n_ctx-16),16 -t 2 -r 1 --no-warmup"
    )
    print(
        "| model | level | n_ctx | weights | KV | compute | overhead | estimate MiB | measured MiB | error "
        "| naive file+KV | naive error |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors, t_est, t_run = [], 0.0, 0.0
    for (name, level), path in files.items():
        if args.only and args.only not in name:
            continue
        for n_ctx in contexts:
            if name.startswith("synthetic") and n_ctx != 2048:
                continue
            t0 = time.perf_counter()
            est = memory.estimate(memory.load_source(path), n_ctx=n_ctx)
            t1 = time.perf_counter()
            measured = llama_bench_peak_rss(path, n_ctx)
            t2 = time.perf_counter()
            t_est += t1 - t0
            t_run += t2 - t1
            err = est.total_bytes / measured - 1
            naive = os.path.getsize(path) + est.kv_bytes
            errors.append(abs(err))
            print(
                f"| {name} | {level} | {n_ctx} | {mib(est.weights_bytes)} | {mib(est.kv_bytes)} | "
                f"{mib(est.compute_bytes + est.output_bytes)} | {mib(est.overhead_bytes)} | "
                f"{mib(est.total_bytes)} | {mib(measured)} | {err:+.1%} | {mib(naive)} | "
                f"{naive / measured - 1:+.1%} |",
                flush=True,
            )
    print()
    print(f"max |error| {max(errors):.1%}, mean |error| {sum(errors) / len(errors):.1%}, {len(errors)} cases")
    print(
        f"time: ggufkit estimates {t_est:.2f} s in all, llama-bench runs {t_run:.0f} s "
        f"(ratio {t_run / max(t_est, 1e-9):.0f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
