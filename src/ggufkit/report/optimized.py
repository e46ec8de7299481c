"""The report's calibrated rows (`ggufkit report --optimize`): llama.cpp's imatrix quant and ggufkit's
optimized file beside each level that uses an importance matrix.

A level uses one when its block type has an importance-weighted algorithm in llama.cpp (the registry's
`uses_importance`: every level but Q8_0 and the float types). For each, two more files, measured exactly as
a level is (measure.measure_file):

    LEVEL imatrix  llama-quantize --imatrix's file: ggufkit's quantize_file with the importance matrix (the
                   same bytes, tests/test_quantize.py), the calibrated quant llama.cpp users make;
    LEVEL opt      optimize.optimize_file at the same level: each tensor's standard type chosen for the
                   least calibrated damage, no larger than llama-quantize's LEVEL file (with or without the
                   imatrix).

Both are made from one importance matrix: the file given, or compute_imatrix by the built-in engine over
the calibration text (evaluation.calibration_text: the half of the pydoc topics an evaluation of the default
text never reads), `calib_chunks` chunks of CALIB_CTX tokens, as llama-imatrix would make it.

Honest bases. A base that is a quantized file dequantized (the default SmolLM2 ships as Q4_1) sits on that
format's grid, and a type that contains the grid (every Q4_1 block is a Q5_1 block) re-encodes it with no
error: the optimizer would pick it and show a gain no full-precision model gives. So for such a base the
types that re-encode the base's weights exactly (`on_grid`: measured on rows of the first block, with the
optimizer's own kernels and importance vectors) are left out of the opt files, and a note says so.

Cache (under work/optimized/, beside the level files): the computed imatrix, keyed by the base, the text,
the chunks and OPT_CODE; each imatrix file, keyed like a level plus the imatrix's sha256; each opt file,
keyed by the base, the level, the imatrix's sha256, the excluded types, the weighting and OPT_CODE (every
module the optimize job imports: tests/test_report_optimize.py checks it), so a change to any of them makes
the files again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..cache import sha256_file
from ..gguf.reader import open_gguf
from .measure import _QUANT_CODE, CACHE_VERSION, FLOAT_TYPES, ReportError
from .records import code_fingerprint, read_json, record_key, tensor_sha256, write_json

CALIB_CTX = 512  # tokens per calibration chunk, llama-imatrix's default
DEFAULT_CALIB_CHUNKS = 16  # what docs/benchmarks.md's optimize runs calibrated on
GRID_ROWS = 16  # rows of each weight of the first block the on-grid check quantizes
GRID_SHARE = 0.5  # a type re-encoding at least this share of those weights exactly is on the base's grid
GRID_RUN = 32  # values per run whose smallest gap bounds the off-grid move (every block size is a multiple)
VARIANTS = ("imatrix", "opt")  # the rows added after a level, in this order: "Q4_K_M imatrix", "Q4_K_M opt"
# the sources that decide an optimized file's bytes: the optimize job and everything it imports
OPT_CODE = ("optimize", "calibrate", "engine", "evaluation", *_QUANT_CODE)


def calibrated_levels(levels) -> list[str]:
    """The levels whose block type has an importance-weighted algorithm (not Q8_0 nor the float types)."""
    from ..quantize.levels import level as level_of
    from ..quants.registry import FORMATS

    return [lv for lv in levels if FORMATS[level_of(lv).default_type.name].uses_importance]


def _meta_ok(meta, key, path: Path, size_field: str) -> bool:
    return bool(
        meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get(size_field)
    )


def importance_matrix(base: dict, work: Path, progress, *, imatrix=None, chunks: int, threads=None) -> dict:
    """The importance matrix the calibrated rows use: `imatrix` as given, else computed once by the built-in
    engine over the calibration text and cached."""
    from ..quantize.imatrix import load_for_quantize

    if imatrix is not None:
        path = Path(imatrix)
        vectors, meta = load_for_quantize(path)  # a file llama-quantize would refuse fails here, first
        if not vectors:
            raise ReportError(f"{path}: the imatrix holds no entries")
        return {
            "path": str(path),
            "sha256": sha256_file(path),
            "computed": False,
            "chunks": meta.get("chunks_count"),
        }
    from ..calibrate import compute_imatrix
    from ..evaluation import CALIBRATION_NAME, calibration_text

    if chunks < 1:
        raise ReportError(f"calib_chunks must be at least 1, got {chunks}")
    folder = work / "optimized"
    folder.mkdir(exist_ok=True)
    key = {
        "base_sha256": base["sha256"],
        "text_sha256": hashlib.sha256(calibration_text().encode()).hexdigest(),
        "ctx": CALIB_CTX,
        "chunks": chunks,
        "code": code_fingerprint(OPT_CODE),
        "v": CACHE_VERSION,
    }
    path = folder / f"imatrix-{record_key(key)}.gguf"
    meta_path = path.with_suffix(".json")
    meta = read_json(meta_path)
    if not _meta_ok(meta, key, path, "size"):
        res = compute_imatrix(
            base["path"], output=path, ctx=CALIB_CTX, chunks=chunks, threads=threads, save_every=0,
            progress=lambda d, n: progress(f"calibrating, chunk {d}/{n}", d / max(n, 1)),
        )  # fmt: skip
        meta = {
            "key": key,
            "path": str(path),
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
            "computed": True,
            "text": CALIBRATION_NAME,
            "chunks": res.chunk_count,
            "ctx": CALIB_CTX,
            "seconds": res.seconds,
        }
        write_json(meta_path, meta)
    return {k: v for k, v in meta.items() if k != "key"}


def _off_grid(w: np.ndarray, rng) -> np.ndarray:
    """w moved off its grid: each value by a seeded uniform amount within half the smallest gap between the
    distinct values of its run of GRID_RUN (below the step of any block format's grid it sits on)."""
    runs = np.sort(w.reshape(-1, GRID_RUN), axis=1)
    gaps = np.diff(runs, axis=1)
    gaps[gaps <= 0] = np.inf
    step = gaps.min(axis=1)
    step[~np.isfinite(step)] = 0.0
    noise = rng.uniform(-0.5, 0.5, size=(step.size, GRID_RUN)) * step[:, None]
    return (w.reshape(-1, GRID_RUN) + noise.astype(np.float32)).reshape(w.shape)


def on_grid(base: dict, imatrix_path) -> dict[str, dict[str, float]]:
    """For a base dequantized from a quantized file, per quantized type that fits them, on GRID_ROWS rows of
    every 2-D weight of the first block (quantized by the optimizer's kernels with its importance vectors):
    `exact`, the share of the weights it re-encodes bit for bit, and `error_ratio`, its squared error on
    them over its squared error on the same weights moved off their grid (_off_grid): near 0, the type
    re-finds the grid; near 1, the grid does not help it."""
    from ..optimize.allocate import candidates
    from ..quantize.imatrix import load_for_quantize
    from ..quants import registry

    vectors, _ = load_for_quantize(imatrix_path)
    rng = np.random.default_rng(0)
    sums: dict[str, np.ndarray] = {}  # type -> [exact, total, error on, error off]
    with open_gguf(base["path"]) as g:
        for t in g.tensors:
            if len(t.shape) != 2 or t.shape[1] < 2 or not t.name.startswith("blk.0."):
                continue
            rows = min(GRID_ROWS, t.n_elements // t.shape[0])
            data = np.asarray(t.data()).reshape(t.n_elements // t.shape[0], -1)[:rows]
            w = registry.dequantize(np.ascontiguousarray(data), int(t.ggml_type), (rows, t.shape[0]))
            off = _off_grid(w, rng)
            v = vectors.get(t.name)
            v = None if v is None or v.size != t.shape[0] else np.ascontiguousarray(v, dtype=np.float32)
            for q in candidates(t.shape, exclude=FLOAT_TYPES):
                back, back_off = (
                    registry.dequantize(registry.quantize(x, q, importance=v), q, w.shape) for x in (w, off)
                )
                sums[q] = sums.get(q, np.zeros(4)) + (
                    np.count_nonzero(back == w),
                    w.size,
                    np.square(back - w, dtype=np.float64).sum(),
                    np.square(back_off - off, dtype=np.float64).sum(),
                )
    return {
        q: {"exact": float(e / n), "error_ratio": float(on / off) if off > 0 else 1.0}
        for q, (e, n, on, off) in sorted(sums.items())
    }


def opt_level(
    base: dict, level: str, imx: dict, work: Path, progress, *, exclude, weighting: str, threads=None
) -> dict:
    """LEVEL opt: optimize_file's file of the base within LEVEL's size, made once per (base, level, imatrix,
    excluded types, weighting, OPT_CODE)."""
    from ..optimize.job import optimize_file

    folder = work / "optimized"
    folder.mkdir(exist_ok=True)
    path = folder / f"{level}-opt.gguf"
    meta_path = folder / f"{level}-opt.json"
    key = {
        "base_sha256": base["sha256"],
        "level": level,
        "imatrix_sha256": imx["sha256"],
        "exclude": sorted(exclude),
        "weighting": weighting,
        "code": code_fingerprint(OPT_CODE),
        "v": CACHE_VERSION,
    }
    meta = read_json(meta_path)
    if _meta_ok(meta, key, path, "size_bytes"):
        return meta | {"reused": True}

    def cb(phase, i, n):
        progress(f"optimizing: {phase} {i}/{n}", i / max(n, 1))

    s = optimize_file(
        base["path"], path, level, imatrix=imx["path"], exclude_types=sorted(exclude), weighting=weighting,
        threads=threads, progress=cb,
    )  # fmt: skip
    with open_gguf(path) as g:
        tensor_bytes = sum(t.nbytes for t in g.tensors)
    types: dict[str, int] = {}
    for q in s.types.values():
        types[q] = types.get(q, 0) + 1
    meta = {
        "key": key,
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "n_elements": s.n_elements,
        "bpw": 8.0 * tensor_bytes / s.n_elements,
        "n_tensors": len(s.types),
        "n_quantized": sum(n for q, n in types.items() if q not in FLOAT_TYPES),
        "n_fallback": 0,
        "fallbacks": {},
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "budget": s.budget,
        "reference_bytes": s.reference_bytes,
        "excluded": sorted(exclude),
        "weighting": weighting,
        "file_sha256": sha256_file(path),
        "tensor_sha256": tensor_sha256(path),
        "quantize_seconds": s.seconds,
    }
    write_json(meta_path, meta)
    return meta | {"reused": False}


def notes(rows: list[dict], info: dict) -> list[str]:
    """What the calibrated rows are, what was left out and why, and each opt row against its imatrix row."""
    imx = info["imatrix"]
    made = (
        f"computed by ggufkit's engine on {imx['text']} ({imx['chunks']} chunks of {imx['ctx']} tokens, text "
        f"the evaluation does not read)"
        if imx["computed"]
        else f"the given file {imx['path']}"
    )
    out = [
        "Calibrated rows: 'LEVEL imatrix' is llama-quantize --imatrix's file at LEVEL (ggufkit quantize "
        "writes the same bytes) and 'LEVEL opt' ggufkit quantize --optimize's (standard GGUF types chosen "
        f"per tensor, weighting {info['weighting']}, never larger than LEVEL's file), both from one "
        f"importance matrix, {made}."
    ]
    if info["grid"]:
        grid = info["grid"]
        shares = ", ".join(f"{q} {100 * grid[q]['exact']:.0f}%" for q in info["excluded"])
        what = (
            f"{shares} of the sampled weights exactly, so the opt files leave "
            f"{' and '.join(info['excluded'])} out: re-encoding the shipped grid would show a gain no "
            "full-precision model gives (the llama.cpp rows use them where llama-quantize's rules do)"
            if info["excluded"]
            else "none of the sampled weights exactly"
        )
        partly = [q for q, g in grid.items() if q not in info["excluded"] and g["error_ratio"] < GRID_SHARE]
        if partly:
            what += (
                f"; {' and '.join(partly)} leave "
                + " and ".join(f"{grid[q]['error_ratio']:.2f}" for q in partly)
                + " times the squared error on them that they leave on the same weights moved off the grid "
                "(by less than half a step): they partly re-find it, and stay (llama-quantize's levels use "
                "them too)"
            )
        out.append(
            f"The base is a {info['dequantized_from']} file dequantized, so it sits on that format's grid: "
            f"re-encoded, {what}."
        )
    by = {r["level"]: r for r in rows}
    cmp = []
    for lv in info["levels"]:
        o, i = by.get(f"{lv} opt"), by.get(f"{lv} imatrix")
        if o and i and i.get("kld_mean"):
            cmp.append(
                f"{lv} x{o['kld_mean'] / i['kld_mean']:.2f} ({o['kld_mean']:.4f} vs {i['kld_mean']:.4f}, "
                f"{o['size_bytes'] / max(i['size_bytes'], 1):.3f} of its size)"
            )
    if cmp:
        out.append("Mean KLD of the opt file against the imatrix file at each level: " + "; ".join(cmp) + ".")
    return out
