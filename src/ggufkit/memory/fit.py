"""What fits where: estimates for every level x context, as a table marked against a RAM budget, and the
budget itself (a size such as "16G", or the machine's available memory)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import MemoryEstimateError
from .estimator import Estimate, estimate
from .model import ModelInfo

GIB = 1 << 30
DEFAULT_LEVELS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
DEFAULT_CONTEXTS = (2048, 8192, 32768)


@dataclass
class FitTable:
    model: str
    levels: list[str]
    contexts: list[int]
    cells: list[list[Estimate]]  # [level][context]
    ram_bytes: int | None

    def fits(self, est: Estimate) -> bool | None:
        return None if self.ram_bytes is None else est.needed_bytes <= self.ram_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ram_bytes": self.ram_bytes,
            "levels": self.levels,
            "contexts": self.contexts,
            "rows": [
                {"level": lv, "cells": [{**e.to_dict(), "fits": self.fits(e)} for e in row]}
                for lv, row in zip(self.levels, self.cells)
            ],
        }


def fit_table(model: ModelInfo, *, levels, contexts, ram_bytes: int | None = None, **options) -> FitTable:
    """Estimates for every level x context. A level may be None: a GGUF as it is."""
    cells = [[estimate(model, n_ctx=c, level=lv, **options) for c in contexts] for lv in levels]
    names = [f"{row[0].level} file" if lv is None else row[0].level for lv, row in zip(levels, cells)]
    return FitTable(model.name, names, list(contexts), cells, ram_bytes)


def format_table(table: FitTable) -> str:
    """The what-fits-where table as text: rows = levels, columns = contexts, cells = GiB, marked against
    the budget (fits / does not) when there is one."""
    head = "what fits where (GiB"
    if table.ram_bytes is not None:
        head += f"; budget {table.ram_bytes / GIB:.2f} GiB: + fits, x does not"
    lines = [head + ")", f"{'level':<12}" + "".join(f"{'n_ctx ' + str(c):>14}" for c in table.contexts)]
    for name, row in zip(table.levels, table.cells):
        cells = []
        for e in row:
            fits = table.fits(e)
            mark = "" if fits is None else (" +" if fits else " x")
            cells.append(f"{e.needed_bytes / GIB:.2f}{mark}".rjust(14))
        lines.append(f"{name:<12}" + "".join(cells))
    return "\n".join(lines)


def default_contexts(model: ModelInfo) -> list[int]:
    """The table's columns when none are asked: 2048, 8192, 32768 up to the trained context (and it)."""
    train = model.n_ctx_train
    if not train:
        return list(DEFAULT_CONTEXTS)
    cols = [c for c in DEFAULT_CONTEXTS if c < train]
    return cols + [train] if train <= 131072 else cols + [131072]


_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'16G', '16GiB', '512M', '8GB' -> bytes. K/M/G/T and KiB.. are powers of 1024; KB/MB/GB/TB are
    powers of 1000; a bare number is bytes."""
    m = _BYTES_RE.match(str(text))
    if not m or (m[3].lower() == "i"):
        raise MemoryEstimateError(
            f"unknown memory size {text!r}: expected a number and K, M, G or T, such as 16G"
        )
    unit = m[2].upper()
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if m[3].upper() == "B" and unit else 1024
    return int(float(m[1]) * base**power)


def parse_budget(text: str) -> int:
    """A RAM budget as the CLI takes it: a size for parse_bytes, or "auto" for available_memory()."""
    return available_memory() if str(text).strip().lower() == "auto" else parse_bytes(text)


def available_memory() -> int:
    """The memory the OS says is available to a new process (Linux MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise MemoryEstimateError("cannot read the machine's available memory; pass --ram SIZE") from None
