"""The block kernels as a plain shared library, loaded with ctypes: quantizing without numba in the process.

A numba process costs about 0.7 s and 100+ MiB before any work (llvmlite's LLVM, numba, the cached
kernels), which dominates small quantize jobs. The kernels' source stays the numba code (fp, legacy,
kquants, iq4); native/build.py compiles it ahead of time, once per machine, into
<cache>/native/kernels-<key>.so, where the key hashes the kernel sources, numba's and llvmlite's versions,
the Python version and the host CPU (model and feature flags). This module only loads and calls it,
through ctypes; ctypes releases the GIL during a call, so row chunks run on a thread pool. Two interfaces:
kernels(name) gives the registry numpy-array kernels; convert_rows / first_nonfinite_row work on raw
addresses and never import numpy (the quantize pipeline uses them: numpy's import is a third of a small
quantize job's start-up).

The first use builds the library in a subprocess (`python -m ggufkit.quants.native.build`, which needs
numba, llvmlite and a C compiler; about 75 s of CPU, 40-120 s wall: with an empty numba cache every kernel
is compiled from the source the key hashes, twice: serially for the library and as the JIT kernels it is
checked against), under a file lock so that concurrent processes build it once, installed by an atomic
rename. If it cannot be built, a warning is logged once and the caller gets None: the registry then uses
the numba JIT kernels, which give the same bytes. Without a C compiler nothing is attempted (the check is
repeated on every run, so installing one is enough); a build that fails on its own is recorded in
kernels-<key>.failed and not retried until `python -m ggufkit.quants.native build`.
`python -m ggufkit.quants.native status` shows the state.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import zlib
from pathlib import Path

from .. import registry
from ..pool import pool

# (What only a build needs -- subprocess, tempfile, shutil, logging -- is imported where it is used: a
# quantize process loads this module on every run, and those imports would be ~8 ms of its start-up.)

_HERE = Path(__file__).parent
_QUANTS = _HERE.parent  # the numba sources the library is compiled from
_SOURCES = (
    _QUANTS / "fp.py",
    _QUANTS / "rounding.py",
    _QUANTS / "search.py",
    _QUANTS / "search_qkx.py",
    _QUANTS / "lockstep.py",
    _QUANTS / "legacy.py",
    _QUANTS / "kblocks.py",
    _QUANTS / "kblocks_min.py",
    _QUANTS / "kblocks_signed.py",
    _QUANTS / "kquants.py",
    _QUANTS / "iq4.py",
    _QUANTS / "registry.py",  # the facts frozen into it: type ids, sizes, the legacy searches
    _HERE / "build.py",
    _HERE / "shim.c",
)  # in the .so
# what gk_run handles, from the registry's native_ops (F32 is a copy here; K-quant dequantizing is numpy,
# kdequant.py)
QUANTIZE_TYPES = registry.names(native_ops="quantize")
DEQUANTIZE_TYPES = registry.names(native_ops="dequantize")
CHECK_TYPES = registry.names(native_ops="check")  # op 2: the first row holding a NaN or an infinity
_QUANTIZE, _DEQUANTIZE, _NONFINITE = 0, 1, 2  # gk_run's ops
BUILD_TIMEOUT = 1800  # seconds; a build is about 75 s of CPU

_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL | None once decided, "why": reason when None


def _cpu_identity() -> str:
    """The host CPU as the compiled code depends on it: model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(sorted(set(keep)))


def _version_file(package: str) -> bytes:
    """The version module of an installed package, found without importing it (nor importlib.metadata,
    which costs a Python start-up's worth of imports)."""
    from importlib.util import find_spec

    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return b"none"
    path = Path(next(iter(spec.submodule_search_locations)), "_version.py")
    return path.read_bytes() if path.exists() else str(path.parent).encode()


def cache_key() -> str:
    """20 hex digits naming the library: CRC-32 and Adler-32 of everything the compiled code depends on
    (zlib is loaded by every Python start-up; hashlib would add ~3 ms to each quantize run), and the
    length. A checksum, not a digest: it only has to tell our own source versions apart."""
    parts = [p.name.encode() + b"\0" + p.read_bytes() for p in _SOURCES]
    parts += [package.encode() + b"\0" + _version_file(package) for package in ("numba", "llvmlite")]
    parts.append(f"{sys.version} {os.uname().machine}".encode())
    parts.append(_cpu_identity().encode())
    data = b"\1".join(parts)
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}{len(data) & 0xFFFF:04x}"


def compiler() -> str | None:
    """The C compiler that links the library: $CC, else cc, gcc or clang on PATH."""
    import shutil

    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def library_path() -> Path:
    from ...cache import cache_dir

    return cache_dir("native") / f"kernels-{cache_key()}.so"


def _failed_path(path: Path) -> Path:
    return path.with_suffix(".failed")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.gk_run.restype = ctypes.c_int64
    lib.gk_run.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


