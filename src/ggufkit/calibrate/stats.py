"""The statistics llama-imatrix collects, and the two files it writes them to.

What is collected (tools/imatrix/imatrix.cpp, IMatrixCollector::collect_imatrix): for every matrix
multiplication whose weight is named blk.* (and output.weight with --process-output), the input rows x
(ggml's src1, float32, before any rounding to the weight's vec_dot type):
    sums[m, j]  += x[r, j]^2     over the rows r multiplied by matrix m
    counts[m]   += number of those rows
m is 0 for a 2-D weight; for a 3-D expert weight (MUL_MAT_ID) m is the expert, and only the rows routed to
that expert count (a token that uses two experts adds one row to each). llama-imatrix accumulates in
float32, row after row; here the float32 squares are summed in float64 (the stored float32 sums then differ
from llama-imatrix's by its rounding, ~1e-6 relative, not by ours).

GGUF (the default): general.type = "imatrix", imatrix.datasets (strings), imatrix.chunk_count and
imatrix.chunk_size (u32), then per weight, names sorted: "<name>.in_sum2" F32 [ne0, n_mat] and
"<name>.counts" F32 [1, n_mat] (save_imatrix). chunk_count is the largest count divided by the chunk size
(llama-imatrix's m_last_chunk), chunk_size the context.
Legacy .dat (save_imatrix_legacy): i32 n_entries; per entry with any data, names sorted: i32 name length,
the name, i32 ncall = ceil(max count / chunk size), i32 nval, f32[nval] = sum / count * ncall (1 * ncall
where the count is 0); then i32 chunk count, i32 length and the dataset name (the text, else the last
dataset of the merged files).

Merging (--in-file, load_imatrix): a GGUF file adds its sums and counts (a single count is broadcast over
the experts); a legacy file adds value * chunk_size and ncall * chunk_size; datasets are appended in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..cache import atomic_output
from ..engine.fused import blas_all, column_squares
from ..errors import CalibrationError

__all__ = ["ImatrixStats", "observed"]


def observed(name: str, *, process_output: bool) -> bool:
    """llama-imatrix's choice: blk.* weights, and output.weight with --process-output (a tied output is
    token_embd.weight, which is never collected)."""
    return name.startswith("blk.") or (process_output and name == "output.weight")


@dataclass
class ImatrixStats:
    """Sums of squared inputs and row counts per weight; an engine observer (LlamaModel(observer=...)).

    sums[name]: [n_mat, ne0] float64; counts[name]: [n_mat] int64. With hessian=True also hessians[name]:
    [n_mat, ne0, ne0] float64, the input covariance X^T X of each matrix (calibrate.hessian)."""

    chunk_size: int
    process_output: bool = False
    hessian: bool = False
    datasets: list[str] = field(default_factory=list)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    _last: tuple = field(default=(None, None, None), repr=False)  # (x, x^2 column sums, X^T X)

    def empty_like(self) -> ImatrixStats:
        return ImatrixStats(self.chunk_size, process_output=self.process_output, hessian=self.hessian)

    # -- collecting ------------------------------------------------------------------------------------
    def __call__(self, name: str, x: np.ndarray, *, expert: int = 0, n_expert: int = 1) -> None:
        if not observed(name, process_output=self.process_output):
            return
        ne0 = x.shape[-1]
        if name not in self.sums:
            self.sums[name] = np.zeros((n_expert, ne0), np.float64)
            self.counts[name] = np.zeros(n_expert, np.int64)
            if self.hessian:
                self.hessians[name] = np.zeros((n_expert, ne0, ne0), np.float64)
        sums = self._shaped(name, n_expert, ne0, what="collected")
        if self._last[0] is not x:  # q, k and v share their input: square it once
            rows = x.reshape(-1, ne0)
            sq = column_squares(rows)  # one pass, on the engine's threads
            xtx = None
            if self.hessian:
                x64 = rows.astype(np.float64)
                with blas_all():  # inside the forward pass's single_blas: this product is large
                    xtx = x64.T @ x64
            self._last = (x, sq, xtx)  # holds x, so its id cannot be reused while cached
        _, sq, xtx = self._last
        sums[expert] += sq
        self.counts[name][expert] += x.size // ne0
        if self.hessian:
            if name not in self.hessians:
                self.hessians[name] = np.zeros((n_expert, ne0, ne0), np.float64)
            self.hessians[name][expert] += xtx

    def forget_last(self) -> None:
        self._last = (None, None, None)

    # -- combining -------------------------------------------------------------------------------------
    def add(self, other: ImatrixStats) -> None:
        """Add another collector's statistics (a finished pass) into these."""
        for name, s in other.sums.items():
            self._add(name, s, other.counts[name], what="collected")
            if self.hessian and name in other.hessians:
                if name in self.hessians:
                    self.hessians[name] += other.hessians[name]
                else:
                    self.hessians[name] = other.hessians[name].copy()

    def _add(self, name: str, sums: np.ndarray, counts: np.ndarray, *, what: str) -> None:
        if name not in self.sums:
            self.sums[name] = np.array(sums, np.float64)
            self.counts[name] = np.array(counts, np.int64)
            return
        n_mat, ne0 = sums.shape
        if self.sums[name].shape[0] != 1 and n_mat == 1 and sums.size == self.sums[name].size:
            n_mat, ne0 = self.sums[name].shape  # a single count (legacy) over every expert's values
            sums, counts = sums.reshape(n_mat, ne0), np.repeat(counts, n_mat)
        mine = self._shaped(name, n_mat, ne0, what=what)
        mine += sums
        self.counts[name] += counts

    def _shaped(self, name: str, n_mat: int, ne0: int, *, what: str) -> np.ndarray:
        """The sums of `name` as [n_mat, ne0]. An entry with a single count over n_mat * ne0 values (a legacy
        file's) takes the experts' shape, its count broadcast, as llama-imatrix does."""
        mine = self.sums[name]
        if mine.shape == (n_mat, ne0):
            return mine
        if mine.shape[0] == 1 and mine.size == n_mat * ne0:
            self.counts[name] = np.repeat(self.counts[name], n_mat)
            self.sums[name] = mine = mine.reshape(n_mat, ne0).copy()
            return mine
        raise CalibrationError(
            f"{name}: {what} statistics of {n_mat} x {ne0} do not fit the {mine.shape[0]} x {mine.shape[1]} "
            "already there (an imatrix of another model?)"
        )

    def load(self, path: str | os.PathLike) -> None:
        """Merge an imatrix file (GGUF or legacy .dat) into these statistics, as llama-imatrix --in-file."""
        from ..quantize.imatrix import read_imatrix

        imx = read_imatrix(path)  # strict: a corrupt file is refused here
        for name in sorted(imx.sums):
            sums, counts = imx.sums[name].astype(np.float64), imx.counts[name]
            if imx.format == "dat":  # mean * ncall, ncall: back to raw sums of chunk_size rows per call
                sums = sums * self.chunk_size
                counts = counts.astype(np.int64) * self.chunk_size
            else:
                counts = counts.astype(np.int64)
            self._add(name, sums, counts, what=f"{os.fspath(path)}'s")
        self.datasets += imx.datasets

    @property
    def chunk_count(self) -> int:
        """llama-imatrix's m_last_chunk: the largest count in whole chunks."""
        most = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        return most // self.chunk_size

    # -- writing ---------------------------------------------------------------------------------------
    def write_gguf(self, path: str | os.PathLike) -> None:
        """The GGUF imatrix llama-imatrix writes (module doc), atomically."""
        from ..gguf.types import GGMLQuantizationType, GGUFValueType
        from ..gguf.writer import GGUFStreamWriter, TensorEntry, kv_bytes

        f32 = GGMLQuantizationType.F32
        kvs = [
            kv_bytes("general.type", GGUFValueType.STRING, "imatrix"),
            kv_bytes("imatrix.datasets", GGUFValueType.ARRAY, self.datasets, sub_type=GGUFValueType.STRING),
            kv_bytes("imatrix.chunk_count", GGUFValueType.UINT32, self.chunk_count),
            kv_bytes("imatrix.chunk_size", GGUFValueType.UINT32, self.chunk_size),
        ]
        names = sorted(self.sums)
        entries = []
        for name in names:
            n_mat, ne0 = self.sums[name].shape
            entries += [
                TensorEntry(f"{name}.in_sum2", (ne0, n_mat), f32),
                TensorEntry(f"{name}.counts", (1, n_mat), f32),
            ]
        with GGUFStreamWriter(path, kvs, entries) as w:
            for name in names:
                for suffix, data in (("in_sum2", self.sums[name]), ("counts", self.counts[name])):
                    w.begin_tensor(f"{name}.{suffix}")
                    w.write(np.ascontiguousarray(data, dtype="<f4"))
                    w.end_tensor()
            w.commit()

    def write_dat(self, path: str | os.PathLike, *, dataset: str | None = None) -> None:
        """The legacy .dat llama-imatrix writes (module doc), atomically. dataset: the text's name (default:
        the last merged dataset)."""
        if dataset is None:
            dataset = self.datasets[-1] if self.datasets else ""
        i32 = np.dtype("<i4")
        parts = []
        names = [n for n in sorted(self.sums) if self.counts[n].any()]  # entries with no data are left out
        parts.append(np.array(len(names), i32).tobytes())
        for name in names:
            counts, sums = self.counts[name], self.sums[name]
            raw = name.encode("utf-8", "surrogateescape")
            ncall = (int(counts.max()) + self.chunk_size - 1) // self.chunk_size
            count = counts.astype(np.float32)[:, None]
            value = sums.astype(np.float32)
            mean = np.where(count == 0, np.float32(1), value / np.where(count == 0, np.float32(1), count))
            values = (mean * np.float32(ncall)).astype("<f4").reshape(-1)
            parts += [np.array([len(raw)], i32).tobytes(), raw, np.array([ncall, values.size], i32).tobytes()]
            parts.append(values.tobytes())
        ds = dataset.encode("utf-8", "surrogateescape")
        parts.append(np.array([self.chunk_count, len(ds)], i32).tobytes() + ds)
        with atomic_output(path) as f:
            for p in parts:
                f.write(p)
