"""The base model's records: what the statistics need of the base, per scored position, cached on disk.

We reproduce the uint16 quantization of the base log-probs, so the KLD, base PPL and
same-top computed from the same logits are llama-perplexity's to the digit. But instead of the full
n_vocab codes per position (llama.cpp's multi-gigabyte file) the cache keeps only what the statistics
read: per position scale, min_log_prob, the true token's code, the base argmax, and the (index, code)
pairs whose p̂ > -16 (the only terms of the KLD sum); a few MB for a typical run. It is keyed by the
base file's sha256, the token ids, ctx, chunks and the engine, so a ladder of levels runs the base once.

The cache file is a compressed npz written atomically (cache.atomic_output); its name carries
CACHE_VERSION, bumped whenever the stored records or the logits they come from change.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cache import atomic_output, cache_dir, sha256_file
from .stats import softmax_parts

CACHE_VERSION = 5  # 5: the base NLL is no longer stored; 4: rms_norm and rope rounded as ggml's
KLD_CUTOFF = np.float32(-16.0)
_F = np.float32


@dataclass
class BaseRecords:
    """What the statistics need of the base model, per scored position (see the module doc)."""

    scale: np.ndarray  # float32 [N]
    min_log_prob: np.ndarray  # float32 [N]
    code_tok: np.ndarray  # uint16 [N]: code of the true next token
    imax: np.ndarray  # int32 [N]: first argmax of the codes
    offsets: np.ndarray  # int64 [N+1]: CSR rows into idx/code
    idx: np.ndarray  # int32: token ids with p̂ > -16
    code: np.ndarray  # uint16: their codes

    @staticmethod
    def concat(parts: list[BaseRecords]) -> BaseRecords:
        offs, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return BaseRecords(
            cat("scale"),
            cat("min_log_prob"),
            cat("code_tok"),
            cat("imax"),
            np.concatenate(offs),
            cat("idx"),
            cat("code"),
        )

    def rows(self, start: int, stop: int) -> BaseRecords:
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return BaseRecords(
            self.scale[start:stop],
            self.min_log_prob[start:stop],
            self.code_tok[start:stop],
            self.imax[start:stop],
            self.offsets[start : stop + 1] - a,
            self.idx[a:b],
            self.code[a:b],
        )


def base_records(logits: np.ndarray, targets: np.ndarray) -> BaseRecords:
    """Reduce base logits [n, V] (predicting targets [n]) to BaseRecords, quantizing like llama.cpp's
    --kl-divergence-base writer (log_softmax with uint16 output)."""
    logits = np.ascontiguousarray(logits, dtype=_F)
    n, V = logits.shape
    rows = np.arange(n)
    mx, _, lse, _ = softmax_parts(logits)
    mn = np.maximum(logits.min(axis=1), mx - _F(16))
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / _F(65535)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, _F(1) / scale, _F(0)).astype(_F)
    codes = np.rint(inv[:, None] * (logits - mn[:, None]))
    codes = np.where(logits > mn[:, None], codes, 0).astype(np.uint16)
    codes[scale == 0] = 0
    plog = scale[:, None] * codes.astype(_F) + min_log_prob[:, None]
    keep = plog > KLD_CUTOFF
    counts = keep.sum(axis=1)
    r, c = np.nonzero(keep)
    return BaseRecords(
        scale=scale.astype(_F),
        min_log_prob=min_log_prob.astype(_F),
        code_tok=codes[rows, targets],
        imax=codes.argmax(axis=1).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        idx=c.astype(np.int32),
        code=codes[r, c],
    )


def cache_path(base_path, chunks: np.ndarray, engine: str) -> Path:
    h = hashlib.sha256()
    h.update(f"ggufkit-eval-base-v{CACHE_VERSION}|{engine}|{chunks.shape}|".encode())
    h.update(sha256_file(base_path).encode())
    h.update(np.ascontiguousarray(chunks, dtype=np.int32).tobytes())
    return cache_dir("eval") / f"base-{h.hexdigest()[:32]}.npz"


def load_base(path: Path) -> BaseRecords | None:
    try:
        with np.load(path) as z:
            fields = {k: z[k] for k in BaseRecords.__dataclass_fields__ if k != "idx"}
            fields["idx"] = np.cumsum(z["idx_delta"], dtype=np.int64).astype(np.int32)
            return BaseRecords(**fields)
    except (OSError, KeyError, ValueError):
        return None


def save_base(path: Path, rec: BaseRecords) -> None:
    """Compressed npz; the token ids of the kept entries are stored as differences (small numbers)."""
    arrays = asdict(rec)
    arrays["idx_delta"] = np.diff(arrays.pop("idx"), prepend=0).astype(np.int32)
    with atomic_output(path) as f:
        np.savez_compressed(f, **arrays)
