"""The real llama.cpp, as the oracle: programs built from the llama-cpp-python==0.3.36 source tree.

`tool("llama-quantize")` returns the path of that program, building it on first use with cmake from the
sdist's `vendor/llama.cpp` into ggufkit's cache folder (outside the repo). The build is shared by tests and
benchmarks and guarded by a file lock, so parallel runs build it once. Nothing of llama.cpp is committed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ggufkit.models import cache_dir

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
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                   "-d", tmp, SDIST]
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
            ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DGGML_OPENMP=ON"],
            check=True, stdout=subprocess.DEVNULL,
        )
        subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *TARGETS],
                       check=True, stdout=subprocess.DEVNULL)
    return exe


if __name__ == "__main__":  # prebuild: python tests/llamacpp.py
    for t in TARGETS:
        print(tool(t))


# llama_ftype values (include/llama.h) by llama-quantize's type names.
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "Q2_K_S": 21, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32,
}


def llama_model_quantize(src, dst, ftype: str, *, nthread: int = 2, allow_requantize: bool = False,
                         pure: bool = False, leave_output_tensor: bool = False,
                         output_tensor_type: int | None = None, token_embedding_type: int | None = None) -> Path:
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