def build(path: Path | None = None, *, force: bool = False) -> Path:
    """Build the library (in a subprocess, under a lock) unless it exists; returns its path.
    Raises RuntimeError with the reason if it cannot be built. A build that failed on its own (not for
    want of a compiler, not killed) is recorded and not retried until force=True."""
    try:
        import fcntl
    except ImportError:
        raise RuntimeError("cannot build the native kernels: no fcntl (not a POSIX system)") from None
    path = path or library_path()
    failed = _failed_path(path)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if path.exists():
            return path
        if failed.exists() and not force:
            raise RuntimeError(failed.read_text().strip())
        if compiler() is None:
            raise RuntimeError("cannot build the native kernels: no C compiler (set CC, or install gcc)")
        import logging
        import subprocess
        import tempfile

        logging.getLogger(__name__).warning(
            "compiling ggufkit's native kernels into %s (once per machine, about a minute)", path
        )
        src_root = str(_QUANTS.parent.parent)  # the folder holding the ggufkit package
        pythonpath = os.pathsep.join(p for p in (src_root, os.environ.get("PYTHONPATH")) if p)
        # an empty numba cache: every kernel compiled from the source the key hashes (numba's on-disk
        # cache does not notice edits to functions inlined from another module)
        with tempfile.TemporaryDirectory(prefix=".numba-", dir=path.parent) as numba_cache:
            env = dict(os.environ, PYTHONPATH=pythonpath, NUMBA_CACHE_DIR=numba_cache)
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "ggufkit.quants.native.build", str(path)],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=BUILD_TIMEOUT,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise RuntimeError(f"cannot build the native kernels: {e}") from None
        if done.returncode != 0 or not path.exists():
            lines = (done.stderr or done.stdout).strip().splitlines()
            last = lines[-1] if lines else f"exit status {done.returncode}"
            why = f"cannot build the native kernels: {last}"
            if done.returncode == 1:  # the builder's own verdict (a signal or a crash may not recur)
                failed.write_text(why + "\n")
            raise RuntimeError(why)
        failed.unlink(missing_ok=True)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None (with the reason in status()) if unavailable."""
    with _lock:
        if "lib" not in _state:
            lib, why = None, ""
            try:
                lib = _load(build())
            except (RuntimeError, OSError) as e:
                why = str(e)
                import logging

                logging.getLogger(__name__).warning("%s; using the numba JIT kernels (same results)", why)
            _state["lib"], _state["why"] = lib, why
    return _state["lib"]


def status() -> str:
    """One line: where the library is, or why it is not used."""
    if library() is not None:
        return f"native kernels: {library_path()}"
    return _state["why"]


def _parallel(n_rows: int, part, threads: int | None = None) -> list:
    """part(r0, r1) over `threads` (default get_threads()) row ranges: ranges 1.. on the pool, range 0 on
    this thread (one thread wake-up fewer per call); the results in range order."""
    n = max(1, min(threads or registry.get_threads(), n_rows))
    bounds = [n_rows * i // n for i in range(n + 1)]
    workers = pool(n - 1) if n > 1 else None
    tasks = [workers.submit(lambda i=i: part(bounds[i], bounds[i + 1])) for i in range(1, n)]
    try:
        first = part(bounds[0], bounds[1])
    finally:
        for t in tasks:  # the other ranges still use the caller's memory: wait for them in any case
            t.wait()
    return [first, *(t.result() for t in tasks)]


def _check(status: int, op: int, qtype: int) -> None:
    if status != 0:
        raise RuntimeError(f"native kernel op {op} for ggml type {qtype} failed (status {status})")


def _run_chunks(lib, op: int, qtype: int, src, n_rows, n_per_row, qw, has_qw, dst, src_row, dst_row) -> None:
    """gk_run over row chunks on get_threads() threads; src/dst are C-contiguous 2-D arrays."""
    s0, d0 = src.ctypes.data, dst.ctypes.data
    q = qw.ctypes.data if qw is not None else None

    def run(r0, r1):
        if r1 > r0:
            return lib.gk_run(op, qtype, s0 + r0 * src_row, r1 - r0, n_per_row, q, has_qw, d0 + r0 * dst_row)
        return 0

    for status in _parallel(n_rows, run):
        _check(status, op, qtype)


# -- raw memory (no numpy): the quantize pipeline's chunks -------------------------------------------------


def first_nonfinite_row(lib, qtype: int, src: int, n_rows: int, n_per_row: int, *, threads=None) -> int:
    """The first of n_rows F32/F16/BF16 rows at address src holding a NaN or an infinity, or -1.
    threads: how many threads share the rows (default get_threads(); 1 = this thread only)."""
    row_bytes = n_per_row * (4 if qtype == registry.FORMATS["F32"].ggml_type else 2)

    def part(r0, r1):
        found = ctypes.c_int64(-1)
        if r1 > r0:
            status = lib.gk_run(_NONFINITE, qtype, src + r0 * row_bytes, r1 - r0, n_per_row, None, 0,
                                ctypes.addressof(found))  # fmt: skip
            _check(status, _NONFINITE, qtype)
        return -1 if found.value < 0 else r0 + found.value

    return min((r for r in _parallel(n_rows, part, threads) if r >= 0), default=-1)


def convert_rows(lib, src_type: int, dst_type: int, src: int, n_rows: int, n_per_row: int, *,
                 importance: int | None, scratch: int, dst: int, check: bool,
                 threads: int | None = None) -> int:  # fmt: skip
    """Quantize n_rows rows at address src (F32, or any DEQUANTIZE_TYPES type, widened to float32 into
    `scratch`, n_rows * n_per_row floats) to dst_type blocks at dst, each thread checking its rows for
    NaN/Inf first when `check` (on the float32 values). `importance`: the address of n_per_row float32
    weights, or None. Returns the first non-finite row (dst then holds no defined bytes), or -1."""
    f32 = int(registry.FORMATS["F32"].ggml_type)
    src_row = registry.row_bytes(src_type, n_per_row)
    dst_row = registry.row_bytes(dst_type, n_per_row)
    x_row = 4 * n_per_row
    qw, has_qw = (importance, 1) if importance is not None else (None, 0)

    def part(r0, r1):
        k = r1 - r0
        if k <= 0:
            return -1
        x = src + r0 * src_row
        if src_type != f32:
            x = scratch + r0 * x_row
            _check(lib.gk_run(_DEQUANTIZE, src_type, src + r0 * src_row, k, n_per_row, None, 0, x),
                   _DEQUANTIZE, src_type)  # fmt: skip
        if check:
            found = ctypes.c_int64(-1)
            _check(lib.gk_run(_NONFINITE, f32, x, k, n_per_row, None, 0, ctypes.addressof(found)),
                   _NONFINITE, f32)  # fmt: skip
            if found.value >= 0:
                return r0 + found.value
        _check(lib.gk_run(_QUANTIZE, dst_type, x, k, n_per_row, qw, has_qw, dst + r0 * dst_row),
               _QUANTIZE, dst_type)  # fmt: skip
        return -1

    return min((r for r in _parallel(n_rows, part, threads) if r >= 0), default=-1)


def _quantizer(lib, fmt):
    import numpy as np

    qtype = int(fmt.ggml_type)
    one = np.zeros(1, np.float32)

    def quantize_rows(x, importance):
        n_rows, n_per_row = x.shape
        out = np.empty((n_rows, fmt.row_bytes(n_per_row)), np.uint8)
        if out.size:
            has = importance is not None
            qw = importance if has else one
            _run_chunks(lib, 0, qtype, x, n_rows, n_per_row, qw, int(has), out, x.strides[0], out.shape[1])
        return out

    return quantize_rows


def _dequantizer(lib, fmt):
    import numpy as np

    qtype = int(fmt.ggml_type)

    def dequantize_rows(data, n_per_row: int):
        n_rows = data.shape[0]
        y = np.empty((n_rows, n_per_row), np.float32)
        if y.size:
            _run_chunks(lib, 1, qtype, data, n_rows, n_per_row, None, 0, y, data.shape[1], 4 * n_per_row)
        return y

    return dequantize_rows


def _k_dequantizer(fmt):
    from ..kdequant import DEQUANTIZE

    fn = DEQUANTIZE[fmt.name]

    def dequantize_rows(data, n_per_row: int):
        return fn(data.reshape(-1, fmt.type_size)).reshape(data.shape[0], n_per_row)

    return dequantize_rows


def _f32_quantize(x, importance):
    return x.view("u1").copy()


def _f32_dequantize(data, n_per_row: int):
    return data.view("<f4").copy()


_kernels: dict[str, registry.Kernels | None] = {}


def kernels(name: str) -> registry.Kernels | None:
    """The native kernels of a format, or None if the library is unavailable."""
    if name not in _kernels:
        if name == "F32":
            _kernels[name] = registry.Kernels(_f32_quantize, _f32_dequantize)
        else:
            lib = library()
            if lib is None:
                return None
            fmt = registry.FORMATS[name]
            assert name in QUANTIZE_TYPES, name
            deq = _dequantizer(lib, fmt) if name in DEQUANTIZE_TYPES else _k_dequantizer(fmt)
            _kernels[name] = registry.Kernels(_quantizer(lib, fmt), deq)
    return _kernels[name]


def main(argv: list[str]) -> int:
    """python -m ggufkit.quants.native [build|status]"""
    cmd = argv[0] if argv else "status"
    if cmd == "build":
        try:
            print(build(force=True))
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    if cmd == "status":
        path = library_path()
        failed = _failed_path(path)
        if path.exists():
            print(path)
        else:
            print(failed.read_text().strip() if failed.exists() else f"not built yet: {path}")
        return 0
    print("usage: python -m ggufkit.quants.native [build|status]", file=sys.stderr)
    return 2
