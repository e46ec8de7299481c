"""The report's work records: JSON records (written whole or not at all, by cache.atomic_write), and the keys
that tie a cached result to what decided it (inputs, options, the code that computed it)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from .. import __version__
from ..cache import atomic_write
from ..gguf.reader import open_gguf


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def record_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


SOURCE_SUFFIXES = (".py", ".c", ".json")  # Python, C compiled into the native kernels, and data tables


@functools.cache
def code_fingerprint(parts: tuple[str, ...]) -> str:
    """sha256 of the package's source files that decide a result, so a changed quantizer or engine never
    reuses a stale cache entry. Taken once per process: it stands for the code this process runs."""
    return source_fingerprint(Path(__file__).parents[1], parts)


def source_fingerprint(root: Path, parts: tuple[str, ...]) -> str:
    """code_fingerprint of the package at `root` (a folder holding ggufkit's files): every source file
    (SOURCE_SUFFIXES) under each part, by its path and bytes, and the version."""
    h = hashlib.sha256(__version__.encode())
    for part in parts:
        p = root / part
        files = sorted(f for f in p.rglob("*") if f.suffix in SOURCE_SUFFIXES) if p.is_dir() else [p]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tensor_sha256(path) -> str:
    """sha256 of a GGUF's tensors (names, shapes, types and data), leaving out the KV header: two levels
    whose files differ only in general.file_type have the same tensor_sha256."""
    h = hashlib.sha256()
    with open_gguf(path) as g:
        for t in g.tensors:
            h.update(f"{t.name}|{tuple(t.shape)}|{int(t.ggml_type)}|{t.offset}\n".encode())
        start = g.data_offset
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
