"""The real llama.cpp, as the oracle: programs built from the llama-cpp-python==0.3.36 source tree.

`tool("llama-quantize")` returns the path of that program, building it on first use with cmake from the
sdist's `vendor/llama.cpp` into ggufkit's cache folder (outside the repo). The build is shared by tests and
benchmarks and guarded by a file lock, so parallel runs build it once. Nothing of llama.cpp is committed.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufkit.cache import cache_dir

VERSION = "0.3.36"
SDIST = f"llama-cpp-python=={VERSION}"
TARGETS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-imatrix")


@contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _root() -> Path:
    return cache_dir(f"llama.cpp-{VERSION}")


def outputs_dir(kind: str) -> Path:
    """Where llama.cpp's cached outputs of one kind live (next to its build, so every test sees the same
    folder even while GGUFKIT_CACHE points at a test's own cache linking to this one)."""
    path = _root() / "outputs" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_tree() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and extracted once."""
    root = _root()
    tree = root / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    with _lock(root / "src.lock"):
        if (tree / "CMakeLists.txt").exists():
            return tree
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-q",
                "-d",
                tmp,
                SDIST,
            ]
            subprocess.run(cmd, check=True)
            (archive,) = Path(tmp).glob("*.tar.gz")
            with tarfile.open(archive) as tf:
                tf.extractall(root / "src", filter="data")
    return tree


def tool(name: str) -> Path:
    """Path of a llama.cpp program (one of TARGETS), built on first use."""
    if name not in TARGETS:
        raise ValueError(f"unknown llama.cpp program {name!r}; known: {TARGETS}")
    root = _root()
    exe = root / "build" / "bin" / name
    if exe.exists():
        return exe
    tree = source_tree()
    with _lock(root / "build.lock"):
        if exe.exists():
            return exe
        build = root / "build"
        jobs = str(os.cpu_count() or 2)
        subprocess.run(
            [
                "cmake",
                "-S",
                str(tree),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                "-DGGML_OPENMP=ON",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["cmake", "--build", str(build), "-j", jobs, "--target", *TARGETS],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return exe


if __name__ == "__main__":  # prebuild: python -m tests.helpers.llama_programs
    for t in TARGETS:
        print(tool(t))


# llama_ftype values (include/llama.h) by llama-quantize's type names.
FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q2_K_S": 21,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "BF16": 32,
}


def llama_model_quantize(
    src,
    dst,
    ftype: str,
    *,
    nthread: int = 2,
    allow_requantize: bool = False,
    pure: bool = False,
    leave_output_tensor: bool = False,
    output_tensor_type: int | None = None,
    token_embedding_type: int | None = None,
) -> Path:
    """llama.cpp's own llama_model_quantize (what llama-quantize runs), through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = FTYPES[ftype.upper()]
    params.allow_requantize = allow_requantize
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")
    return Path(dst)


def base_model(src, ftype: str) -> Path:
    """`src` requantized by llama.cpp to F32/F16/BF16 (a full-precision base), cached by source and type."""
    src = Path(src)
    target = cache_dir("bases") / f"{src.stem}-{ftype.upper()}.gguf"
    if not target.exists():
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        llama_model_quantize(src, tmp, ftype, allow_requantize=True)
        os.replace(tmp, target)
    return target


# --- llama-quantize as a program: cached reference outputs and --dry-run plans ------------------------------


def _quantize_args(
    *,
    imatrix=None,
    include_weights=(),
    exclude_weights=(),
    output_tensor_type=None,
    token_embedding_type=None,
    tensor_types=(),
    pure=False,
    leave_output_tensor=False,
    allow_requantize=False,
    override_kv=(),
) -> list[str]:
    """llama-quantize options, in the order given here (options must precede the positionals)."""
    args: list[str] = []
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    for w in include_weights:
        args += ["--include-weights", w]
    for w in exclude_weights:
        args += ["--exclude-weights", w]
    if output_tensor_type is not None:
        args += ["--output-tensor-type", str(output_tensor_type)]
    if token_embedding_type is not None:
        args += ["--token-embedding-type", str(token_embedding_type)]
    for tt in tensor_types:
        args += ["--tensor-type", tt if isinstance(tt, str) else f"{tt[0]}={tt[1]}"]
    if pure:
        args.append("--pure")
    if leave_output_tensor:
        args.append("--leave-output-tensor")
    if allow_requantize:
        args.append("--allow-requantize")
    for kv in override_kv:
        args += ["--override-kv", kv]
    return args


def _file_id(path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def reference_quantized(src, level: str, *, nthread: int = 2, **opts) -> Path:
    """`src` quantized by the real llama-quantize at `level`, cached in ~/.cache/ggufkit/quantized.

    opts: imatrix (path; passed as given, so quantize.imatrix.file holds that exact string), include_weights,
    exclude_weights, output_tensor_type, token_embedding_type, tensor_types ("PATTERN=TYPE" or pairs), pure,
    leave_output_tensor, allow_requantize, override_kv ("KEY=TYPE:VALUE"). The cache key covers the source
    (path, size, mtime), the imatrix file, the level and every option. Thread count does not change bytes.
    """
    import hashlib
    import json

    args = _quantize_args(**opts)
    ident = {"src": _file_id(src), "level": level.upper(), "args": args}
    if opts.get("imatrix") is not None:
        ident["imatrix"] = _file_id(opts["imatrix"])
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir("quantized") / f"{Path(src).stem}-{level.upper()}-{key}.gguf"
    if target.exists():
        return target
    tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}.gguf")
    cmd = [str(tool("llama-quantize")), *args, str(src), str(tmp), level, str(nthread)]
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if run.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama-quantize failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def llama_quantize_refusal(*args: str) -> str:
    """Runs llama-quantize with `args`, which it must refuse (non-zero exit); returns what it printed."""
    run = subprocess.run([str(tool("llama-quantize")), *args], capture_output=True, text=True)
    assert run.returncode != 0, f"llama-quantize accepted {args}"
    return run.stdout + run.stderr


