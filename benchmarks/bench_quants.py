"""Block kernels: ggufkit.quants.quantize vs libggml's ggml_quantize_chunk, same data, same run.

For every type in the registry (with and without importance weights where the type has an imatrix
algorithm) it prints MB/s of float32 input for ggufkit and for libggml (llama-cpp-python==0.3.36 via
tests/helpers/libggml.py), single-threaded and on all cores, and their ratio; it asserts that the bytes are
equal.
libggml on N cores = the rows split into N chunks, each chunk one ggml_quantize_chunk call on a thread
(ctypes releases the GIL), as llama-quantize does; ggufkit on N cores = quants.set_threads(N): the native
library's row chunks on N threads (--backend native, the default), or numba's parallel kernels
(--backend jit); numpy-only kernels are unaffected by the thread count.

It also measures, in fresh subprocesses with an empty numba cache directory, the JIT kernels' first-call
cost per type (compile) and then the same with that cache warm, plus the import time. (The native
library has no per-type first call: it is built once per machine; bench_quantize.py --first-use times
that.) Run from the repository root (the helpers are imported as tests.helpers):

    PYTHONPATH=src python -m benchmarks.bench_quants [--rows 256 --cols 4096 --repeat 3]
                                                     [--backend native|jit] [--write-docs]

--write-docs replaces the "## Block kernels" section of docs/benchmarks.md with the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

# libgomp (loaded with libggml, and numba's omp threading layer) spin-waits by default, which starves
# the other side on a machine with few cores; it changes timings only, never bytes (as ggufkit quantize).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from ggufkit import quants  # noqa: E402
from tests.helpers.libggml import ggml_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def ggml_quantize_threads(x, qtype, importance, pool, n_threads):
    if n_threads == 1:
        return ggml_quantize(x, qtype, importance)
    parts = [p for p in np.array_split(x, n_threads) if len(p)]
    return np.concatenate(list(pool.map(lambda p: ggml_quantize(p, qtype, importance), parts)))


def best_time(fn, repeat, clock):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = clock()
        out = fn()
        best = min(best, clock() - t)
    return best, out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return (
        f"{model}, {os.cpu_count()} logical cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, numba {numba.__version__}"
    )


_FIRST_CALL = r"""
import json, sys, time
t = time.perf_counter(), time.process_time()
import numpy as np
from ggufkit import quants
from ggufkit.quants import registry
quants.set_backend("jit")
registry.jit_kernels("F32")  # imports numba and every kernel module
fmts = quants.formats()
out = {"import": (time.perf_counter() - t[0], time.process_time() - t[1])}
x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
imp = np.ones(256, np.float32)
for name, fmt in fmts.items():
    t = time.perf_counter(), time.process_time()
    q = quants.quantize(x, name)
    if fmt.uses_importance:
        quants.quantize(x, name, importance=imp)
    quants.dequantize(q, name, x.shape)
    out[name] = (time.perf_counter() - t[0], time.process_time() - t[1])
