"""Full second moments: each linear layer's input covariance H = X^T X (what GPTQ-style error feedback
needs; the imatrix is its diagonal).

Collected by the same observer as the imatrix (calibrate.stats.ImatrixStats with hessian=True): for each
matmul input x [rows, ne0] (float32, as llama-imatrix sees it) H[m] += x^T x, in float64, per matrix m (per
expert for a 3-D weight, over the rows routed to it). diag(H[m]) is the imatrix's in_sum2 row m.

On disk, a folder:
    index.json       {"format": "ggufkit.hessian", "version": 1, "dtype": "float64",
                      "layout": "upper triangle, row-major (numpy.triu_indices(ne0))",
                      "chunk_size", "chunk_count", "datasets",
                      "tensors": {weight name: {"file", "ne0", "n_mat", "rows": [rows per matrix]}}}
    <weight>.npy     float64 [n_mat, ne0 * (ne0 + 1) / 2]: the upper triangle of each H[m]
Each file is written atomically; index.json last, so a folder with an index is complete.

Memory: n_mat * ne0^2 * 8 bytes per weight, held twice while a pass of chunks is being added to the totals
(what hessian_bytes reports, before anything runs): ~2 GiB for SmolLM2-135M.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..cache import atomic_output, atomic_write
from ..errors import QuantizeError
from .stats import ImatrixStats, observed

__all__ = ["hessian_bytes", "read_hessian", "read_index", "write_hessians"]

FORMAT, VERSION = "ggufkit.hessian", 1


def hessian_bytes(model, *, process_output: bool = False) -> int:
    """Peak bytes of the covariance accumulators for `model` (a GGUFModel): every observed weight's
    n_mat * ne0^2 float64, twice (the totals and the pass being collected)."""
    total = 0
    for t in model.tensors:
        if len(t.shape) >= 2 and observed(t.name, process_output=process_output):
            n_mat = int(t.shape[2]) if len(t.shape) > 2 else 1
            total += n_mat * int(t.shape[0]) ** 2 * 8
    return 2 * total


def _file_name(name: str) -> str:
    return name.replace("/", "_") + ".npy"


def write_hessians(folder: str | os.PathLike, stats: ImatrixStats) -> Path:
    """Write stats.hessians into `folder` (created if needed) as described in the module doc."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in sorted(stats.hessians):
        h = stats.hessians[name]
        n_mat, ne0, _ = h.shape
        iu = np.triu_indices(ne0)
        packed = np.ascontiguousarray(h[:, iu[0], iu[1]])
        with atomic_output(folder / _file_name(name)) as f:
            np.save(f, packed, allow_pickle=False)
        tensors[name] = {
            "file": _file_name(name),
            "ne0": ne0,
            "n_mat": n_mat,
            "rows": [int(c) for c in stats.counts[name]],
        }
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "float64",
        "layout": "upper triangle, row-major (numpy.triu_indices(ne0))",
        "chunk_size": stats.chunk_size,
        "chunk_count": stats.chunk_count,
        "datasets": list(stats.datasets),
        "tensors": tensors,
    }
    atomic_write(folder / "index.json", json.dumps(index, indent=1).encode())
    return folder


def read_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{path}: not a ggufkit hessian index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise QuantizeError(f"{path}: not a {FORMAT} v{VERSION} index")
    return index


def read_hessian(folder: str | os.PathLike, name: str) -> np.ndarray:
    """The full symmetric X^T X of weight `name`: float64 [n_mat, ne0, ne0]."""
    index = read_index(folder)
    info = index["tensors"].get(name)
    if info is None:
        raise QuantizeError(f"{folder}: no covariance for {name}")
    ne0, n_mat = int(info["ne0"]), int(info["n_mat"])
    packed = np.load(Path(folder) / info["file"], allow_pickle=False)
    if packed.dtype != np.float64 or packed.shape != (n_mat, ne0 * (ne0 + 1) // 2):
        raise QuantizeError(
            f"{folder}/{info['file']}: {packed.dtype} {list(packed.shape)}, the index says float64 "
            f"[{n_mat}, {ne0 * (ne0 + 1) // 2}]"
        )
    out = np.empty((n_mat, ne0, ne0), np.float64)
    iu = np.triu_indices(ne0)
    out[:, iu[0], iu[1]] = packed
    out[:, iu[1], iu[0]] = packed
    return out