class DryRun:
    """What `llama-quantize --dry-run` printed: per tensor (name, ne, source type, destination type), in its
    order; the total quantized size as printed (MiB, 2 decimals); the fallback count; the raw log."""

    def __init__(self, tensors, quant_size_mib: str, quant_bpw: str, n_fallback: int, log: str):
        self.tensors = tensors
        self.quant_size_mib = quant_size_mib
        self.quant_bpw = quant_bpw
        self.n_fallback = n_fallback
        self.log = log


def llama_quantize_dry_run(src, level: str, **opts) -> DryRun:
    """Run `llama-quantize --dry-run` (milliseconds: it reads only the metadata) and parse its plan."""
    import re

    from gguf import GGMLQuantizationType

    cmd = [str(tool("llama-quantize")), "--dry-run", *_quantize_args(**opts), str(src), level, "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(
            f"llama-quantize --dry-run failed ({run.returncode}): {' '.join(cmd)}\n{log[-3000:]}"
        )
    line = re.compile(
        r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[([\d,\s]+)\], type =\s+(\w+), size =\s+[\d.]+ MiB"
        r"(?: ->\s+[\d.]+ MiB \((\w+)\))?",
        re.M,
    )
    tensors = []
    for m in line.finditer(log):
        ne = tuple(int(x) for x in m.group(2).split(","))
        src_t = GGMLQuantizationType[m.group(3).upper()]
        dst_t = GGMLQuantizationType[m.group(4).upper()] if m.group(4) else src_t
        tensors.append((m.group(1), ne, src_t, dst_t))
    size = re.search(r"quant size\s+=\s+([\d.]+) MiB \(([\d.]+) BPW\)", log)
    fb = re.search(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback", log)
    return DryRun(
        tensors,
        size.group(1) if size else "",
        size.group(2) if size else "",
        int(fb.group(1)) if fb else 0,
        log,
    )


# tensor_type_fallback's warning, one per tensor: "warning: <name> - ncols <n> not divisible by <qk> (required
# for type <wanted>) [(WARNING: must use F16 due to unusual shape)] -> falling back to <used>"
_FALLBACK_WARNING = re.compile(
    r"warning: (\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\w+)\) "
    r"(?:\(WARNING: must use F16 due to unusual shape\) )?-> falling back to\s+(\w+)"
)


def llama_fallbacks(log: str) -> dict[str, tuple[T, T]]:
    """llama.cpp's own row-length fallbacks in a llama-quantize log: tensor name -> (wanted, used)."""
    return {m[1]: (T[m[2].upper()], T[m[3].upper()]) for m in _FALLBACK_WARNING.finditer(log)}


# --- llama-imatrix: cached reference importance matrices --------------------------------------------------


def reference_imatrix(
    model, text=None, *, ctx: int, chunks: int | None = None, fmt: str = "gguf", in_files=(), extra=()
) -> Path:
    """What the real llama-imatrix writes for `model` on the text file `text` (-c ctx --chunks chunks -t 2
    --no-ppl), or for the merge of `in_files` alone, cached in ~/.cache/ggufkit/imatrix by the model, the
    text's bytes, the input files and every option. The output is written to a temporary name and renamed,
    so the paths stored in imatrix.datasets are the text paths as given."""
    import hashlib
    import json

    args = ["-c", str(ctx), "-t", "2", "--output-format", fmt]
    if text is not None:
        args += ["-f", str(text), "--no-ppl"]
    if chunks is not None:
        args += ["--chunks", str(chunks)]
    for f in in_files:
        args += ["--in-file", str(f)]
    args += list(extra)
    ident = {"model": _file_id(model), "args": args, "in": [_file_id(f) for f in in_files]}
    if text is not None:
        ident["text"] = hashlib.sha256(Path(text).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir("imatrix") / f"{Path(model).stem}-ref-{key}.imatrix.{fmt}"
    if target.exists():
        return target
    tmp = target.with_name(f"tmp{os.getpid()}-{target.name}")
    cmd = [str(tool("llama-imatrix")), "-m", str(model), *args, "-o", str(tmp)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # no number changes; spares a shared machine
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    if run.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama-imatrix failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def llama_cpp_logits(path, windows) -> np.ndarray:
    """llama.cpp's logits (llama-cpp-python, 2 threads, flash attention, one batch) for each window of token
    ids, each a fresh sequence: float32 [windows, n, vocab] for windows of n tokens."""
    import llama_cpp

    n = len(windows[0])
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=2, flash_attn=True,
        verbose=False,
    )  # fmt: skip
    try:
        out = []
        for window in windows:
            llm.reset()
            llm.eval([int(t) for t in window])
            out.append(np.array(llm.scores[:n], dtype=np.float32))
    finally:
        llm.close()
    return np.stack(out)
