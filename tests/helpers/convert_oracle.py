"""The reference converter as an oracle: llama.cpp's own convert_hf_to_gguf.py, run from the oracle's tree.

    reference_convert(hf_dir, "f16") -> Path of the GGUF convert_hf_to_gguf.py writes for that folder

The script runs in a subprocess of this Python (sys.executable: it needs torch, transformers and
sentencepiece, the test extra) from source_tree() — the llama-cpp-python sdist's vendor/llama.cpp, whose
conversion/ package and gguf-py it imports (NO_LOCAL_GGUF is removed from its environment so the tree's
gguf-py is used, never the installed `gguf`). Results are cached in ggufkit's cache under a digest of the
folder's name, every file's name and bytes, and the outtype, so a test that converts the same folder twice
pays once. A failed run raises ReferenceConvertError with the tail of the script's stderr.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ggufkit.cache import atomic_output, cache_dir, sha256_file

from .llama_programs import VERSION, source_tree

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


class ReferenceConvertError(RuntimeError):
    pass


def folder_digest(hf_dir: str | os.PathLike) -> str:
    """sha256 over the folder's name and every file in it (relative path and contents), in sorted order."""
    hf_dir = Path(hf_dir)
    h = hashlib.sha256()
    h.update(hf_dir.resolve().name.encode() + b"\0")
    for f in sorted(p for p in hf_dir.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(hf_dir)).encode() + b"\0")
        h.update(sha256_file(f).encode() + b"\0")
    return h.hexdigest()


def script() -> Path:
    return source_tree() / "convert_hf_to_gguf.py"


def reference_convert(
    hf_dir: str | os.PathLike, outtype: str, *, out: str | os.PathLike | None = None
) -> Path:
    """convert_hf_to_gguf.py HF_DIR --outtype OUTTYPE: the cached result, or a copy at `out` if given."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; known: {OUTTYPES}")
    hf_dir = Path(hf_dir)
    key = hashlib.sha256(f"{VERSION}\0{outtype}\0{folder_digest(hf_dir)}".encode()).hexdigest()[:24]
    cached = cache_dir("reference-convert") / f"{key}.{outtype}.gguf"
    if not cached.exists():
        _run(hf_dir, outtype, cached)
    if out is None:
        return cached
    with open(cached, "rb") as src, atomic_output(out) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return Path(out)


def _run(hf_dir: Path, outtype: str, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(script()), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not tmp.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ReferenceConvertError(
                f"convert_hf_to_gguf.py {hf_dir} --outtype {outtype} failed (exit {proc.returncode}):\n{tail}"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
