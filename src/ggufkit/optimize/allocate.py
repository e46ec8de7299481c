"""Which type each tensor gets: every allowed type's measured damage, then the least damage in the budget.

1. Candidates (`candidates`): every block format of the registry whose block size divides the tensor's row
   length (ggml refuses any other: K-quants and IQ4_XS need ne0 % 256 == 0, the legacy types and IQ4_NL
   ne0 % 32, the float types always), minus the types the caller excludes.
2. Damage (`measure`): for each candidate, the tensor is quantized (by the same function that writes the
   file, so the damage is the written file's) and dequantized; with E = W - Q over a deterministic sample
   of its rows, the damage is the calibration-weighted squared error of the layer's output, scaled back to
   all rows:  sum_rows e diag(imatrix) e^T  (or e H e^T with the full input covariance H = X^T X), where
   an imatrix row is the mean of x^2 over the calibration tokens. A tensor without an imatrix entry (the
   token embedding, read by get_rows) weighs every column 1.
3. Weights (`Option.damage` times a per-tensor factor, job.py): layer-output errors do not hurt the model
   equally; the factor puts every tensor's damage on the scale of the model's KL divergence.
4. Allocation (`allocate`): minimize the sum of damages subject to the sum of bytes <= budget. Each tensor's
   options are reduced to their lower convex hull (bytes up, damage down); the hull segments of all tensors,
   sorted by damage saved per byte (steepest first; ties by tensor index), are taken in order while they fit
   - the Lagrangian solution for every lambda at once, no bisection needed - and then the leftover bytes
   are filled greedily with the single upgrade (any option, hull or not) saving the most damage per byte
   that still fits, until none fits. Exact arithmetic on integers and a fixed order: deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from ..gguf.layout import pad
from ..quants.registry import FORMATS, dequantize

__all__ = ["Choice", "Option", "allocate", "candidates", "measure", "padded_bytes"]

SAMPLE_ELEMENTS = 1 << 18  # values of a tensor quantized per candidate to measure its damage


class Option(NamedTuple):
    """One way to store one tensor: its type, its bytes in the file (padded) and its damage."""

    qtype: str
    nbytes: int
    damage: float


class Choice(NamedTuple):
    name: str
    qtype: str
    nbytes: int
    damage: float


def candidates(shape: Sequence[int], *, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The registry's types ggml accepts for a tensor of ggml shape `shape` (rows of shape[0] values)."""
    skip = {e.upper() for e in exclude}
    return tuple(f.name for f in FORMATS.values() if shape[0] % f.block_size == 0 and f.name not in skip)


def padded_bytes(qtype: str, shape: Sequence[int]) -> int:
    """The tensor's bytes in a GGUF data section, padded to the alignment as the writer pads it."""
    n_rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return pad(FORMATS[qtype].row_bytes(int(shape[0])) * n_rows)


def sample_rows(n_rows: int, n_per_row: int, limit: int = SAMPLE_ELEMENTS) -> np.ndarray:
    """Evenly spaced row indices, at most `limit` values in all (every row of a small tensor)."""
    k = max(1, min(n_rows, limit // max(1, n_per_row)))
    return np.unique(np.linspace(0, n_rows - 1, k).round().astype(np.int64))


def output_error(err: np.ndarray, *, importance: np.ndarray | None, hessian: np.ndarray | None) -> float:
    """sum_rows e H e^T for err [rows, k] (H = diag(importance) without a hessian; all ones without both)."""
    e = err.astype(np.float64)
    if hessian is not None:
        return float(np.einsum("ij,ij->", e @ hessian, e))
    if importance is not None:
        return float(np.einsum("ij,ij,j->", e, e, importance.astype(np.float64)))
    return float(np.einsum("ij,ij->", e, e))


def measure(
    w: np.ndarray,
    shape: Sequence[int],
    types: Sequence[str],
    quantize: Callable[[np.ndarray, str], np.ndarray],
    *,
    importance: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
) -> list[Option]:
    """Each type's Option for the 2-D tensor w [rows, k] (float32; ggml shape `shape`, 3-D flattened to rows).

    quantize(rows, qtype) -> block bytes: the job's quantizer, fed the sampled rows. The damage of the
    sample is scaled by rows / sampled rows."""
    n_rows, k = w.shape
    idx = sample_rows(n_rows, k)
    x = np.ascontiguousarray(w[idx])
    scale = n_rows / len(idx)
    out = []
    for qtype in types:
        q = dequantize(quantize(x, qtype), qtype, x.shape)
        d = output_error(x - q, importance=importance, hessian=hessian) * scale
        out.append(Option(qtype, padded_bytes(qtype, shape), d))
    return out


def hull(options: Sequence[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, damage), bytes increasing, damage strictly decreasing:
    the options some lambda makes optimal."""
    order = sorted(range(len(options)), key=lambda i: (options[i].nbytes, options[i].damage, i))
    pts: list[int] = []
    for i in order:
        b, d = options[i].nbytes, options[i].damage
        if pts and d >= options[pts[-1]].damage:
            continue  # no cheaper damage for more bytes: dominated
        if pts and b == options[pts[-1]].nbytes:
            pts.pop()  # same bytes, less damage
        while len(pts) >= 2:
            (b1, d1), (b2, d2) = ((options[j].nbytes, options[j].damage) for j in pts[-2:])
            # drop pts[-1] if it lies on or above the segment pts[-2] -> i
            if (d2 - d1) * (b - b1) >= (d - d1) * (b2 - b1):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def allocate(names: Sequence[str], options: Sequence[Sequence[Option]], budget: int) -> list[Choice]:
    """The choice per tensor minimizing the summed damage with summed bytes <= budget (see module doc).
    Raises ValueError when even the cheapest options do not fit."""
    hulls = [hull(opts) for opts in options]
    pick = [h[0] for h in hulls]  # the cheapest option of each tensor
    used = sum(options[t][pick[t]].nbytes for t in range(len(options)))
    if used > budget:
        raise ValueError(f"the smallest possible tensors take {used} bytes, more than the budget {budget}")
    segments = []  # (-saving per byte, tensor, step along its hull)
    for t, h in enumerate(hulls):
        for s in range(1, len(h)):
            a, b = options[t][h[s - 1]], options[t][h[s]]
            segments.append(((a.damage - b.damage) / (b.nbytes - a.nbytes), t, s))
    segments.sort(key=lambda seg: (-seg[0], seg[1], seg[2]))
    blocked: set[int] = set()
    for _, t, s in segments:
        if t in blocked:
            continue
        a, b = options[t][hulls[t][s - 1]], options[t][hulls[t][s]]
        if used + b.nbytes - a.nbytes > budget:
            blocked.add(t)  # its later segments need this one first
            continue
        used += b.nbytes - a.nbytes
        pick[t] = hulls[t][s]
    while True:  # greedy fill of what is left: the best saving per byte among the upgrades that fit
        best = None
        for t, opts in enumerate(options):
            cur = opts[pick[t]]
            for j, o in enumerate(opts):
                extra = o.nbytes - cur.nbytes
                if extra <= 0 or o.damage >= cur.damage or used + extra > budget:
                    continue
                key = ((cur.damage - o.damage) / extra, -t, -j)
                if best is None or key > best[0]:
                    best = (key, t, j, extra)
        if best is None:
            break
        _, t, j, extra = best
        pick[t], used = j, used + extra
    return [
        Choice(n, options[t][pick[t]].qtype, options[t][pick[t]].nbytes, options[t][pick[t]].damage)
        for t, n in enumerate(names)
    ]
