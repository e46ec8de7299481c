"""run_report: the ladder, step by step (see the package docstring), and the rows of its table."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..cache import cache_dir, sha256_file
from ..gguf.reader import open_gguf
from ..models import MODELS, default_model_path
from ..models import model_path as known_model_path
from .machine import default_threads, llama_cpp_available, machine_facts, resolve_engine
from .measure import (
    FLOAT_TYPES,
    ReportError,
    convert_checkpoint,
    measure_file,
    prepare_base,
    quantize_level,
    speed_tokens,
)
from .notes import notes_for
from .render import write_outputs

DEFAULT_OUT = "ggufkit-report"  # the output folder, relative to the working directory, unless `out` is given
DEFAULT_LEVELS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K")
QUICK_LEVELS = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
PICK_CTX = 4096  # ram_bytes and the recommendation are at this context
DEFAULT_CTX, DEFAULT_CHUNKS, QUICK_CHUNKS = 512, 8, 3


@dataclass(frozen=True)
class ReportProgress:
    """Passed to the progress callback: step `index` of `n_steps` (the base, then one per level) is
    `fraction` done; `label` says what runs now."""

    index: int
    n_steps: int
    level: str
    label: str
    fraction: float


@dataclass
class Report:
    data: dict  # what report.json holds
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # kind -> written path

    @property
    def levels(self) -> list[dict]:
        return self.data["levels"]


def run_report(
    model: str | os.PathLike | None = None,
    *,
    levels: Sequence[str] | None = None,
    text: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    quick: bool = False,
    ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    engine: str = "auto",
    threads: int | None = None,
    ram_bytes: int | None = None,
    task: str = "chat",
    work: str | os.PathLike | None = None,
    progress: Callable[[ReportProgress], None] | None = None,
    optimize: bool = False,
    imatrix: str | os.PathLike | None = None,
    calib_chunks: int | None = None,
    weighting: str = "perturb",
) -> Report:
    """Quantize `model` (a GGUF, a Hugging Face checkpoint folder, converted first, or the name of a known
    model in models.MODELS such as "gemma3-270m"; default: SmolLM2-135M-Instruct) to each level, measure
    every level against the base and write report.md/json/html/png into `out` (default DEFAULT_OUT,
    ./ggufkit-report). Returns the Report; raises ReportError / GgufkitError (ConvertError for a folder the
    converter refuses) for anything that cannot be done as asked. `work` is where the converted folder, the
    base, the level files and the cached measurements live (default cache_dir("report-cache")/<sha[:16]>,
    for a folder hf-<content sha[:16]>).

    optimize: after each level that uses an importance matrix, the rows "LEVEL imatrix" (llama-quantize
    --imatrix's file) and "LEVEL opt" (optimize_file's at the same size, `weighting` as its), both from
    `imatrix` (a llama-imatrix file) or one computed on `calib_chunks` chunks (default 16) of the
    calibration text; see report/optimized.py."""
    from .. import memory
    from .. import recommend as picker
    from ..evaluation import read_text
    from ..quantize.levels import level as level_of

    t_start = time.perf_counter()
    machine = machine_facts()  # before the run: the load it competes with
    if model is None:
        model = default_model_path()
    elif isinstance(model, str) and model in MODELS and not Path(model).exists():
        model = known_model_path(model)  # a known model by name, fetched and cached
    model = Path(model)
    if not model.is_file() and not model.is_dir():
        raise ReportError(f"{model}: no such file or folder")
    names = []
    for lv in levels or (QUICK_LEVELS if quick else DEFAULT_LEVELS):
        name = level_of(lv).name
        if name in FLOAT_TYPES:
            raise ReportError(
                f"{name} is not a quantization level for the ladder (the base is full precision)"
            )
        if name not in names:
            names.append(name)
    opt_levels = _optimize_options(names, optimize, imatrix, calib_chunks, weighting)
    chunks = chunks or (QUICK_CHUNKS if quick else DEFAULT_CHUNKS)
    engine = resolve_engine(engine)
    threads = threads if threads and threads > 0 else default_threads()
    body, text_name = read_text(text)
    n_steps = 1 + len(names) + (1 + 2 * len(opt_levels) if optimize else 0)

    def step(index: int, level: str):
        def cb(label: str, fraction: float) -> None:
            if progress:
                progress(ReportProgress(index, n_steps, level, label, min(max(fraction, 0.0), 1.0)))

        return cb

    notes: list[str] = []
    base_step = step(0, "base")
    if model.is_dir():  # a checkpoint folder: its GGUF, converted once, is the model the ladder starts from
        source, work = convert_checkpoint(
            model, work, lambda _lv, label, f: base_step(label, 0.5 * f), threads=threads
        )
        model_path, model_sha = Path(source["converted"]), source["converted_sha256"]
        notes.append(
            f"The model is a Hugging Face checkpoint folder ({source['architecture']}, {source['dtype']} "
            f"safetensors). The base is ggufkit convert's {source['dtype']} GGUF of it (what "
            f"convert_hf_to_gguf.py --outtype {source['dtype'].lower()} writes), made once and cached by the "
            f"folder's content; each level is llama-quantize's of that file (for a level --outtype does not "
            f"offer, the file `ggufkit convert --type LEVEL` writes)."
        )
    else:
        model_path, model_sha = model, sha256_file(model)
        work = Path(work) if work is not None else cache_dir("report-cache", model_sha[:16])
        work.mkdir(parents=True, exist_ok=True)
        source = {"kind": "gguf", "path": str(model), "sha256": model_sha}
    out_dir = Path(out) if out is not None else Path.cwd() / DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    base = prepare_base(
        model_path, model_sha, work, notes, lambda _lv, label, f: base_step(label, 0.5 * f), threads=threads
    )
    opts = {
        "text": text_name,
        "text_path": None if text is None else str(text),
        "text_sha256": hashlib.sha256(body.encode()).hexdigest(),
        "ctx": ctx,
        "chunks": chunks,
        "engine": engine,
        "speed_engine": "llama.cpp" if llama_cpp_available() else "builtin",
        "threads": threads,
    }
    tokens = speed_tokens(base["path"], opts["text_path"])
    base_rec = measure_file(
        Path(base["path"]),
        base["sha256"],
        base,
        opts,
        work,
        tokens,
        lambda label, f: base_step(label, 0.5 + 0.5 * f),
        is_base=True,
    )
    quant: dict[str, dict] = {}
    results: dict[str, dict] = {}
    for i, lv in enumerate(names, start=1):
        cb = step(i, lv)
        cb("quantizing", 0.0)
        q = quantize_level(base, lv, work, lambda label, f, cb=cb: cb(label, 0.2 * f), threads=threads)
        quant[lv] = q
        results[lv] = measure_file(Path(q["path"]), q["tensor_sha256"], base, opts, work, tokens, cb)
        cb("done", 1.0)

    rows = [_base_row(base, base_rec, results)]
    rows += [_level_row(lv, quant[lv], results[lv]) for lv in names]
    info = memory.load_source(model_path)
    notes += notes_for(rows, quant, info, opts)  # the ladder's notes: llama-quantize's levels alone
    if optimize:
        rows, extra = _calibrated(
            rows, base, opt_levels, opts, work, tokens, step, 1 + len(names), notes,
            imatrix=imatrix, calib_chunks=calib_chunks, weighting=weighting, threads=threads,
        )  # fmt: skip
    data = {
        "ggufkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "model": str(model),
        "model_name": model.name,
        "model_sha256": model_sha,  # the GGUF the ladder starts from (for a folder: its conversion)
        "source": source,
        "base": base,
        "options": {k: v for k, v in opts.items() if k != "text_path"}
        | {"levels": names, "quick": quick}
        | ({"optimize": extra} if optimize else {}),
        "units": {
            "same_top": "percent",
            "ppl_delta_pct": "percent",
            "rms_dp": "percent",
            "kld_mean": "nats per token",
            "ram_bytes": f"needed bytes at n_ctx {PICK_CTX}, f16 KV",
        },
        "levels": rows,
        "notes": notes,
    }
    ram = memory.available_memory() if ram_bytes is None else int(ram_bytes)
    choice = picker.pick(info, ram_bytes=ram, task=task, n_ctx=PICK_CTX, report=data)
    data["recommendation"] = {
        "level": choice.level,
        "reason": choice.reason,
        "task": task,
        "n_ctx": PICK_CTX,
        "ram_bytes": ram,
        "suggestions": choice.suggestions,
    }
    data["seconds"] = time.perf_counter() - t_start
    return Report(data, out_dir, write_outputs(data, out_dir))


def _optimize_options(names, optimize, imatrix, calib_chunks, weighting) -> list[str]:
    """The levels that get calibrated rows (none without `optimize`); the options checked first."""
    if not optimize:
        if imatrix is not None or calib_chunks is not None:
            raise ReportError("an imatrix or calib_chunks is for the calibrated rows: add optimize")
        return []
    from ..optimize.sensitivity import WEIGHTINGS
    from .optimized import calibrated_levels

    if weighting not in WEIGHTINGS:
        raise ReportError(f"unknown weighting {weighting!r} (known: {', '.join(WEIGHTINGS)})")
    if imatrix is not None and calib_chunks is not None:
        raise ReportError("give an imatrix or calib_chunks, not both")
    if calib_chunks is not None and calib_chunks < 1:
        raise ReportError(f"calib_chunks must be at least 1, got {calib_chunks}")
    if imatrix is not None and not Path(imatrix).is_file():
        raise ReportError(f"{imatrix}: no such imatrix file")
    return calibrated_levels(names)


def _calibrated(rows, base, levels, opts, work, tokens, step, first, notes, *, imatrix, calib_chunks,
                weighting, threads) -> tuple[list[dict], dict]:  # fmt: skip
    """The rows with "LEVEL imatrix" and "LEVEL opt" after each of `levels` (report/optimized.py), and what
    report.json's options say about them; their notes appended to `notes`."""
    from . import optimized as opt

    cb = step(first, "imatrix")
    imx = opt.importance_matrix(
        base, work, cb, imatrix=imatrix, chunks=calib_chunks or opt.DEFAULT_CALIB_CHUNKS, threads=threads
    )
    grid = opt.on_grid(base, imx["path"]) if base["dequantized_from"] else {}
    excluded = [q for q, g in grid.items() if g["exact"] >= opt.GRID_SHARE]
    cb("done", 1.0)
    extra: dict[str, list[dict]] = {}
    for k, lv in enumerate(levels):
        for j, variant in enumerate(opt.VARIANTS):
            cb = step(first + 1 + 2 * k + j, f"{lv} {variant}")
            cb("quantizing", 0.0)
            sub = lambda label, f, cb=cb: cb(label, 0.2 * f)  # noqa: E731
            if variant == "imatrix":
                q = quantize_level(base, lv, work, sub, threads=threads, imatrix=imx)
            else:
                q = opt.opt_level(
                    base, lv, imx, work, sub, exclude=excluded, weighting=weighting, threads=threads
                )
            r = measure_file(Path(q["path"]), q["tensor_sha256"], base, opts, work, tokens, cb)
            row = _level_row(f"{lv} {variant}", q, r) | {"variant": variant, "of_level": lv}
            if variant == "opt":
                row |= {
                    "types": q["types"],
                    "budget_bytes": q["budget"],
                    "reference_bytes": q["reference_bytes"],
                }
            extra.setdefault(lv, []).append(row)
            cb("done", 1.0)
    out = []
    for row in rows:
        out += [row, *extra.get(row["level"], [])] if not row.get("base") else [row]
    info = {
        "levels": levels,
        "weighting": weighting,
        "imatrix": {
            k: v for k, v in imx.items() if k in ("path", "sha256", "computed", "text", "chunks", "ctx")
        },
        "grid": grid,
        "excluded": excluded,
        "dequantized_from": base["dequantized_from"],
    }
    notes += opt.notes(out, info)
    return out, info


