"""The public block-format API: registry facts, input checking, importance semantics, and the real model.

Everything is compared with libggml from llama-cpp-python 0.3.36 (tests.helpers.libggml), computed in the run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ggufkit import quants
from ggufkit.quants import dequantize, formats, get_format, native, quantize, row_bytes
from tests.helpers.libggml import ggml_dequantize, ggml_quantize, libggml
from tests.helpers.quant_data import assert_same_bytes, assert_same_floats, hostile_cases, importance_rows

FORMATS = list(formats())  # every registered type, in ggml type-id order; none is skipped below
BLOCKED = [n for n in FORMATS if get_format(n).block_size > 1]
BACKENDS = ("native", "jit") if native.compiler() else ("jit",)  # both kernel builds give these bytes


def _names(message: str, *numbers: int) -> bool:
    return all(re.search(rf"(?<![\w.]){n}(?![\w.])", message) for n in numbers)


# ---------------------------------------------------------------- registry facts


@pytest.mark.parametrize("qtype", FORMATS)
def test_registry_facts_are_libggml_type_traits(qtype):
    fmt = get_format(qtype)
    traits = libggml().ggml_get_type_traits(int(fmt.ggml_type)).contents
    assert traits.type_name.decode().upper() == fmt.name
    assert fmt.block_size == traits.blck_size
    assert fmt.type_size == traits.type_size
    assert row_bytes(qtype, 7 * fmt.block_size) == 7 * traits.type_size


@pytest.mark.parametrize("qtype", FORMATS)
def test_lookup_by_name_enum_and_id(qtype):
    fmt = get_format(qtype)
    assert get_format(qtype.lower()) is fmt
    assert get_format(fmt.ggml_type) is fmt
    assert get_format(int(fmt.ggml_type)) is fmt


def test_every_issue_type_is_registered():
    wanted = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS"}
    assert wanted <= set(FORMATS)


def test_unknown_type_is_a_value_error():
    with pytest.raises(ValueError, match="NOT_A_TYPE"):
        quantize(np.zeros((1, 32), np.float32), "NOT_A_TYPE")


# ---------------------------------------------------------------- input checking


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
@pytest.mark.parametrize("qtype", FORMATS)
def test_wrong_dtype_names_type_block_and_row_length(qtype, dtype):
    fmt = get_format(qtype)
    n = 3 * 256
    with pytest.raises(ValueError) as e:
        quantize(np.ones((2, n), dtype=dtype), qtype)
    msg = str(e.value)
    assert fmt.name in msg and _names(msg, fmt.block_size, n), msg


@pytest.mark.parametrize("shape", [(768,), (2, 3, 768), ()])
@pytest.mark.parametrize("qtype", FORMATS)
def test_not_2d_names_type_block_and_row_length(qtype, shape):
    fmt = get_format(qtype)
    with pytest.raises(ValueError) as e:
        quantize(np.ones(shape, dtype=np.float32), qtype)
    msg = str(e.value)
    assert fmt.name in msg and _names(msg, fmt.block_size), msg
    if shape:
        assert _names(msg, shape[-1]), msg


@pytest.mark.parametrize("qtype", BLOCKED)
def test_row_length_not_a_block_multiple_names_type_block_and_row_length(qtype):
    fmt = get_format(qtype)
    n = fmt.block_size * 3 + 17
    with pytest.raises(ValueError) as e:
        quantize(np.ones((2, n), np.float32), qtype)
    msg = str(e.value)
    assert fmt.name in msg and _names(msg, fmt.block_size, n), msg
    with pytest.raises(ValueError, match=fmt.name):
        dequantize(np.zeros(100, np.uint8), qtype, (2, n))


@pytest.mark.parametrize("qtype", FORMATS)
def test_bad_importance_and_bad_byte_count_are_value_errors(qtype):
    fmt = get_format(qtype)
    x = np.ones((2, 512), np.float32)
    for imp in [np.ones(511, np.float32), np.ones(512, np.float64), np.ones((1, 512), np.float32)]:
        with pytest.raises(ValueError, match=fmt.name):
            quantize(x, qtype, importance=imp)
    q = quantize(x, qtype)
    with pytest.raises(ValueError, match=fmt.name):
        dequantize(q.reshape(-1)[:-1], qtype, (2, 512))


# ---------------------------------------------------------------- shapes, dtypes, importance semantics


@pytest.mark.parametrize("qtype", FORMATS)
def test_round_trip_shapes_and_dtypes(qtype):
    fmt = get_format(qtype)
    x = hostile_cases(n_rows=3, n_per_row=512)["gaussian_unit"]
    q = quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (3, row_bytes(qtype, 512)) and q.flags.c_contiguous
    y = dequantize(q, qtype, (3, 512))
    assert y.dtype == np.float32 and y.shape == (3, 512)
    y3 = dequantize(q, fmt.ggml_type, (1, 3, 512))
    assert y3.dtype == np.float32 and y3.shape == (1, 3, 512)
    assert_same_floats(y3.reshape(3, 512), y, "3-D shape")
    assert_same_floats(y, ggml_dequantize(q, qtype, (3, 512)), qtype)
    empty = quantize(np.zeros((0, 512), np.float32), qtype)
    assert empty.shape == (0, row_bytes(qtype, 512)) and empty.dtype == np.uint8
    assert dequantize(empty, qtype, (0, 512)).shape == (0, 512)
    # a non-contiguous view quantizes like its copy
    wide = hostile_cases(n_rows=3, n_per_row=1024)["gaussian_unit"]
    assert np.array_equal(
        quantize(wide[:, :512], qtype), quantize(np.ascontiguousarray(wide[:, :512]), qtype)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", FORMATS)
def test_importance_has_an_effect_exactly_where_libggml_has_one(qtype, backend):
    """Both kernel builds (the native library, the numba JIT fallback) on hostile data, both directions."""
    fmt = get_format(qtype)
    x = hostile_cases()["student_t"]
    x[1, 7], x[2, 3] = np.inf, np.nan
    imp = importance_rows()["imatrix_like"]
    ggml_plain, ggml_imp = ggml_quantize(x, qtype), ggml_quantize(x, qtype, imp)
    assert fmt.uses_importance == (not np.array_equal(ggml_plain, ggml_imp))
    old = quants.set_backend(backend)
    try:
        ours_plain, ours_imp = quantize(x, qtype), quantize(x, qtype, importance=imp)
        y = dequantize(ours_imp, qtype, x.shape)
    finally:
        quants.set_backend(old)
    assert_same_bytes(ours_plain, ggml_plain, fmt.type_size, f"{qtype} without importance ({backend})")
    assert_same_bytes(ours_imp, ggml_imp, fmt.type_size, f"{qtype} with importance ({backend})")
    assert_same_floats(y, ggml_dequantize(ggml_imp, qtype, x.shape), f"{qtype} dequantize ({backend})")
    if not fmt.uses_importance:
        assert np.array_equal(ours_plain, ours_imp)


# ---------------------------------------------------------------- kernel builds: native library, JIT fallback

_NO_NUMBA = """
import sys
import numpy as np
from ggufkit import quants
x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
for name in quants.formats():
    quants.dequantize(quants.quantize(x, name, importance=np.ones(512, np.float32)), name, x.shape)
