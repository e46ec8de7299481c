"""Quantize files: `ggufkit quantize` vs `llama-quantize`, same input, same TYPE, same threads, same run.

Each job runs as a fresh process (the CLI against the program, startup included), alternating the two,
`--repeat` times; the script prints the median wall time, the peak RSS of each process (getrusage of the
child: ru_maxrss, which counts mapped input pages the process touched), their ratios, and checks that the
two outputs have the same sha256. The page cache is warmed by one untimed run of each first.

    PYTHONPATH=src python -m benchmarks.bench_quantize [--base synthetic_f32]
        [--levels Q4_K_M,Q6_K,Q8_0,Q2_K] [--threads N] [--repeat 3] [--first-use] [--startup] [--write-docs]

from the repository root (the helpers are imported as tests.helpers).
Bases: synthetic_f32 / synthetic_f16 (tests/helpers/synthetic.py: 256-wide rows, untied output, so K-quants
run on every tensor), synthetic_big_f16 / synthetic_big_f32 (same generator, 2048 wide, ~290M weights),
smollm2_f16 / smollm2_f32 (SmolLM2-135M dequantized by llama.cpp). --write-docs replaces the
"## Quantize files" section of docs/benchmarks.md with the table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ggufkit.models import default_model_path
from ggufkit.quantize.job import quantize_file
from tests.helpers.llama_programs import base_model, tool
from tests.helpers.synthetic import synthetic_llama

ROOT = Path(__file__).resolve().parent.parent

# A bigger synthetic llama (~290M weights: 2048-wide, vocab 49152, untied output) where the largest tensor,
# not the interpreter, sets the memory peak.
BIG = dict(n_embd=2048, n_layer=2, n_head=16, n_head_kv=4, n_ff=5632)


def base_path(name: str) -> Path:
    smollm2 = default_model_path()
    if name.startswith("synthetic_big_"):
        return synthetic_llama(smollm2, seed=0, dtype=name.split("_")[2].upper(), **BIG)
    if name.startswith("synthetic_"):
        return synthetic_llama(smollm2, seed=0, dtype=name.split("_")[1].upper())
    return base_model(smollm2, name.split("_")[1].upper())


# Peak RSS must be measured from a small parent: a child's ru_maxrss starts at its parent's high-water mark
# (Linux carries it across fork/vfork and exec), and this script grows while it times the library.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, ru = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t
print(json.dumps(dict(rc=os.waitstatus_to_exitcode(status), wall=wall, maxrss=ru.ru_maxrss * 1024,
                      cpu=ru.ru_utime + ru.ru_stime, err=err.decode(errors="replace")[-1500:])))
"""


