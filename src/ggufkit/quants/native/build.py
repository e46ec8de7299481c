"""Compile the numba block kernels ahead of time into one plain shared library (run by quants.native).

The kernel source stays the numba code of fp.py, legacy.py, kquants.py and iq4.py: here the same Python
functions are compiled once more, serially (prange is range without parallel=True; quants.native runs row
chunks on its own threads) and with error_model="numpy", behind one C entry point:

    int64 gk_run(int64 op, int64 ggml_type, void *src, int64 n_rows, int64 n_per_row,
                 void *importance, int64 has_importance, void *dst)
        op 0: quantize float32 src [n_rows, n_per_row] -> dst blocks; importance float32 [n_per_row]
        op 1: dequantize src blocks -> float32 dst [n_rows, n_per_row]
        op 2: the first row of F32/F16/BF16 src [n_rows, n_per_row] holding a NaN or an infinity -> int64
              dst[0] (-1 if none)
        returns 0, 1 for a type it does not handle, -1 if a kernel took an error path

LLVM emits the cfunc's module as an object file for the host CPU (numba's own target options), and the C
compiler links it with a small shim, shim.c, into kernels-<key>.so. The shim supplies the few runtime
symbols the object needs that live in numba's extension modules (the process loading the library has no
numba):
  - NRT_MemInfo_alloc_aligned / NRT_MemInfo_call_dtor / NRT_Free: the kernels' np.empty scratch, as a
    malloc'd block behind numba's MemInfo header {refct, dtor, dtor_info, data, size, allocator}, which
    the inlined reference counting reads (the layout is numba-version specific: the cache key holds
    numba's version);
  - numba_attempt_nocopy_reshape: reshapes of uniformly strided arrays (all the kernels do), else "copy
    needed", which the kernel treats as an error;
  - numba_frexpf;
  - the error paths (numba_gil_ensure/release, numba_do_raise, numba_unpickle,
    numba_runtime_build_excinfo_struct): they set a thread-local flag that gk_run reports as -1. Those
    paths also reference a few CPython API functions (PyErr_*), resolved by the Python process.
Before the library is installed it is loaded here and checked byte for byte against the JIT kernels on
every type, with and without importance, on data with zeros, spikes, NaN and inf (tests check both
against libggml).

Usage: python -m ggufkit.quants.native.build OUTPUT.so   (exit 0: OUTPUT.so installed; else a message)
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import carray, cfunc, njit, types

from .. import fp, iq4, kquants, legacy
from ..registry import FORMATS
from . import DEQUANTIZE_TYPES, QUANTIZE_TYPES, compiler

_serial = njit(nogil=True, error_model="numpy")

_f16_rows = _serial(fp._f16_rows.py_func)
_bf16_rows = _serial(fp._bf16_rows.py_func)
_f16_to_f32_rows = _serial(fp._f16_to_f32_rows.py_func)
_bf16_to_f32_rows = _serial(fp._bf16_to_f32_rows.py_func)
_q4_0_ref = _serial(legacy._q4_0_ref.py_func)
_q4_1_ref = _serial(legacy._q4_1_ref.py_func)
_q5_0_ref = _serial(legacy._q5_0_ref.py_func)
_q5_1_ref = _serial(legacy._q5_1_ref.py_func)
_q8_0_ref = _serial(legacy._q8_0_ref.py_func)
_q4_0_deq = _serial(legacy._q4_0_deq.py_func)
_q4_1_deq = _serial(legacy._q4_1_deq.py_func)
_q5_0_deq = _serial(legacy._q5_0_deq.py_func)
_q5_1_deq = _serial(legacy._q5_1_deq.py_func)
_q8_0_deq = _serial(legacy._q8_0_deq.py_func)
_iq4_quantize = _serial(iq4._quantize_kernel.py_func)
_iq4_nl_deq = _serial(iq4._iq4_nl_deq.py_func)
_iq4_xs_deq = _serial(iq4._iq4_xs_deq.py_func)
_legacy_impl = legacy.impl_rows
_kquant_blocks = kquants._quantize_blocks

_KV = iq4._KV
_QK_K = kquants.QK_K


def _t(name: str) -> int:
    return int(FORMATS[name].ggml_type)


F32, F16, BF16 = _t("F32"), _t("F16"), _t("BF16")
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = _t("Q4_0"), _t("Q4_1"), _t("Q5_0"), _t("Q5_1"), _t("Q8_0")
Q2_K, Q6_K = _t("Q2_K"), _t("Q6_K")
IQ4_NL, IQ4_XS = _t("IQ4_NL"), _t("IQ4_XS")
_SIZE = np.zeros(64, np.int64)  # bytes per block by ggml type id (a frozen constant in the library)
for _f in FORMATS.values():
    _SIZE[int(_f.ggml_type)] = _f.type_size
# the legacy imatrix searches' (nmax, has a min), frozen into the library as constants
_N0, _M0 = FORMATS["Q4_0"].legacy_search
_N1, _M1 = FORMATS["Q4_1"].legacy_search
_N2, _M2 = FORMATS["Q5_0"].legacy_search
_N3, _M3 = FORMATS["Q5_1"].legacy_search
# the K-quants are the ggml type ids Q2_K..Q6_K, which kquants._quantize_blocks takes as they are
assert {n for n, f in FORMATS.items() if f.kernels == "kquants"} == {
    n for n, f in FORMATS.items() if Q2_K <= int(f.ggml_type) <= Q6_K
}


@_serial
def _legacy_importance(t, x, qw, out):
    work = np.empty((8, 64), np.float32)  # search.search_work()
    n_rows = x.shape[0]
    if t == Q4_0:
        _legacy_impl(x, qw, _N0, _M0, out, work, 0, n_rows)
    elif t == Q4_1:
        _legacy_impl(x, qw, _N1, _M1, out, work, 0, n_rows)
    elif t == Q5_0:
        _legacy_impl(x, qw, _N2, _M2, out, work, 0, n_rows)
    else:
        _legacy_impl(x, qw, _N3, _M3, out, work, 0, n_rows)


@_serial
def _quantize(t, src, n_rows, n_per_row, qw_p, has_qw, dst):
    size = _SIZE[t]
    if t == F16 or t == BF16:
        out16 = carray(dst, (n_rows, n_per_row), np.uint16)
        if t == F16:
            _f16_rows(carray(src, (n_rows, n_per_row), np.float32), out16)
        else:
            _bf16_rows(carray(src, (n_rows, n_per_row), np.uint32), out16)
        return 0
    qw = carray(qw_p, (n_per_row if has_qw else 1,), np.float32)
    if Q2_K <= t <= Q6_K:
        nb = n_rows * (n_per_row // _QK_K)
        qw2 = qw.reshape((n_per_row // _QK_K, _QK_K)) if has_qw else np.empty((0, _QK_K), np.float32)
        xb = carray(src, (nb, _QK_K), np.float32)
        _kquant_blocks(t, xb, qw2, carray(dst, (nb, size), np.uint8))
        return 0
    if t == IQ4_NL or t == IQ4_XS:
        block = 32 if t == IQ4_NL else _QK_K
        nb = n_rows * (n_per_row // block)
        out = carray(dst, (nb, size), np.uint8)
        out[:] = 0
        _iq4_quantize(carray(src, (nb, block), np.float32), qw, has_qw != 0, n_per_row // block, _KV, out)
        return 0
    nb = n_rows * (n_per_row // 32)
    if has_qw and t != Q8_0:
        x = carray(src, (n_rows, n_per_row), np.float32)
        _legacy_importance(t, x, qw, carray(dst, (n_rows, n_per_row // 32, size), np.uint8))
        return 0
    xb = carray(src, (nb, 32), np.float32)
    out = carray(dst, (nb, size), np.uint8)
    if t == Q4_0:
        _q4_0_ref(xb, out)
    elif t == Q4_1:
        _q4_1_ref(xb, out)
    elif t == Q5_0:
        _q5_0_ref(xb, out)
    elif t == Q5_1:
        _q5_1_ref(xb, out)
    elif t == Q8_0:
        _q8_0_ref(xb, out)
    else:
        return 1
    return 0


@_serial
def _dequantize(t, src, n_rows, n_per_row, dst):
    size = _SIZE[t]
    if t == F16 or t == BF16:
        h = carray(src, (n_rows, n_per_row), np.uint16)
        if t == F16:
            _f16_to_f32_rows(h, carray(dst, (n_rows, n_per_row), np.float32))
        else:
            _bf16_to_f32_rows(h, carray(dst, (n_rows, n_per_row), np.uint32))
        return 0
    block = _QK_K if t == IQ4_XS else 32
    nb = n_rows * (n_per_row // block)
    data = carray(src, (nb, size), np.uint8)
    y = carray(dst, (nb, block), np.float32)
    if t == Q4_0:
        _q4_0_deq(data, y)
    elif t == Q4_1:
        _q4_1_deq(data, y)
    elif t == Q5_0:
        _q5_0_deq(data, y)
    elif t == Q5_1:
        _q5_1_deq(data, y)
    elif t == Q8_0:
        _q8_0_deq(data, y)
    elif t == IQ4_NL:
        _iq4_nl_deq(data, _KV, y)
    elif t == IQ4_XS:
        _iq4_xs_deq(data, _KV, y)
    else:
        return 1
    return 0


@_serial
def _or_exponents(v, mask, lsb):
    """OR over v of (v & mask) + lsb: its top bit (mask + lsb) is set iff some value's exponent bits are all
    ones, i.e. some value is NaN or infinite. Integer-only, so LLVM vectorizes it."""
    acc = 0
    for i in range(v.size):
        acc |= (v[i] & mask) + lsb
    return acc


@_serial
def _first_nonfinite_row(v, n_rows, n_per_row, mask, lsb):
    top = mask + lsb
    if _or_exponents(v, mask, lsb) & top == 0:  # one pass clears the common case
        return -1
    for r in range(n_rows):
        if _or_exponents(v[r * n_per_row : (r + 1) * n_per_row], mask, lsb) & top:
            return r
    return -1


@_serial
def _first_nonfinite(t, src, n_rows, n_per_row, dst):
    out = carray(dst, (1,), np.int64)
    n = n_rows * n_per_row
    if t == F32:
        v32 = carray(src, (n,), np.uint32)
        out[0] = _first_nonfinite_row(v32, n_rows, n_per_row, 0x7F800000, 0x00800000)
    elif t == F16:
        v16 = carray(src, (n,), np.uint16)
        out[0] = _first_nonfinite_row(v16, n_rows, n_per_row, 0x7C00, 0x0400)
    elif t == BF16:
        v16 = carray(src, (n,), np.uint16)
        out[0] = _first_nonfinite_row(v16, n_rows, n_per_row, 0x7F80, 0x0080)
    else:
        return 1
    return 0


_I64, _PTR = types.int64, types.voidptr
_SIG = _I64(_I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR)


@cfunc(_SIG, nopython=True, error_model="numpy")
def _gk_kernel(op, t, src, n_rows, n_per_row, qw, has_qw, dst):
    if op == 0:
        return _quantize(t, src, n_rows, n_per_row, qw, has_qw, dst)
    if op == 1:
        return _dequantize(t, src, n_rows, n_per_row, dst)
    return _first_nonfinite(t, src, n_rows, n_per_row, dst)


_SHIM = Path(__file__).with_name("shim.c")  # gk_run and the runtime symbols, in C


def _object_code() -> bytes:
    lib = _gk_kernel._library
    codegen = lib.codegen
    target = llvm.Target.from_triple(llvm.get_process_triple())
    tm = target.create_target_machine(
        cpu=codegen._get_host_cpu_name(),
        features=codegen._tm_features,
        opt=3,
        reloc="pic",
        codemodel="default",
    )
    return tm.emit_object(llvm.parse_assembly(lib.get_llvm_str()))


def _link(cc: str, obj: bytes, out: Path, workdir: Path) -> None:
    """Link the kernels' object and the shim into `out`, exporting gk_run only (a GNU ld version script:
    numba's own NRT_incref etc. in the object stay private), or, if the linker has no version scripts,
    everything."""
    (workdir / "kernels.o").write_bytes(obj)
    (workdir / "shim.c").write_text(_SHIM.read_text().replace("@KERNEL@", _gk_kernel.native_name))
    (workdir / "exports.map").write_text("{ global: gk_run; local: *; };\n")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(workdir / "shim.c"), str(workdir / "kernels.o")]
    for extra in ([f"-Wl,--version-script={workdir / 'exports.map'}", "-lm"], ["-lm"]):
        done = subprocess.run(cmd + extra, capture_output=True, text=True)
        if done.returncode == 0:
            return
    raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")


def _self_test_data(rng, n_rows: int, n_per_row: int) -> np.ndarray:
    x = rng.standard_normal((n_rows, n_per_row)).astype(np.float32)
    x[0, :40] = 0.0
    x[1, 3] = 300.0
    x[1, 70] = np.nan
    x[2, 5] = np.inf
    x[3] *= np.float32(1e-30)
    return x


def self_test(path: Path) -> None:
    """Load the library and compare it with the JIT kernels on every type (raises on any difference)."""
    from .. import registry

    so = ctypes.CDLL(str(path))
    run = so.gk_run
    run.restype = ctypes.c_int64
    run.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    rng = np.random.default_rng(7)
    x = _self_test_data(rng, 5, 512)
    imp = rng.random(512).astype(np.float32)
    for name in QUANTIZE_TYPES:
        fmt = FORMATS[name]
        jit = registry.jit_kernels(name)
        for qw in (None, imp):
            want = jit.quantize_rows(x, qw if fmt.uses_importance else None)
            got = np.zeros_like(want)
            use = qw is not None and fmt.uses_importance
            q = qw if use else np.zeros(1, np.float32)
            t = int(fmt.ggml_type)
            status = run(0, t, x.ctypes.data, 5, 512, q.ctypes.data, int(use), got.ctypes.data)
            if status != 0 or not np.array_equal(got, want):
                raise RuntimeError(f"self-test: {name} quantize (importance {use}) differs from the JIT's")
            if name in DEQUANTIZE_TYPES:
                y_want = jit.dequantize_rows(want, 512)
                y = np.zeros_like(y_want)
                status = run(1, int(fmt.ggml_type), want.ctypes.data, 5, 512, None, 0, y.ctypes.data)
                if status != 0 or y.view(np.uint32).tobytes() != y_want.view(np.uint32).tobytes():
                    raise RuntimeError(f"self-test: {name} dequantize differs from the JIT kernel")
    _self_test_nonfinite(run, x)


def _self_test_nonfinite(run, x: np.ndarray) -> None:
    """op 2 against numpy's isfinite, on F32, F16 and BF16 bits, for every single-row starting point."""
    found = np.zeros(1, np.int64)
    as16 = x.astype(np.float16)
    cases = [(F32, x.view(np.uint32), x), (F16, as16.view(np.uint16), as16.astype(np.float32)),
             (BF16, (x.view(np.uint32) >> 16).astype(np.uint16), None)]  # fmt: skip
    for t, bits, values in cases:
        if values is None:  # bf16: the top half of each float32
            values = (bits.astype(np.uint32) << 16).view(np.float32)
        for r0 in range(len(x)):
            ok = np.isfinite(values[r0:]).all(axis=1)
            want = -1 if ok.all() else int(np.argmin(ok))
            rows = np.ascontiguousarray(bits[r0:])
            status = run(2, t, rows.ctypes.data, len(rows), rows.shape[1], None, 0, found.ctypes.data)
            if status != 0 or int(found[0]) != want:
                raise RuntimeError(f"self-test: non-finite row check on type {t} from row {r0}: {found[0]}")


def build(out: Path) -> None:
    """Compile, link, self-test, and install the library at `out` (atomic rename)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    obj = _object_code()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        tmpdir = Path(tmp)
        so = tmpdir / "kernels.so"
        _link(cc, obj, so, tmpdir)
        self_test(so)
        from ...cache import atomic_write

        atomic_write(out, so.read_bytes())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ggufkit.quants.native.build OUTPUT.so", file=sys.stderr)
        return 2
    try:
        build(Path(argv[0]))
    except Exception as e:  # noqa: BLE001  (the parent records the reason and falls back to the JIT)
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"numba {numba.__version__}: built {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