print(quants.backend(), sorted(m for m in ("numba", "llvmlite") if m in sys.modules))
"""


def _python(code: str, **env) -> subprocess.CompletedProcess:
    src = str(Path(quants.__file__).parents[2])
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH")))))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full | env)


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the JIT kernels are used")
def test_native_library_serves_every_type_without_numba():
    """With a C compiler the default kernels are the native library, and a process using them for every
    type never imports numba or llvmlite (the library is built on first use if missing)."""
    assert quants.backend() == "native", native.status()
    done = _python(_NO_NUMBA)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["native", "[]"], done.stdout + done.stderr


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the JIT kernels are used")
def test_native_kernels_called_from_several_threads():
    """Callers on several threads share the library's thread pool; every result is still libggml's."""
    x = hostile_cases(n_rows=24, n_per_row=1024)["student_t"]
    imp = importance_rows(n_per_row=1024)["imatrix_like"]
    want = {q: ggml_quantize(x, q, imp) for q in ("Q4_K", "Q5_0", "IQ4_XS")}
    old = quants.set_backend("native")
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda q: (q, quantize(x, q, importance=imp)), list(want) * 4))
    finally:
        quants.set_backend(old)
    for q, out in got:
        assert_same_bytes(out, want[q], get_format(q).type_size, f"{q} from a thread")


def test_without_a_compiler_the_jit_kernels_take_over(tmp_path):
    """No C compiler: no library, a warning naming the reason, and the JIT kernels give libggml's bytes."""
    code = _NO_NUMBA + "from ggufkit.quants import native; print(native.status())\n"
    code += "print(quants.quantize(x[:2], 'Q4_K').tobytes().hex())\n"
    done = _python(code, CC=str(tmp_path / "no-such-cc"), GGUFKIT_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "jit ['llvmlite', 'numba']"
    assert "no C compiler" in lines[1] and "no C compiler" in done.stderr
    assert not list((tmp_path / "native").glob("*.so"))
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)[:2]
    assert bytes.fromhex(lines[2]) == ggml_quantize(x, "Q4_K").tobytes()