def run_measured(cmd: list[str], env=None) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds user+system) of one process; raises if it fails."""
    launcher = [sys.executable, "-S", "-c", _LAUNCHER]
    out = subprocess.run([*launcher, *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"launcher failed: {out.stderr[-1500:]}")
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r['rc']}): {r['err']}")
    return r["wall"], r["maxrss"], r["cpu"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def ggufkit_env(**extra) -> dict[str, str]:
    """The ggufkit process's environment: this checkout first, and Python's bytecode cache allowed (an
    installed package has its .pyc files; with PYTHONDONTWRITEBYTECODE set, as some sandboxes do, every
    run would recompile ggufkit's modules: ~0.05 s)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env | extra


def first_use(level: str, threads: int) -> list[str]:
    """What the first use costs (building the native library in an empty cache) and what a run without a
    C compiler does (numba JIT kernels)."""
    src = base_path("synthetic_f32")
    build = [sys.executable, "-m", "ggufkit.quants.native", "build"]
    quantize = [sys.executable, "-m", "ggufkit", "quantize", str(src)]
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        built = run_measured(build, ggufkit_env(GGUFKIT_CACHE=f"{tmp}/cache"))
        no_cc = ggufkit_env(GGUFKIT_CACHE=f"{tmp}/nocc", CC=f"{tmp}/no-such-cc")
        jit_cmd = [*quantize, f"{tmp}/jit.gguf", level, str(threads)]
        run_measured(jit_cmd, no_cc)  # warm-up
        jit = run_measured(jit_cmd, no_cc)
        nat_cmd = [*quantize, f"{tmp}/native.gguf", level, str(threads)]
        run_measured(nat_cmd, ggufkit_env())
        nat = run_measured(nat_cmd, ggufkit_env())
        same = sha256(Path(f"{tmp}/jit.gguf")) == sha256(Path(f"{tmp}/native.gguf"))
        warning = subprocess.run(jit_cmd, capture_output=True, text=True, env=no_cc).stderr.strip()
    return [
        "First use and fallback (`--first-use`): building the native kernels in an empty cache "
        f"(`python -m ggufkit.quants.native build`, what the first `ggufkit quantize` runs, once, under a "
        f"lock, saying so on stderr) took {built[0]:.1f} s wall, {built[2]:.1f} s CPU, peak RSS "
        f"{built[1] / 2**20:.0f} MiB: every kernel is compiled from source with an empty numba cache, for "
        "the library and as the JIT kernels the library is checked against before it is installed.",
        "",
        f"Without a C compiler (CC pointing nowhere) `ggufkit quantize` prints one warning (`{warning}`) and "
        f"runs on numba's JIT kernels: synthetic_f32 {level}, {threads} threads, {jit[0]:.2f} s wall, "
        f"{jit[1] / 2**20:.0f} MiB peak RSS, against {nat[0]:.2f} s and {nat[1] / 2**20:.0f} MiB with the "
        f"native library; same sha256: {'yes' if same else 'NO'}.",
    ]


_IMPORTS = (
    "from ggufkit.cli import build_parser; build_parser('quantize'); "
    "import ggufkit.quantize.job, ggufkit.quantize.plan; from ggufkit import quants; quants.backend()"
)


def startup(repeat: int) -> list[str]:
    """The fixed floor of a `ggufkit quantize` process, step by step, each a fresh process: the interpreter,
    everything the quantize command imports and loads before it opens its input (the parser, the
    pipeline, the native kernels; no numpy), and then reading the input's header (synthetic_f32: 49,152-token
    vocabulary). For scale, the interpreter with numpy, which the quantize command does not import."""
    src = str(base_path("synthetic_f32"))
    steps = [
        ("python -c pass (interpreter and site)", "pass"),
        ("(python -c 'import numpy', for scale: not imported by quantize)", "import numpy"),
        ("+ the quantize command's imports and kernels", _IMPORTS),
        (
            "+ open the input (header, KVs, tensor table)",
            f"{_IMPORTS}; ggufkit.gguf.reader.open_gguf({str(src)!r})",
        ),
    ]
    env = ggufkit_env()
    lines = [
        f"Start-up floor of a `ggufkit quantize` process (`--startup`; median of {repeat} fresh processes "
        "each, run alternately):",
        "",
        "| process | wall | CPU | peak RSS |",
        "|---|---:|---:|---:|",
    ]
    runs = {name: [] for name, _ in steps}
    for _name, code in steps:  # warm-up: page cache, bytecode cache
        run_measured([sys.executable, "-c", code], env)
    for _ in range(repeat):
        for name, code in steps:
            runs[name].append(run_measured([sys.executable, "-c", code], env))
    for name, _ in steps:
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[2] for r in runs[name])
        rss = max(r[1] for r in runs[name])
        lines.append(f"| {name} | {wall:.3f} s | {cpu:.3f} s | {rss / 2**20:.0f} MiB |")
        print(f"startup: {name}: {wall:.3f} s wall, {cpu:.3f} s CPU, {rss / 2**20:.0f} MiB", flush=True)
    return lines


