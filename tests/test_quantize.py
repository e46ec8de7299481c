"""quantize_file and `ggufkit quantize` against the real llama.cpp: whole-file sha256 identity, errors, CLI.

References, made inside the tests and cached in ~/.cache/ggufkit by input identity:
  - without an imatrix: llama_model_quantize from llama-cpp-python==0.3.36 (what llama-quantize runs);
  - with an imatrix or command-line options: the llama-quantize program built from the same source tree
    (tests.helpers.llama_programs reference_quantized); imatrices are made by llama-imatrix on a short text.
The full cross product runs by default: 4 bases (SmolLM2 F16 and F32, synthetic F32 and F16) x 19 TYPEs
without an imatrix and x 16 quantized TYPEs with one (about 2 minutes with references cached; making the
references costs more the first time: llama.cpp's IQ4 on SmolLM2 is ~1 min per file). GGUFKIT_FULL_MATRIX=0
trims it to a subset (every TYPE on the synthetic model and on SmolLM2 F16) for quick local runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import ggufkit
from ggufkit import quants
from ggufkit.cache import cache_dir, sha256_file
from ggufkit.cli import COMMANDS
from ggufkit.cli import main as cli_main
from ggufkit.errors import GgufkitError, QuantizeError
from ggufkit.gguf.reader import open_gguf
from ggufkit.quantize.job import parse_override_kv, quantize_file
from ggufkit.quantize.plan import TensorKind
from ggufkit.quants import native
from tests.helpers.gguf_build import write_gguf
from tests.helpers.llama_programs import (
    llama_fallbacks,
    llama_model_quantize,
    llama_quantize_dry_run,
    reference_quantized,
    tool,
)

BACKENDS = ("native", "jit") if native.compiler() else ("jit",)  # both kernel builds

LEVELS = [
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_0",
    "Q4_1",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_0",
    "Q5_1",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "Q8_0",
    "IQ4_NL",
    "IQ4_XS",
    "F16",
    "BF16",
    "F32",
]
QUANTIZED = [lv for lv in LEVELS if lv not in ("F16", "BF16", "F32")]
SLOW_ON_SMOLLM2 = ("IQ4_NL", "IQ4_XS")  # ~1 minute per file on 2 cores, in llama.cpp as in ggufkit
FULL = os.environ.get("GGUFKIT_FULL_MATRIX", "1") != "0"
full_only = pytest.mark.skipif(not FULL, reason="trimmed cross product: GGUFKIT_FULL_MATRIX=0")
REPO = Path(__file__).resolve().parents[1]


# -- references -------------------------------------------------------------------------------------------


def _file_key(*parts) -> str:
    ident = []
    for p in parts:
        if isinstance(p, Path):
            st = p.stat()
            ident.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        else:
            ident.append(p)
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]


def lmq_reference(src: Path, level: str, **opts) -> Path:
    """src quantized by llama-cpp-python's llama_model_quantize, cached by (src identity, level, opts)."""
    target = cache_dir("reference-lmq") / f"{src.stem}-{level}-{_file_key(src, level, opts)}.gguf"
    if not target.exists():
        tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}.gguf")
        llama_model_quantize(src, tmp, level, **opts)
        os.replace(tmp, target)
    return target