# ---------------------------------------------------------------- property test over every type

_TINY = float(np.float32(1e-30))
_values = st.one_of(
    st.floats(-2.0, 2.0, width=32),
    st.floats(-7e4, 7e4, width=32),
    st.floats(-_TINY, _TINY, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 65504.0, -65520.0, 1e-40]),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large],
)
@given(
    x=hnp.arrays(np.float32, 256, elements=_values),
    imp=st.none() | hnp.arrays(np.float32, 256, elements=st.floats(0, 100, width=32)),
)
@pytest.mark.parametrize("qtype", FORMATS)
def test_random_rows_match_libggml(qtype, x, imp):
    fmt = get_format(qtype)
    x = x.reshape(1, 256)
    assert_same_bytes(quantize(x, qtype, importance=imp), ggml_quantize(x, qtype, imp), fmt.type_size, qtype)


# ---------------------------------------------------------------- every 2-D tensor of SmolLM2-135M

ROWS_PER_TENSOR = 32  # evenly spaced, first and last included: every tensor, every part of it
EMBEDDING_ROWS = 512  # token_embd (49152 rows): its first rows, plus the evenly spaced ones


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_path):
    """(name, f32 rows [k, ne0], importance [ne0]) for every 2-D tensor, dequantized with libggml."""
    reader = gguf.GGUFReader(str(smollm2_path))
    out = []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        ne0, ne1 = (int(s) for s in t.shape)
        rows = np.unique(np.linspace(0, ne1 - 1, ROWS_PER_TENSOR).round().astype(np.int64))
        if ne1 > 10 * EMBEDDING_ROWS:
            rows = np.union1d(np.arange(EMBEDDING_ROWS), rows)
        raw = np.ascontiguousarray(np.asarray(t.data).reshape(ne1, -1)[rows])
        x = ggml_dequantize(raw, int(t.tensor_type), (len(rows), ne0))
        imp = np.add.reduce(x.astype(np.float64) ** 2, axis=0) / len(rows) + 1e-8  # column energy
        out.append((t.name, np.ascontiguousarray(x, dtype=np.float32), imp.astype(np.float32)))
    assert len(out) == 211  # 30 layers x 7 matrices + token_embd
    return out


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", FORMATS)
def test_smollm2_every_2d_tensor_matches_libggml(smollm2_tensors, qtype, with_importance):
    fmt = get_format(qtype)
    covered = 0
    for name, x, imp in smollm2_tensors:
        if x.shape[1] % fmt.block_size:
            continue  # llama.cpp cannot store this tensor in this type either (ggml_row_size asserts)
        w = imp if with_importance else None
        ref = ggml_quantize(x, qtype, w)
        assert_same_bytes(quantize(x, qtype, importance=w), ref, fmt.type_size, f"{qtype} {name}")
        assert_same_floats(dequantize(ref, qtype, x.shape), ggml_dequantize(ref, qtype, x.shape), name)
        covered += 1
    assert covered == (211 if 576 % fmt.block_size == 0 else 30)  # 256-blocks fit only ffn_down (1536)


def test_a_recorded_build_failure_is_not_retried(tmp_path):
    """A build that failed on its own is recorded per key: later processes read the reason and use the JIT
    kernels without starting the builder again (python -m ggufkit.quants.native build retries)."""
    code = (
        "from ggufkit.quants import native\n"
        "why = 'cannot build the native kernels: test'\n"
        "native.library_path().with_suffix('.failed').write_text(why)\n"
        "print(native.library() is None, native.status())\n"
    )
    done = _python(code, GGUFKIT_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True cannot build the native kernels: test"
    assert not list((tmp_path / "native").glob("*.so")) and not list((tmp_path / "native").glob(".*"))