def bench_base(base: str, levels: list[str], threads: int, repeat: int) -> list[str]:
    src = base_path(base)
    quantize = str(tool("llama-quantize"))
    env = ggufkit_env()
    ours_cmd = [sys.executable, "-m", "ggufkit", "quantize"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        ref_out, our_out = Path(tmp) / "ref.gguf", Path(tmp) / "ours.gguf"
        for level in levels:
            # untimed warm-up: page cache (and the native library or numba's cache, if not there yet)
            run_measured([quantize, str(src), str(ref_out), level, str(threads)])
            run_measured([*ours_cmd, str(src), str(our_out), level, str(threads)], env)
            ref_t, ref_m, ref_c, our_t, our_m, our_c = [], [], [], [], [], []
            for _ in range(repeat):
                t, m, c = run_measured([quantize, str(src), str(ref_out), level, str(threads)])
                ref_t.append(t)
                ref_m.append(m)
                ref_c.append(c)
                t, m, c = run_measured([*ours_cmd, str(src), str(our_out), level, str(threads)], env)
                our_t.append(t)
                our_m.append(m)
                our_c.append(c)
            same = sha256(ref_out) == sha256(our_out)
            # the library in this (warm) process: no start-up, kernels already loaded
            quantize_file(src, our_out, level, threads=threads)
            lib_t = []
            for _ in range(repeat):
                t = time.perf_counter()
                quantize_file(src, our_out, level, threads=threads)
                lib_t.append(time.perf_counter() - t)
            same = same and sha256(ref_out) == sha256(our_out)
            r = dict(
                level=level,
                ref_t=statistics.median(ref_t),
                our_t=statistics.median(our_t),
                lib_t=statistics.median(lib_t),
                ref_c=statistics.median(ref_c),
                our_c=statistics.median(our_c),
                ref_m=max(ref_m),
                our_m=max(our_m),
                same=same,
            )
            rows.append(r)
            print(
                f"{base} {level:7s} llama-quantize {r['ref_t']:6.2f} s {r['ref_m'] / 2**20:7.1f} MiB | "
                f"ggufkit {r['our_t']:6.2f} s {r['our_m'] / 2**20:7.1f} MiB, library {r['lib_t']:.2f} s | "
                f"time x{r['our_t'] / r['ref_t']:.2f} memory x{r['our_m'] / r['ref_m']:.2f} | "
                f"identical: {same}",
                flush=True,
            )
    lines = [
        f"Input: {base} ({src.name}, {src.stat().st_size / 2**20:.1f} MiB), {threads} threads.",
        "",
        "| TYPE | llama-quantize wall | ggufkit CLI wall | ratio | ggufkit library wall | ratio "
        "| llama-quantize CPU | ggufkit CLI CPU | ratio | llama-quantize peak RSS | ggufkit peak RSS | ratio "
        "| same sha256 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['level']} | {r['ref_t']:.2f} s | {r['our_t']:.2f} s | {r['our_t'] / r['ref_t']:.2f} | "
            f"{r['lib_t']:.2f} s | {r['lib_t'] / r['ref_t']:.2f} | {r['ref_c']:.2f} s | {r['our_c']:.2f} s | "
            f"{r['our_c'] / r['ref_c']:.2f} | {r['ref_m'] / 2**20:.0f} MiB | "
            f"{r['our_m'] / 2**20:.0f} MiB | {r['our_m'] / r['ref_m']:.2f} | "
            f"{'yes' if r['same'] else 'NO'} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="synthetic_f32", help="comma-separated bases")
    ap.add_argument("--levels", default="Q4_K_M,Q6_K,Q8_0,Q2_K")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--first-use", action="store_true", help="also measure the native build and the fallback")
    ap.add_argument("--startup", action="store_true", help="also measure the start-up floor, step by step")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    lines = [
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}; "
        f"`python -m benchmarks.bench_quantize --base "
        f"{args.base} --levels {args.levels} --threads {args.threads} --repeat {args.repeat}"
        f"{' --first-use' if args.first_use else ''}{' --startup' if args.startup else ''}`.",
        "",
        f"Times: median wall time of {args.repeat} fresh processes run alternately (the ggufkit CLI's "
        "includes Python start-up and imports), and of "
        f"{args.repeat} `quantize_file` calls in one warm process (the library, no start-up). Memory: the "
        "largest peak RSS (ru_maxrss) of the processes. CPU: user + system seconds of the process (all "
        "threads; less sensitive than wall time to other jobs on a shared machine). Ratios are ggufkit / "
        "llama-quantize. The ggufkit CLI runs on the native kernel library (quants/native.py: the numba "
        "kernels compiled ahead of time, loaded with ctypes) on raw memory, so numba, llvmlite and numpy "
        "are never imported; its fixed floor is Python, its own imports and reading the GGUF header "
        "(`--startup` measures it step by step). Chunks of rows run whole on the worker threads, a few "
        "ahead of the one being written (pipeline.py).",
    ]
    if args.first_use:
        lines += ["", *first_use(args.levels.split(",")[0], args.threads)]
    if args.startup:
        lines += ["", *startup(max(args.repeat, 5))]
    for base in args.base.split(","):
        lines += ["", *bench_base(base, args.levels.split(","), args.threads, args.repeat)]
    load_after = os.getloadavg()[0]
    load = f"{load_before:.1f} at the start, {load_after:.1f} at the end"
    lines += ["", f"1-minute load average of the machine (other jobs included): {load}."]
    table = "\n".join(lines)
    print()
    print(table)
    if args.write_docs:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        head = "## Quantize files\n"
        start = text.index(head) + len(head)
        nxt = text.find("\n## ", start)
        rest = text[nxt + 1 :] if nxt >= 0 else ""
        doc.write_text(
            text[:start] + f"\n(benchmarks/bench_quantize.py)\n\n{table}\n" + ("\n" + rest if rest else "")
        )


if __name__ == "__main__":
    main()