def _level_row(lv: str, q: dict, r: dict) -> dict:
    """A quantized file's row: its quantization record `q` and its measurements `r`."""
    return {
        "level": lv,
        "base": False,
        "size_bytes": q["size_bytes"],
        "bpw": q["bpw"],
        "ppl": r["ppl"],
        "ppl_err": r["ppl_err"],
        "base_ppl": r["base_ppl"],
        "ppl_delta": r["ppl"] - r["base_ppl"],
        "ppl_delta_pct": 100 * (r["ppl"] / r["base_ppl"] - 1),
        "ln_ppl_ratio_err": r["ln_ppl_ratio_err"],
        "kld_mean": r["kld_mean"],
        "kld_err": r["kld_err"],
        "kld_p99": r["kld_p99"],
        "same_top": r["same_top"],
        "same_top_err": r["same_top_err"],
        "rms_dp": r["rms_dp"],
        "tok_s": r["tok_s"],
        "pp_tok_s": r["pp_tok_s"],
        "tok_s_engine": r["tok_s_engine"],
        "tok_s_kind": r["tok_s_kind"],
        "threads": r.get("threads"),
        "ram_bytes": r["ram_by_ctx"][str(PICK_CTX)],
        "ram_by_ctx": r["ram_by_ctx"],
        "n_fallback": q["n_fallback"],
        "n_quantized": q["n_quantized"],
        "fallbacks": q["fallbacks"],
        "file_sha256": q["file_sha256"],
        "tensor_sha256": q["tensor_sha256"],
        "path": q["path"],
        "quantized_now": not q["reused"],
        "measured_now": not r["reused"],
    }


