"""The block kernels as a plain shared library, loaded with ctypes: quantizing without numba in the process.

A numba process costs about 0.7 s and 100+ MiB before any work (llvmlite's LLVM, numba, the cached
kernels), which dominates small quantize jobs. The kernels' source stays the numba code (fp, legacy,
kquants, iq4); native_build.py compiles it ahead of time, once per machine, into
<cache>/native/kernels-<key>.so, where the key hashes the kernel sources, numba's and llvmlite's versions,
the Python version and the host CPU (model and feature flags). This module only loads and calls it:
numpy and ctypes, nothing else. ctypes releases the GIL during a call, so row chunks run on a thread pool.

The first use builds the library in a subprocess (`python -m ggufkit.quants.native_build`, which needs
numba, llvmlite and a C compiler; about a minute), under a file lock so that concurrent processes build
it once, installed by an atomic rename. If the build fails (no C compiler, say), the reason is written to
kernels-<key>.failed, logged once, and the caller gets None: the registry then uses the numba JIT kernels,
which give the same bytes. `python -m ggufkit.quants.native build` retries a failed build; `status` shows
the state.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import registry
from .kdequant import DEQUANTIZE as _K_DEQUANTIZE

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = ("fp.py", "search.py", "legacy.py", "kquants.py", "iq4.py", "native_build.py")  # in the .so
_QUANTIZE = frozenset(
    (
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "IQ4_NL",
        "IQ4_XS",
    )
)  # fmt: skip  (native_build.QUANTIZE_TYPES)
_DEQUANTIZE = frozenset(("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"))
BUILD_TIMEOUT = 1800  # seconds; a cold build is about a minute of CPU

_state: dict = {}  # "lib": CDLL | None once decided, "why": reason when None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_identity() -> str:
    """The host CPU as the compiled code depends on it: model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(sorted(set(keep)))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def cache_key() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (_HERE / name).read_bytes())
    parts = (_version("numba"), _version("llvmlite"), platform.python_version(), platform.machine())
    h.update("\0".join(parts).encode())
    h.update(_cpu_identity().encode())
    return h.hexdigest()[:20]


def compiler() -> str | None:
    """The C compiler that links the library: $CC, else cc, gcc or clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def library_path() -> Path:
    from ..models import cache_dir

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
    Raises RuntimeError with the builder's message if it cannot be built (and records it)."""
    path = path or library_path()
    failed = _failed_path(path)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if path.exists():
            return path
        if failed.exists() and not force:
            raise RuntimeError(failed.read_text().strip())
        if compiler() is None:
            failed.write_text("cannot build the native kernels: no C compiler (set CC, or install gcc)\n")
            raise RuntimeError(failed.read_text().strip())
        log.warning("compiling ggufkit's native kernels into %s (once per machine, about a minute)", path)
        env = dict(os.environ)
        src_root = str(_HERE.parent.parent)  # the folder holding the ggufkit package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "ggufkit.quants.native_build", str(path)],
                capture_output=True,
                text=True,
                env=env,
                timeout=BUILD_TIMEOUT,
            )
            ok, why = done.returncode == 0 and path.exists(), (done.stderr or done.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, why = False, str(e)
        if not ok:
            why = why.splitlines()[-1] if why else "the builder failed without a message"
            failed.write_text(f"cannot build the native kernels: {why}\n")
            raise RuntimeError(failed.read_text().strip())
        failed.unlink(missing_ok=True)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None (with the reason in status()) if unavailable."""
    if "lib" not in _state:
        lib, why = None, ""
        try:
            lib = _load(build())
        except (RuntimeError, OSError) as e:
            why = str(e)
            log.warning("%s; using the numba JIT kernels (same results)", why)
        _state["lib"], _state["why"] = lib, why
    return _state["lib"]


def status() -> str:
    """One line: where the library is, or why it is not used."""
    if library() is not None:
        return f"native kernels: {library_path()}"
    return _state["why"]


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="ggufkit-native"), n
    return _pool


def _run_chunks(lib, op: int, qtype: int, src, n_rows, n_per_row, qw, has_qw, dst, src_row, dst_row) -> None:
    """gk_run over row chunks on get_threads() threads; src/dst are C-contiguous 2-D arrays."""
    n = min(registry.get_threads(), n_rows)
    bounds = [n_rows * i // n for i in range(n + 1)] if n > 1 else [0, n_rows]
    s0, d0 = src.ctypes.data, dst.ctypes.data
    q = qw.ctypes.data if qw is not None else None

    def run(i):
        r0, r1 = bounds[i], bounds[i + 1]
        if r1 > r0:
            return lib.gk_run(op, qtype, s0 + r0 * src_row, r1 - r0, n_per_row, q, has_qw, d0 + r0 * dst_row)
        return 0

    status = list(_executor(n).map(run, range(n))) if n > 1 else [run(0)]
    if any(s != 0 for s in status):
        raise RuntimeError(f"native kernel for ggml type {qtype} failed (status {status})")


def _quantizer(lib, fmt):
    qtype = int(fmt.ggml_type)
    one = np.zeros(1, np.float32)

    def quantize_rows(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        n_rows, n_per_row = x.shape
        out = np.empty((n_rows, fmt.row_bytes(n_per_row)), np.uint8)
        if out.size:
            has = importance is not None
            qw = importance if has else one
            _run_chunks(lib, 0, qtype, x, n_rows, n_per_row, qw, int(has), out, x.strides[0], out.shape[1])
        return out

    return quantize_rows


def _dequantizer(lib, fmt):
    qtype = int(fmt.ggml_type)

    def dequantize_rows(data: np.ndarray, n_per_row: int) -> np.ndarray:
        n_rows = data.shape[0]
        y = np.empty((n_rows, n_per_row), np.float32)
        if y.size:
            _run_chunks(lib, 1, qtype, data, n_rows, n_per_row, None, 0, y, data.shape[1], 4 * n_per_row)
        return y

    return dequantize_rows


def _k_dequantizer(fmt):
    fn = _K_DEQUANTIZE[fmt.name]

    def dequantize_rows(data: np.ndarray, n_per_row: int) -> np.ndarray:
        return fn(data.reshape(-1, fmt.type_size)).reshape(data.shape[0], n_per_row)

    return dequantize_rows


def _f32_quantize(x: np.ndarray, importance) -> np.ndarray:
    return x.view(np.uint8).copy()


def _f32_dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return data.view(np.float32).copy()


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
            assert name in _QUANTIZE, name
            deq = _dequantizer(lib, fmt) if name in _DEQUANTIZE else _k_dequantizer(fmt)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