def make_imatrix(model: Path, fmt: str = "gguf") -> Path:
    """An imatrix of `model` made by llama-imatrix on Python's own pydoc topics text (4 chunks of 128)."""
    folder = cache_dir("imatrix")
    text = folder / "pydoc-topics.txt"
    if not text.exists():
        from pydoc_data.topics import topics

        tmp = text.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n\n".join(topics[k] for k in sorted(topics))[:60000])
        os.replace(tmp, text)
    ext = "gguf" if fmt == "gguf" else "dat"
    target = folder / f"{model.stem}-{_file_key(model, fmt)}.imatrix.{ext}"
    if not target.exists():
        tmp = target.with_name(f"tmp{os.getpid()}-{target.name}")
        cmd = [
            str(tool("llama-imatrix")),
            "-m",
            str(model),
            "-f",
            str(text),
            "-o",
            str(tmp),
            "--output-format",
            fmt,
            "-c",
            "128",
            "--chunks",
            "4",
            "-b",
            "512",
            "-t",
            "2",
            "--no-ppl",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if run.returncode != 0 or not tmp.exists():
            raise RuntimeError(f"llama-imatrix failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def bases(smollm2_f16, smollm2_f32, synthetic_f32, synthetic_f16) -> dict[str, Path]:
    return {
        "smollm2_f16": smollm2_f16,
        "smollm2_f32": smollm2_f32,
        "synthetic_f32": synthetic_f32,
        "synthetic_f16": synthetic_f16,
    }


@pytest.fixture(scope="session")
def imatrices(bases) -> dict[str, Path]:
    """One GGUF imatrix per model (SmolLM2's from its F16 base, the synthetic model's from its F32 one)."""
    smol = make_imatrix(bases["smollm2_f16"])
    syn = make_imatrix(bases["synthetic_f32"])
    return {"smollm2_f16": smol, "smollm2_f32": smol, "synthetic_f32": syn, "synthetic_f16": syn}


def assert_identical(ours: Path, ref: Path) -> None:
    a, b = sha256_file(ours), sha256_file(ref)
    if a != b:
        with open_gguf(ours) as mo, open_gguf(ref) as mr:
            keys = [
                k
                for k in list(mo.kv) + list(mr.kv)
                if (k in mo.kv) != (k in mr.kv) or mo.kv[k].raw != mr.kv[k].raw
            ]
            diff = [
                (x.name, x.ggml_type.name, y.ggml_type.name)
                for x, y in zip(mo.tensors, mr.tensors)
                if x.name != y.name or x.ggml_type != y.ggml_type or bytes(x.data()) != bytes(y.data())
            ]
        raise AssertionError(
            f"{ours.name} differs from llama.cpp's {ref.name}: KVs {list(mo.kv) == list(mr.kv)}"
            f" order, differing KVs {keys[:5]}, differing tensors {diff[:5]}"
        )


def _cases(pairs):
    return [pytest.param(b, lv, id=f"{b}-{lv}", marks=m) for b, lv, m in pairs]


def _no_imatrix_cases():
    out = []
    for b in ("smollm2_f16", "smollm2_f32", "synthetic_f32", "synthetic_f16"):
        for lv in LEVELS:
            default = (
                b == "synthetic_f32"
                or (b == "smollm2_f16" and lv not in SLOW_ON_SMOLLM2)
                or (b == "smollm2_f32" and lv in ("Q4_K_M", "Q8_0", "F16"))
                or (b == "synthetic_f16" and lv in ("Q4_K_M", "Q6_K", "BF16"))
            )
            out.append((b, lv, () if default else full_only))
    return _cases(out)


def _imatrix_cases():
    out = []
    for b in ("smollm2_f16", "smollm2_f32", "synthetic_f32", "synthetic_f16"):
        for lv in QUANTIZED:
            default = b == "synthetic_f32" or (b == "smollm2_f16" and lv in ("Q4_0", "Q4_K_M", "Q5_K_S"))
            out.append((b, lv, () if default else full_only))
    return _cases(out)


# -- byte identity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,level", _no_imatrix_cases())
def test_matches_llama_model_quantize(bases, base, level, tmp_path):
    src = bases[base]
    out = tmp_path / "out.gguf"
    summary = quantize_file(src, out, level, threads=2)
    assert_identical(out, lmq_reference(src, level))
    assert summary.file_size == out.stat().st_size
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


@pytest.mark.parametrize("base,level", _imatrix_cases())
def test_matches_llama_quantize_with_imatrix(bases, imatrices, base, level, tmp_path):
    src, imx = bases[base], str(imatrices[base])
    out = tmp_path / "out.gguf"
    summary = quantize_file(src, out, level, imatrix=imx, threads=2)
    assert summary.imatrix_entries > 0
    assert_identical(out, reference_quantized(src, level, imatrix=imx))


@pytest.mark.parametrize("level,with_imatrix", [("Q4_K_M", False), ("Q5_1", True), ("IQ4_XS", True)])
def test_jit_fallback_matches(bases, imatrices, level, with_imatrix, tmp_path):
    """The numba JIT kernels (used when the native library cannot be built) on a subset of the files."""
    src = bases["synthetic_f32"]
    imx = str(imatrices["synthetic_f32"]) if with_imatrix else None
    old = quants.set_backend("jit")
    try:
        summary = quantize_file(src, tmp_path / "out.gguf", level, imatrix=imx, threads=2)
    finally:
        quants.set_backend(old)
    assert summary.kernels == "jit"
    ref = reference_quantized(src, level, imatrix=imx) if imx else lmq_reference(src, level)
    assert_identical(tmp_path / "out.gguf", ref)


_NO_NUMBA_CLI = """
import sys
from ggufkit.cli import main
rc = main(sys.argv[1:])
print(rc, sorted({m.split(".")[0] for m in sys.modules} & {"numba", "llvmlite"}))
"""


_ENVIRON_SCRIPT = """
import os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
before = dict(os.environ)
import ggufkit.quantize.job as job
assert dict(os.environ) == before, "importing ggufkit.quantize.job changed os.environ"
from ggufkit import quants
quants.set_backend(sys.argv[3])
for user in (None, "ACTIVE"):
    if user:
        os.environ["OMP_WAIT_POLICY"] = user
    expect = dict(os.environ)
    seen = []
    watch = lambda p: seen.append(os.environ.get("OMP_WAIT_POLICY"))
    job.quantize_file(sys.argv[1], sys.argv[2], "Q8_0", progress=watch)
    assert dict(os.environ) == expect, "quantize_file left os.environ changed"
    assert seen and set(seen) == {user or "PASSIVE"}, seen
print("ok")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_environment_untouched_outside_the_job(bases, tmp_path, backend):
    """Importing the job sets nothing in the host process's environment; while the kernels run,
    OMP_WAIT_POLICY is PASSIVE (libgomp's spin-waiting starves shared cores) unless the user set it, and
    the environment is restored afterwards."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = [str(bases["synthetic_f32"]), str(tmp_path / "o.gguf"), backend]
    run = subprocess.run(
        [sys.executable, "-c", _ENVIRON_SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the JIT kernels are used")
def test_cli_process_never_imports_numba(bases, imatrices, tmp_path):
    """`ggufkit quantize` with the native library: numba and llvmlite are never imported (they cost ~0.7 s
    and ~100 MiB per process), and the file is still llama-quantize's."""
    assert quants.backend() == "native", native.status()
    src, imx = bases["synthetic_f16"], str(imatrices["synthetic_f16"])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    argv = ["quantize", "--imatrix", imx, str(src), str(tmp_path / "o.gguf"), "Q4_K_M", "2"]
    run = subprocess.run(
        [sys.executable, "-c", _NO_NUMBA_CLI, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "0 []", run.stdout
    assert "(native kernels)" in run.stdout
    assert_identical(tmp_path / "o.gguf", reference_quantized(src, "Q4_K_M", imatrix=imx))


# Who imports gguf-py: a finder first on sys.meta_path notes the module whose import statement asked for it.
_IMPORTS_CLI = """
import sys
class Watch:
    importers = []
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in ("gguf", "numpy"):
            f = sys._getframe(1)
            while f is not None and f.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                f = f.f_back
            cls.importers.append([name, f.f_globals.get("__name__") if f is not None else None])
        return None
sys.meta_path.insert(0, Watch)
from ggufkit.cli import main
rc = main(sys.argv[1:])
import json
print(json.dumps([rc, Watch.importers, sorted(m for m in sys.modules if m.startswith("ggufkit.cli."))]))
"""


def _cli_imports(tmp_path, *argv) -> tuple[int, list, list]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_CLI, "quantize", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the JIT kernels are used")
def test_cli_process_imports_only_what_quantize_needs(bases, imatrices, tmp_path):
    """Start-up is a visible part of a small job: a `ggufkit quantize` process imports no other subcommand
    module (only the shared cli/options.py beside its own), neither gguf-py (~40 ms of imports; ggufkit's
    own ggml_types instead) nor numpy (~50 ms: the pipeline hands raw memory to the native library), on F32
    and F16 inputs; the bytes are still llama.cpp's. The control: with an imatrix (whose vectors are numpy
    arrays) the watch sees ggufkit.quantize.imatrix import numpy."""
    assert quants.backend() == "native", native.status()
    for base, level in (("synthetic_f32", "Q8_0"), ("smollm2_f16", "Q4_K_M")):
        src, out = bases[base], tmp_path / f"{base}.gguf"
        rc, importers, cli_modules = _cli_imports(tmp_path, src, out, level, 2)
        commands = [m for m in cli_modules if m.rpartition(".")[2] in COMMANDS.values()]
        assert rc == 0 and commands == ["ggufkit.cli.quantize"], (base, cli_modules)
        assert cli_modules == ["ggufkit.cli.options", "ggufkit.cli.quantize"], (base, cli_modules)
        assert importers == [], (base, importers)
        assert_identical(out, reference_quantized(src, level))
    imx = imatrices["synthetic_f32"]
    rc, importers, _ = _cli_imports(
        tmp_path, "--imatrix", imx, bases["synthetic_f32"], tmp_path / "i.gguf", "Q4_K_M"
    )
    assert rc == 0 and ["numpy", "ggufkit.quantize.imatrix"] in importers, importers


@pytest.fixture(scope="session")
def moe_f32(smollm2_path) -> Path:
    """A Mixtral-style synthetic llama: 4 experts of 512-wide feed-forwards (3-D *_exps tensors), 2 layers."""
    from tests.helpers.synthetic import synthetic_llama

    return synthetic_llama(smollm2_path, seed=3, n_layer=2, n_expert=4, n_ff=512)


@pytest.mark.parametrize(("level", "with_imatrix"), [("Q4_K_M", False), ("Q2_K", False), ("Q4_K_M", True),
                                                     ("IQ4_XS", True), ("Q4_0", True)])  # fmt: skip
def test_mixture_of_experts_matches(moe_f32, level, with_imatrix, tmp_path):
    """3-D expert tensors: chunks never cross an expert, and each expert is quantized with its own slice
    of the imatrix entry (llama-imatrix collects one per expert), as llama-quantize does."""
    opts = {"imatrix": str(make_imatrix(moe_f32))} if with_imatrix else {}
    out = tmp_path / "out.gguf"
    quantize_file(moe_f32, out, level, threads=2, **opts)
    assert_identical(out, reference_quantized(moe_f32, level, **opts))


@pytest.mark.parametrize("level", ["Q4_K_M", "IQ4_XS", "Q4_0"])
def test_legacy_dat_imatrix_matches(bases, level, tmp_path):
    src = bases["synthetic_f32"]
    imx = str(make_imatrix(src, "dat"))
    out = tmp_path / "out.gguf"
    quantize_file(src, out, level, imatrix=imx)
    assert_identical(out, reference_quantized(src, level, imatrix=imx))


def test_q2_k_s_needs_and_uses_an_imatrix(bases, imatrices, tmp_path):
    """Q2_K_S (not in the issue's list, but llama-quantize has it): refused without an imatrix, as llama.cpp
    refuses it; identical with one."""
    src = bases["synthetic_f32"]
    with pytest.raises(QuantizeError, match="importance matrix"):
        quantize_file(src, tmp_path / "out.gguf", "Q2_K_S")
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        reference_quantized(src, "Q2_K_S")
    imx = str(imatrices["synthetic_f32"])
    quantize_file(src, tmp_path / "out.gguf", "Q2_K_S", imatrix=imx)
    assert_identical(tmp_path / "out.gguf", reference_quantized(src, "Q2_K_S", imatrix=imx))


OPTION_CASES = {
    "include": dict(include_weights=["ffn_down", "attn_v"]),
    "exclude": dict(exclude_weights=["blk.1."]),
    "tensor-types": dict(tensor_types=["attn_q=q8_0", r"blk\.[0-1]\.ffn_up=Q5_K", "FFN_GATE=iq4_xs"]),
    "output-embd-types": dict(output_tensor_type="q5_1", token_embedding_type="Q3_K"),
    "pure": dict(pure=True),
    "leave-output": dict(leave_output_tensor=True),
    "override-kv": dict(
        override_kv=[
            "general.name=str:renamed",
            "llama.context_length=int:-4096",
            "test.float=float:0.1",
            "test.flag=bool:true",
            "general.file_type=int:7",
        ]
    ),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_llama_quantize(bases, imatrices, case, tmp_path):
    src = bases["synthetic_f32"]
    opts = dict(OPTION_CASES[case])
    if case in ("include", "exclude"):
        opts["imatrix"] = str(imatrices["synthetic_f32"])
    out = tmp_path / "out.gguf"
    quantize_file(src, out, "Q4_K_M", **opts)
    assert_identical(out, reference_quantized(src, "Q4_K_M", **opts))


def test_requantize_matches(smollm2_path, tmp_path):
    """A Q4_1 input dequantized (as llama.cpp does with --allow-requantize) and quantized again."""
    out = tmp_path / "out.gguf"
    quantize_file(smollm2_path, out, "Q5_K_S", allow_requantize=True)
    assert_identical(out, lmq_reference(smollm2_path, "Q5_K_S", allow_requantize=True))


def test_requantize_k_quants_matches(bases, tmp_path):
    """K-quant inputs (widened by numpy, quants/kdequant.py) inside the parallel pipeline, whose kernels
    then run on the same worker pool: llama.cpp's bytes."""
    k_input = tmp_path / "q4km.gguf"
    quantize_file(bases["synthetic_f32"], k_input, "Q4_K_M")
    out = tmp_path / "out.gguf"
    quantize_file(k_input, out, "Q8_0", allow_requantize=True, threads=2)
    assert_identical(out, lmq_reference(k_input, "Q8_0", allow_requantize=True))


# -- summary, dry run, Python API -------------------------------------------------------------------------


def test_summary_and_api(bases, tmp_path):
    src = bases["smollm2_f16"]
    out = tmp_path / "out.gguf"
    events = []
    s = ggufkit.quantize_file(src, out, "q4_k_m", threads=1, progress=events.append)
    assert s.level == "Q4_K_M" and s.ftype == 15 and s.dst == out and not s.dry_run and s.threads == 1
    with open_gguf(out) as m, open_gguf(src) as base:
        assert s.size_after == sum(t.nbytes for t in m.tensors)
        assert s.size_before == sum(t.nbytes for t in base.tensors)
        assert s.n_elements == sum(t.n_elements for t in base.tensors)
        assert m.get("general.file_type") == 15
    assert s.bits_per_weight == pytest.approx(8 * s.size_after / s.n_elements)
    assert s.bits_per_weight_before == pytest.approx(16.0, abs=0.01)
    # SmolLM2's 576-wide rows: every K-quant tensor but ffn_down falls back; llama.cpp counts them too
    dry = llama_quantize_dry_run(src, "Q4_K_M")
    assert len(s.fallbacks) == dry.n_fallback > 0
    assert all("fallback" in tp.reason for tp in s.fallbacks)
    assert all(tp.kind is TensorKind.FALLBACK and tp.fallback[1] == tp.dst_type for tp in s.fallbacks)
    assert {tp.name: tp.fallback for tp in s.fallbacks} == llama_fallbacks(dry.log)
    # progress: per chunk, in order, ending at the total
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == events[-1].bytes_total == s.size_before
    assert [e.index for e in events] == sorted(e.index for e in events)


def test_dry_run_writes_nothing_and_matches_llama_quantize(bases, tmp_path, capsys):
    src = bases["synthetic_f32"]
    shutil.copy(src, tmp_path / "in.gguf")
    rc = cli_main(["quantize", "--dry-run", str(tmp_path / "in.gguf"), "Q4_K_M"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf"]
    printed = capsys.readouterr().out
    dry = llama_quantize_dry_run(src, "Q4_K_M")
    lines = [ln for ln in printed.splitlines() if ln.startswith("[")]
    assert len(lines) == len(dry.tensors)
    for line, (name, _ne, src_t, dst_t) in zip(lines, dry.tensors):
        assert line.split()[1] == name
        assert f"{src_t.name} -> {dst_t.name}" in line
    s = quantize_file(src, None, "Q4_K_M", dry_run=True)
    assert f"{s.size_after / 2**20:.2f}" == dry.quant_size_mib
    assert (
        f"{s.size_after / 2**20:.2f} MiB" in printed and f"{s.bits_per_weight:.2f} bits per weight" in printed
    )


def test_cli_dry_run_fallback_summary(bases, capsys):
    """The summary groups the fallbacks by (wanted, used) and row length, with the counts llama.cpp's own
    per-tensor warnings give."""
    src = bases["smollm2_f16"]
    assert cli_main(["quantize", "--dry-run", str(src), "Q4_K_M"]) == 0
    printed = capsys.readouterr().out
    theirs = llama_fallbacks(llama_quantize_dry_run(src, "Q4_K_M").log)
    want = {}
    for wanted, used in theirs.values():
        note = f"fallback {wanted.name} -> {used.name}: row 576 not a multiple of 256"  # SmolLM2: 576 wide
        want[note] = want.get(note, 0) + 1
    assert f"  fallbacks: {len(theirs)} of " in printed
    groups = {}
    for line in printed.splitlines():
        head, sep, _ = line.partition(" x fallback ")
        if sep:
            groups["fallback " + _.rsplit(": ", 1)[0]] = int(head)
    assert groups == want and len(want) > 1


def test_cli_default_output_name_and_threads(bases, tmp_path, capsys):
    src = tmp_path / "model-f16.gguf"
    shutil.copy(bases["synthetic_f16"], src)
    assert cli_main(["quantize", str(src), "q8_0", "1"]) == 0
    text = capsys.readouterr()
    assert "1 threads" in text.out and "bits per weight" in text.out
    assert text.err == ""  # no progress bar when stderr is not a terminal
    out = tmp_path / "model-f16-Q8_0.gguf"
    assert_identical(out, lmq_reference(bases["synthetic_f16"], "Q8_0"))
    # explicit output path
    assert cli_main(["quantize", str(src), str(tmp_path / "x.gguf"), "F16"]) == 0
    assert_identical(tmp_path / "x.gguf", lmq_reference(bases["synthetic_f16"], "F16"))


def test_progress_bar_on_a_terminal(bases, tmp_path):
    """With stderr on a pseudo-terminal the CLI draws a tqdm bar (tensor name, bytes, ETA)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ggufkit",
            "quantize",
            str(bases["synthetic_f16"]),
            str(tmp_path / "o.gguf"),
            "Q8_0",
        ],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
        timeout=300,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "/39] " in err and "B/s" in err  # "[k/39] tensor name ... 12.3MB/s"


# -- refusals: one line on stderr, exit status 2 ----------------------------------------------------------


def _cli_error(capsys, *argv) -> str:
    assert cli_main(["quantize", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ggufkit quantize: error: "), err
    return err


def test_unknown_type(bases, tmp_path, capsys):
    err = _cli_error(capsys, bases["synthetic_f16"], tmp_path / "o.gguf", "Q4_K_X")
    assert "Q4_K_X" in err
    with pytest.raises(QuantizeError):
        quantize_file(bases["synthetic_f16"], tmp_path / "o.gguf", "IQ9")
    assert not list(tmp_path.iterdir())


def test_same_path_refused(bases, tmp_path, capsys):
    src = tmp_path / "m.gguf"
    shutil.copy(bases["synthetic_f16"], src)
    before = sha256_file(src)
    _cli_error(capsys, src, src, "Q8_0")
    (tmp_path / "link.gguf").symlink_to(src)
    _cli_error(capsys, src, tmp_path / "link.gguf", "Q8_0")
    os.link(src, tmp_path / "hard.gguf")
    _cli_error(capsys, src, tmp_path / "hard.gguf", "Q8_0")
    assert sha256_file(src) == before


def test_requantize_refused(smollm2_path, tmp_path, capsys):
    err = _cli_error(capsys, smollm2_path, tmp_path / "o.gguf", "Q4_K_M")
    assert "already quantized" in err and "Q4_1" in err and "--allow-requantize" in err
    assert not list(tmp_path.iterdir())
    # llama.cpp refuses it too
    with pytest.raises(RuntimeError):
        llama_model_quantize(smollm2_path, tmp_path / "ref.gguf", "Q4_K_M")


def _tiny_gguf(
    path: Path,
    arch: str,
    *,
    nan_at: tuple[int, int] | None = None,
    bad=np.nan,
    huge_rows: int = 0,
    dtype: str = "F32",
) -> Path:
    kvs = {
        "context_length": 128,
        "block_count": 1,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "head_count": 2,
        "head_count_kv": 2,
        "layer_norm_rms_eps": 1e-5,
    }
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    x[:huge_rows] = np.float32(3e38)  # finite, but a row's (or the chunk's) sum overflows to infinity
    if nan_at is not None:
        x[nan_at] = bad
    if dtype == "F16":
        q = x.astype(np.float16)
    elif dtype == "BF16":  # the top half of each float32 (these values are exact in bfloat16 or not: any)
        q = ((x.view(np.uint32) >> 16).astype(np.uint16), gguf.GGMLQuantizationType.BF16)
    else:
        q = x
    tensors = {"blk.0.attn_q.weight": q, "blk.0.attn_norm.weight": np.ones(64, np.float32)}
    return write_gguf(path, arch, kvs, tensors)


def test_requantize_without_a_dequantizer_is_one_line(tmp_path, capsys):
    """A tensor type ggufkit cannot dequantize (IQ2_XXS; llama.cpp can) asked to be requantized: one line,
    exit 2, nothing written; the reader and planner accept the file (its dry run works)."""
    blocks = np.random.default_rng(0).integers(0, 256, size=(16, 66), dtype=np.uint8)  # 16 rows of 256
    write_gguf(
        tmp_path / "iq2.gguf",
        "llama",
        {"block_count": 1, "embedding_length": 256, "head_count": 2, "layer_norm_rms_eps": 1e-5},
        {
            "blk.0.attn_q.weight": (blocks, gguf.GGMLQuantizationType.IQ2_XXS),
            "blk.0.attn_norm.weight": np.ones(256, np.float32),
        },
    )
    src, out = tmp_path / "iq2.gguf", tmp_path / "o.gguf"
    err = _cli_error(capsys, "--allow-requantize", src, out, "Q8_0")
    assert "blk.0.attn_q.weight" in err and "IQ2_XXS" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["iq2.gguf"]
    plan = quantize_file(src, None, "Q8_0", allow_requantize=True, dry_run=True).plan
    assert [tp.name for tp in plan.tensors if tp.quantize] == ["blk.0.attn_q.weight"]


def test_unsupported_architecture(tmp_path, capsys):
    src = _tiny_gguf(tmp_path / "t5.gguf", "t5encoder")
    err = _cli_error(capsys, src, tmp_path / "o.gguf", "Q8_0")
    assert "t5encoder" in err and not (tmp_path / "o.gguf").exists()


def test_imatrix_for_another_model(bases, imatrices, tmp_path, capsys):
    err = _cli_error(
        capsys, "--imatrix", imatrices["smollm2_f16"], bases["synthetic_f32"], tmp_path / "o.gguf", "Q4_K_M"
    )
    assert "another model" in err
    assert not (tmp_path / "o.gguf").exists()


def test_nonfinite_weights_refused_like_llama_cpp(tmp_path, capsys):
    clean = _tiny_gguf(tmp_path / "clean.gguf", "llama")
    llama_model_quantize(clean, tmp_path / "clean-q8.gguf", "Q8_0")  # the control: llama.cpp takes it
    quantize_file(clean, tmp_path / "ours-q8.gguf", "Q8_0")
    assert_identical(tmp_path / "ours-q8.gguf", tmp_path / "clean-q8.gguf")
    capsys.readouterr()  # drop llama.cpp's log
    src = _tiny_gguf(tmp_path / "nan.gguf", "llama", nan_at=(5, 7))
    err = _cli_error(capsys, src, tmp_path / "o.gguf", "Q8_0")
    assert "blk.0.attn_q.weight" in err and "row 5" in err
    assert not (tmp_path / "o.gguf").exists()
    with pytest.raises(RuntimeError):  # llama.cpp refuses the same file
        llama_model_quantize(src, tmp_path / "ref.gguf", "Q8_0")
    # an explicit flag lets it through; the NaN row comes out as whatever the kernel makes of it
    assert cli_main(["quantize", "--allow-nonfinite", str(src), str(tmp_path / "o.gguf"), "Q8_0"]) == 0
    with open_gguf(tmp_path / "o.gguf") as m:
        assert m.tensor("blk.0.attn_q.weight").ggml_type == gguf.GGMLQuantizationType.Q8_0


def test_finiteness_check_sees_infinities_and_not_overflowing_sums(tmp_path, capsys):
    """The check sums each chunk first: an infinity must still be caught, and finite weights whose sum
    overflows must still be quantized (as llama.cpp does, same bytes)."""
    src = _tiny_gguf(tmp_path / "inf.gguf", "llama", nan_at=(9, 3), bad=-np.inf)
    err = _cli_error(capsys, src, tmp_path / "o.gguf", "Q8_0")
    assert "blk.0.attn_q.weight" in err and "row 9" in err
    src = _tiny_gguf(tmp_path / "huge.gguf", "llama", huge_rows=3)
    # F32 -> F32 (llama.cpp's F16 or Q8_0 output would overflow its scales and be refused as invalid)
    llama_model_quantize(src, tmp_path / "ref.gguf", "F32")
    quantize_file(src, tmp_path / "ours.gguf", "F32")
    assert_identical(tmp_path / "ours.gguf", tmp_path / "ref.gguf")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_nonfinite_half_precision_weights_refused(dtype, backend, tmp_path):
    """F16/BF16 inputs, quantized (checked after widening) or copied (checked on their bits), on both kernel
    builds: the first bad row is named, also when it is not in the first thread's rows; llama.cpp refuses
    the file it quantizes and takes the clean one (same bytes as ours)."""
    old = quants.set_backend(backend)
    try:
        clean = _tiny_gguf(tmp_path / "clean.gguf", "llama", dtype=dtype)
        llama_model_quantize(clean, tmp_path / "ref.gguf", "Q8_0")
        quantize_file(clean, tmp_path / "ours.gguf", "Q8_0", threads=2)
        assert_identical(tmp_path / "ours.gguf", tmp_path / "ref.gguf")
        for bad in (np.nan, np.inf, -np.inf):
            src = _tiny_gguf(tmp_path / "bad.gguf", "llama", nan_at=(11, 63), bad=bad, dtype=dtype)
            for level in ("Q8_0", dtype):  # quantized; copied as it is
                with pytest.raises(QuantizeError, match=r"blk\.0\.attn_q\.weight.* row 11;"):
                    quantize_file(src, tmp_path / "o.gguf", level, threads=2)
                assert not (tmp_path / "o.gguf").exists()
            with pytest.raises(RuntimeError):
                llama_model_quantize(src, tmp_path / "ref-bad.gguf", "Q8_0")
    finally:
        quants.set_backend(old)


def test_errors_in_a_subprocess_have_no_traceback(bases, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ggufkit",
            "quantize",
            str(bases["synthetic_f16"]),
            str(tmp_path / "o.gguf"),
            "Q7_K",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_override_kv_parsing():
    v = gguf.GGUFValueType
    assert parse_override_kv("a.b=int:-5") == ("a.b", v.UINT32, 5)
    assert parse_override_kv("a.b=int:12abc") == ("a.b", v.UINT32, 12)  # C atol
    assert parse_override_kv("a.b=int:x") == ("a.b", v.UINT32, 0)
    assert parse_override_kv("a=float:0.1")[2] == np.float32(0.1)
    assert parse_override_kv("a=bool:false") == ("a", v.BOOL, False)
    assert parse_override_kv("a=str:hi there") == ("a", v.STRING, "hi there")
    for bad in ("noequals", "a=bool:yes", "a=list:1", "=int:1", "a=str:" + "x" * 128):
        with pytest.raises(GgufkitError):
            parse_override_kv(bad)