def _base_row(base: dict, rec: dict, results: dict[str, dict]) -> dict:
    """The base: PPL as llama-perplexity reports it in its KL-divergence runs; KLD 0 and 100% same top by
    definition."""
    any_r = next(iter(results.values()), {})
    path = Path(base["path"])
    with open_gguf(path) as g:
        n_el = sum(math.prod(t.shape) for t in g.tensors)
        n_bytes = sum(t.nbytes for t in g.tensors)
    return {
        "level": base["type"],
        "base": True,
        "size_bytes": path.stat().st_size,
        "bpw": 8.0 * n_bytes / n_el,
        "ppl": any_r.get("base_ppl"),
        "ppl_err": any_r.get("base_ppl_err"),
        "base_ppl": any_r.get("base_ppl"),
        "ppl_delta": 0.0,
        "ppl_delta_pct": 0.0,
        "kld_mean": 0.0,
        "kld_p99": 0.0,
        "same_top": 100.0,
        "rms_dp": 0.0,
        "tok_s": rec["tok_s"],
        "pp_tok_s": rec["pp_tok_s"],
        "tok_s_engine": rec["tok_s_engine"],
        "tok_s_kind": rec["tok_s_kind"],
        "threads": rec.get("threads"),
        "ram_bytes": rec["ram_by_ctx"][str(PICK_CTX)],
        "ram_by_ctx": rec["ram_by_ctx"],
        "n_fallback": 0,
        "file_sha256": base["sha256"],
        "path": str(path),
        "dequantized_from": base["dequantized_from"],
    }