print(json.dumps(out))
"""


def first_call_costs(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default="", help="comma-separated subset (default: every registered type)")
    ap.add_argument("--backend", default="native", choices=("native", "jit"))
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    quants.set_backend(args.backend)

    with tempfile.TemporaryDirectory() as cache:
        cold = first_call_costs(cache)
        warm = first_call_costs(cache)

    n_all = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    imp = rng.gamma(1.0, 1.0, args.cols).astype(np.float32)
    mb = x.nbytes / 1e6
    names = [t.strip().upper() for t in args.types.split(",") if t.strip()] or list(quants.formats())
    rows = []
    with ThreadPoolExecutor(n_all) as pool:
        for name in names:
            fmt = quants.get_format(name)
            for importance in (None, imp) if fmt.uses_importance else (None,):
                quants.quantize(x[:2], name, importance=importance)  # compile / load from cache
                row = {"type": name, "imatrix": importance is not None}
                for threads in (1, n_all):
                    # 1 thread: process CPU time (robust to other jobs on a shared machine); N: wall time
                    clock = time.process_time if threads == 1 else time.perf_counter
                    quants.set_threads(threads)
                    quants.quantize(x[: 4 * threads], name, importance=importance)  # start the threads
                    t_ours = t_ref = float("inf")
                    for _ in range(args.repeat):  # interleaved, best of each
                        t, ours = best_time(
                            partial(quants.quantize, x, name, importance=importance), 1, clock
                        )
                        t_ours = min(t_ours, t)
                        t, ref = best_time(
                            partial(ggml_quantize_threads, x, name, importance, pool, threads), 1, clock
                        )
                        t_ref = min(t_ref, t)
                    assert np.array_equal(ours, ref), f"{name} imatrix={importance is not None}: bytes differ"
                    row[threads] = (mb / t_ours, mb / t_ref)
                rows.append(row)
                r1, rn = row[1], row[n_all]
                print(
                    f"{name:7s} {'imatrix' if row['imatrix'] else 'ref':7s}  1 thread: ggufkit {r1[0]:8.1f} "
                    f"libggml {r1[1]:8.1f} MB/s x{r1[0] / r1[1]:5.2f}   {n_all} threads: ggufkit "
                    f"{rn[0]:8.1f} libggml {rn[1]:8.1f} MB/s x{rn[0] / rn[1]:5.2f}",
                    flush=True,
                )
    quants.set_threads(None)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Block kernels",
        "",
        f"`python -m benchmarks.bench_quants --rows {args.rows} --cols {args.cols} --repeat {args.repeat} "
        f"--backend {args.backend}` on {date}; {machine()}; ggufkit kernels: {quants.backend()}.",
        f"Input: seeded gaussian float32 [{args.rows}, {args.cols}] ({mb:.1f} MB), importance = gamma(1, 1) "
        "per column. MB/s of float32 input, best of the interleaved repeats; x = ggufkit / libggml (> 1: "
        "ggufkit faster). libggml = `ggml_quantize_chunk` of llama-cpp-python 0.3.36, on N threads as N row "
        "chunks on a thread pool. 1T columns use process CPU time (the machine is shared with other jobs, "
        f"which wall time would charge to whichever side they overlap); {n_all}T columns use wall time. "
        "Every output was checked byte-equal to libggml's in the same run. OMP_WAIT_POLICY=PASSIVE (as "
        "`ggufkit quantize` sets it; libgomp's default spin-waiting starves the other side on 2 cores).",
        "",
        f"| type | imatrix | ggufkit 1T | libggml 1T | x 1T | ggufkit {n_all}T | libggml {n_all}T "
        f"| x {n_all}T |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r1, rn = row[1], row[n_all]
        lines.append(
            f"| {row['type']} | {'yes' if row['imatrix'] else 'no'} | {r1[0]:.1f} | {r1[1]:.1f} | "
            f"{r1[0] / r1[1]:.2f} | {rn[0]:.1f} | {rn[1]:.1f} | {rn[0] / rn[1]:.2f} |"
        )
    lines += [
        "",
        "JIT kernels (the fallback without a C compiler), first call per type in a fresh process (quantize, "
        "quantize with importance, dequantize of 2 rows; "
        "a type's first call also pays for kernels it shares with types before it): cold = empty numba "
        "cache (compile), warm = the cache the cold run filled. Seconds, wall / process CPU.",
        "",
        "| | " + " | ".join(cold) + " | total |",
        "|---|" + "---:|" * (len(cold) + 1),
    ]
    for label, d in (("cold", cold), ("warm", warm)):
        total = [sum(v[i] for v in d.values()) for i in (0, 1)]
        cells = " | ".join(f"{v[0]:.2f} / {v[1]:.2f}" for v in d.values())
        lines.append(f"| {label} | {cells} | {total[0]:.1f} / {total[1]:.1f} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.write_docs:
        path = ROOT / "docs" / "benchmarks.md"
        text = path.read_text()
        start = text.index("## Block kernels")
        end = text.find("\n## ", start + 1)
        text = text[:start] + table + (text[end:] if end >= 0 else "")
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
