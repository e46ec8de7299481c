"""Read llama.cpp importance matrices (imatrix) and turn them into the vectors llama-quantize uses.

Two formats, both written by llama-imatrix (tools/imatrix/imatrix.cpp) and read by llama-quantize
(common/imatrix-loader.cpp, tools/quantize/quantize.cpp):

GGUF (the default): KVs general.type = "imatrix", imatrix.datasets (array of strings),
  imatrix.chunk_count and imatrix.chunk_size (u32); per weight two F32 tensors, "<name>.in_sum2"
  [ne0, n_mat] (raw sums of squared activations) and "<name>.counts" [1, n_mat] (tokens seen, as floats).
  llama-quantize passes in_sum2[j*ne0 + i] / count[j] (float32 / float32, the count first rounded to an
  integer with C's lround), or 1.0 where the count is not positive. A file missing any of the three
  imatrix.* keys is refused.
Legacy .dat (little-endian): i32 n_entries; per entry i32 name length, the name, i32 ncall, i32 nval,
  f32[nval] (mean * ncall); then optionally i32 chunk count, i32 dataset length, the dataset name.
  llama-quantize passes value / (float)ncall, or the stored value itself when ncall <= 0.

Then --exclude-weights / --include-weights drop or keep entries whose name contains any given string
(not both), and every value must be finite. A tensor uses its entry only when the sizes agree (ne0, times
the number of experts of a 3-D tensor); a mismatch stops llama-quantize, except for token_embd, which
then just quantizes without it.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import GgufkitError, QuantizeError
from ..gguf.types import GGMLQuantizationType, GGUFValueType
from ..gguf.values import show_name

__all__ = ["Imatrix", "read_imatrix", "filter_entries", "load_for_quantize", "match_tensor"]

_KEY_DATASETS = "imatrix.datasets"
_KEY_CHUNK_COUNT = "imatrix.chunk_count"
_KEY_CHUNK_SIZE = "imatrix.chunk_size"
_INT64_MIN = -(2**63)


@dataclass
class Imatrix:
    """An importance matrix as llama-quantize loads it.

    entries: tensor name -> float32 vector, the values passed to the quantizer (already divided by the
    counts); datasets: the text files it was computed on; chunk_count: chunks processed (0 if unknown).
    sums, counts: the statistics as stored, for merging (ggufkit.calibrate): GGUF in_sum2 [n_mat, ne0] and
    counts [n_mat]; legacy .dat the stored values (mean * ncall) [1, nval] and [ncall].
    """

    path: str
    format: str  # "gguf" or "dat"
    entries: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def quantize_metadata(self, entries: Mapping[str, np.ndarray] | None = None) -> dict:
        """What llama-quantize records about this imatrix (values not yet truncated): file (the path as
        given), dataset (the first one, or None), entries_count (after filtering), chunks_count. The
        quantize.imatrix.* KVs made of it: ggufkit.quantize.job.imatrix_kvs."""
        entries = self.entries if entries is None else entries
        return {
            "file": self.path,
            "dataset": self.datasets[0] if self.datasets else None,
            "entries_count": len(entries),
            "chunks_count": self.chunk_count,
        }


def read_imatrix(path: str | os.PathLike, *, strict: bool = True) -> Imatrix:
    """Read an imatrix file in either format (GGUF if it starts with the GGUF magic, else legacy .dat).
    strict: refuse corrupt statistics (module doc); False reads whatever llama-quantize reads."""
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantizeError(f"cannot read imatrix {spath}: {e.strerror or e}") from None
    if magic == b"GGUF":
        return _read_gguf(spath, strict)
    return _read_legacy(spath, strict)


def _lround_to_float(c: float) -> np.float32:
    """(float) std::lround(c) for a float32 count; NaN, inf and out-of-range give LONG_MIN (x86-64)."""
    if not math.isfinite(c):
        return np.float32(_INT64_MIN)
    r = math.floor(abs(c) + 0.5) * (1 if c >= 0 else -1)  # exact for float32 inputs
    if not -(2**63) <= r < 2**63:
        r = _INT64_MIN
    return np.float32(r)


def _read_gguf(path: str, strict: bool) -> Imatrix:
    from ..gguf.reader import open_gguf

    try:
        model = open_gguf(path)
    except GgufkitError as e:
        raise QuantizeError(f"cannot read imatrix {path}: {e}") from None
    with model:
        if not model.tensors:
            raise QuantizeError(f"imatrix {path} has no data (no tensors)")
        missing = [k for k in (_KEY_DATASETS, _KEY_CHUNK_COUNT, _KEY_CHUNK_SIZE) if k not in model.kv]
        if missing:
            raise QuantizeError(
                f"imatrix {path} lacks the metadata llama-quantize requires: {', '.join(missing)}"
            )
        datasets = []
        kv = model.kv[_KEY_DATASETS]
        if kv.type == GGUFValueType.ARRAY and kv.sub_type == GGUFValueType.STRING:
            datasets = [str(s) for s in kv.value]
        chunk_count = _int_kv(model, _KEY_CHUNK_COUNT, path)
        chunk_size = _int_kv(model, _KEY_CHUNK_SIZE, path)

        pairs: dict[str, list] = {}
        for t in model.tensors:
            for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
        entries, all_sums, all_counts = {}, {}, {}
        for name in sorted(pairs):
            sums_t, counts_t = pairs[name]
            if sums_t is None or counts_t is None:
                missing = "no .counts" if counts_t is None else "no .in_sum2"
                raise QuantizeError(f"imatrix {path}: {show_name(name)} has {missing} tensor")
            for t in (sums_t, counts_t):
                if t.ggml_type != GGMLQuantizationType.F32:
                    raise QuantizeError(f"imatrix {path}: {t.name} is {t.ggml_type.name}, must be F32")
            sums = np.array(sums_t.data().view("<f4"), dtype=np.float32)
            counts = np.array(counts_t.data().view("<f4"), dtype=np.float32)
            if strict:
                _check_gguf_entry(path, name, sums_t.shape, counts_t.shape, sums, counts)
                all_sums[name] = sums.reshape(counts.size, -1)
                all_counts[name] = counts
            entries[name] = _normalize(sums, counts)
    return Imatrix(path, "gguf", entries, datasets, chunk_count, chunk_size, all_sums, all_counts)


def _check_gguf_entry(path, name, sums_shape, counts_shape, sums, counts) -> None:
    """What llama-imatrix writes: in_sum2 [ne0, n_mat] and counts [1, n_mat] (F32), counts whole numbers
    >= 0, not all zero; sums finite, >= 0, and zero for a matrix (expert) with a zero count."""
    n_mat = counts.size
    shown = show_name(name)
    if len(counts_shape) > 2 or counts_shape[0] != 1 or len(sums_shape) > 2 or sums.size == 0:
        raise QuantizeError(
            f"imatrix {path}: {shown} has in_sum2 {list(sums_shape)} and counts {list(counts_shape)}, "
            "expected [ne0, n_mat] and [1, n_mat]"
        )
    if (sums_shape[1] if len(sums_shape) > 1 else 1) != n_mat:
        raise QuantizeError(
            f"imatrix {path}: {shown} has {n_mat} counts for {list(sums_shape)} sums (lengths disagree)"
        )
    bad = ~np.isfinite(counts) | (counts < 0) | (counts != np.floor(counts))
    if bad.any():
        i = int(np.argmax(bad))
        raise QuantizeError(f"imatrix {path}: {show_name(name)} has count {counts[i]} at index {i} (corrupt)")
    if not counts.any():
        raise QuantizeError(f"imatrix {path}: {show_name(name)} has no data (all {n_mat} counts are zero)")
    _check_sums(path, name, sums)
    per_mat = sums.reshape(n_mat, -1)
    empty = (counts == 0) & per_mat.any(axis=1)
    if empty.any():
        i = int(np.argmax(empty))
        raise QuantizeError(
            f"imatrix {path}: {show_name(name)} has sums for matrix {i} whose count is zero (corrupt)"
        )


def _check_sums(path, name, sums: np.ndarray) -> None:
    bad = ~np.isfinite(sums) | (sums < 0)
    if bad.any():
        i = int(np.argmax(bad))
        what = "negative" if np.isfinite(sums[i]) else "non-finite"
        raise QuantizeError(
            f"imatrix {path}: {show_name(name)} has a {what} sum of squares {sums[i]} at index {i}"
        )


def _int_kv(model, key: str, path: str) -> int:
    value = model.kv[key].value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QuantizeError(f"imatrix {path}: {key} must be an integer, got {value!r}")
    return int(value)


def _normalize(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """in_sum2 / count per matrix (expert), in float32; a count that is not positive gives 1.0."""
    out = np.zeros(sums.size, dtype=np.float32)  # values past n_mat * ne0 (malformed file) stay 0
    if counts.size == 0:
        return out
    ne0 = sums.size // counts.size
    for j, c in enumerate(counts.tolist()):
        count = _lround_to_float(c)
        part = slice(j * ne0, (j + 1) * ne0)
        out[part] = sums[part] / count if count > 0 else np.float32(1.0)
    return out


def _read_legacy(path: str, strict: bool) -> Imatrix:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise QuantizeError(f"cannot read imatrix {path}: {e.strerror or e}") from None
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise QuantizeError(
                f"imatrix {path}: truncated or not an imatrix file (reading {what} at byte {pos})"
            )
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count") if len(data) >= 4 else 0
    if n_entries < 1:
        raise QuantizeError(f"imatrix {path}: no data (not a GGUF imatrix, and no legacy entries)")
    entries: dict[str, np.ndarray] = {}
    all_sums, all_counts = {}, {}
    for i in range(n_entries):
        raw = take(i32(f"entry {i + 1} name length"), f"entry {i + 1} name")
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        shown = show_name(name)
        ncall = i32(f"entry {shown} call count")
        nval = i32(f"entry {shown} value count")
        if nval < 1:
            raise QuantizeError(f"imatrix {path}: entry {shown} has {nval} values")
        values = np.frombuffer(take(4 * nval, f"entry {shown} values"), dtype="<f4").astype(np.float32)
        if strict:
            if not name or name in entries:
                raise QuantizeError(
                    f"imatrix {path}: entry {i + 1} has {'an empty' if not name else 'a repeated'} "
                    f"name {shown}"
                )
            if ncall < 1:
                raise QuantizeError(f"imatrix {path}: entry {shown} has call count {ncall} (corrupt)")
            _check_sums(path, name, values)
            all_sums[name] = values.reshape(1, -1)
            all_counts[name] = np.array([ncall], np.float32)
        # value / ncall with ncall converted to float (C: float / int64_t)
        with np.errstate(all="ignore"):  # lenient reading: non-finite values are refused later
            entries[name] = values / np.float32(ncall) if ncall > 0 else values
    chunk_count, datasets = 0, []
    if pos < len(data):  # the optional tail: chunk count and dataset name
        if pos + 4 <= len(data):
            chunk_count = i32("the chunk count")
            if pos + 4 <= len(data):
                n = i32("the dataset name length")
                if 0 < n <= len(data) - pos:
                    datasets.append(
                        take(n, "the dataset name").split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    )
                elif strict and n != 0:
                    raise QuantizeError(
                        f"imatrix {path}: dataset name length {n} at byte {pos - 4}, "
                        f"{len(data) - pos} bytes left (corrupt)"
                    )
        if strict and chunk_count < 0:
            raise QuantizeError(f"imatrix {path}: chunk count {chunk_count} (corrupt)")
        if strict and pos != len(data):
            raise QuantizeError(f"imatrix {path}: {len(data) - pos} unexpected bytes at byte {pos} (corrupt)")
    return Imatrix(path, "dat", entries, datasets, chunk_count, 0, all_sums, all_counts)


def filter_entries(
    entries: Mapping[str, np.ndarray], *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """--exclude-weights drops entries whose name contains any of the strings; --include-weights keeps only
    those that contain one. They cannot be combined."""
    include, exclude = list(include), list(exclude)
    if include and exclude:
        raise QuantizeError("--include-weights and --exclude-weights cannot be used together")
    out = {k: v for k, v in entries.items() if not any(s in k for s in exclude)}
    if include:
        out = {k: v for k, v in out.items() if any(s in k for s in include)}
    return out


def _check_finite(entries: Mapping[str, np.ndarray], path: str) -> None:
    for name, v in entries.items():
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.argmax(bad))
            raise QuantizeError(
                f"imatrix {path}: entry {show_name(name)} has a non-finite value {v[i]} at index {i}"
            )


def load_for_quantize(
    path: str | os.PathLike,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    strict: bool = True,
) -> tuple[dict[str, np.ndarray], dict]:
    """(vectors by tensor name, metadata) as llama-quantize prepares them for quantizing: read, filtered,
    checked finite. metadata: file, dataset, entries_count, chunks_count (see Imatrix.quantize_metadata).
    If filtering leaves nothing, llama-quantize runs as if no imatrix were given: check `vectors` first."""
    imx = read_imatrix(path, strict=strict)
    imx.path = os.fspath(path)
    vectors = filter_entries(imx.entries, include=tuple(include), exclude=tuple(exclude))
    _check_finite(vectors, imx.path)
    return vectors, imx.quantize_metadata(vectors)


def match_tensor(
    entries: Mapping[str, np.ndarray] | None, name: str, shape: Sequence[int]
) -> np.ndarray | None:
    """The imatrix vector to pass when quantizing tensor `name` of ggml shape `shape`, or None.

    Its size must be ne0 times the number of experts (ne2); otherwise the imatrix was made for another
    model and QuantizeError is raised, except for token_embd, which then goes without (as in llama.cpp).
    """
    if not entries:
        return None
    vector = entries.get(name)
    if vector is None:
        return None
    want = int(shape[0]) * (int(shape[2]) if len(shape) > 2 else 1)
    if vector.size == want:
        return vector
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return None
    raise QuantizeError(
        f"imatrix made for another model? its entry for {name} has {vector.size} values, "
        f"the tensor needs {want} (shape {list(shape)})"
    )
