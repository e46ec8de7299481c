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
