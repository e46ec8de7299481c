"""The ladder report: one model quantized to every level, each level measured against the base, one table.

For each level of the ladder (default Q8_0 ... Q2_K) `run_report`:
  1. quantizes the base with ggufkit's own quantizer (quantize.quantize_file; byte-identical to
     llama-quantize). The base is the user's F32/F16/BF16 GGUF as it is, or, for a quantized GGUF such as
     the default SmolLM2 Q4_1, its exact F32 dequantization (the faithful full-precision form of that file);
  2. evaluates the level against the base (evaluate.evaluate: PPL, mean KLD, same-top-token agreement);
  3. measures tokens/s: llama.cpp's own generation speed when llama-cpp-python is installed, otherwise the
     built-in numpy engine's prompt throughput (labelled as such in every output);
  4. estimates resident memory at 4K/8K/32K contexts (memory.estimate on the level's file).
Then it asks `pick` for this machine's recommendation and writes report.md, report.json, report.html and
report.png (size vs KLD and same-top agreement) into the output folder, with a copy of report.json in
cache_dir("reports")/<model sha256>/ where `ggufkit pick` finds it.

Notes on where the model departs from the textbook are computed from the plans and the files: tensors
that fell back to another type because their rows are not a multiple of the K-quant block, levels whose
tensors come out identical, a base that is itself a dequantized model, a context beyond the trained one.

Resumable and safe. Work lives in cache_dir("report-cache")/<model sha256[:16]>/: the base, each level's
GGUF with a JSON record of its quantization (keyed by the base and the quantizer's code), and each level's
measurements (keyed by the level file's sha256, the base, the text, ctx, chunks and the engines). Every
file is written to a temporary name and renamed into place when complete, so an interrupt leaves either
the old file or the new one, never half of one; a re-run reuses everything already done.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import GgufkitError
from .gguf_file import open_gguf
from .models import cache_dir, default_model_path, sha256_file

__all__ = [
    "DEFAULT_LEVELS",
    "QUICK_LEVELS",
    "CONTEXTS",
    "ReportError",
    "ReportProgress",
    "Report",
    "run_report",
    "format_table",
]

log = logging.getLogger(__name__)

DEFAULT_LEVELS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K")
QUICK_LEVELS = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
CONTEXTS = (4096, 8192, 32768)  # the RAM columns
PICK_CTX = 4096  # ram_bytes and the recommendation are at this context
DEFAULT_CTX, DEFAULT_CHUNKS, QUICK_CHUNKS = 512, 8, 3
SPEED_PROMPT = 256  # tokens of the timed prompt; then SPEED_GEN generated tokens
SPEED_GEN = 32
CACHE_VERSION = 2  # bump when a cached record changes shape
_FLOAT_TYPES = ("F32", "F16", "BF16")
# the modules whose code decides a level file's bytes / a level's measurements: part of the cache keys
_QUANT_CODE = ("quantize.py", "recipes.py", "gguf_writer.py", "quants")
_EVAL_CODE = ("evaluate.py", "engine", "memory")


class ReportError(GgufkitError):
    """The report cannot be made as asked (model, levels, options)."""


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


# -- small helpers ----------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, renamed when complete."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _code_fingerprint(parts: tuple[str, ...]) -> str:
    """sha256 of the package's source files that decide a result, so a changed quantizer or engine never
    reuses a stale cache entry. Taken once per process: it stands for the code this process runs."""
    root = Path(__file__).parent
    h = hashlib.sha256(__version__.encode())
    for part in parts:
        p = root / part
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
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


def _type_name(t) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(int(t)).name


def _weight_types(path) -> dict[str, int]:
    """Type name -> number of 2-D tensors of that type (the weights a quantizer acts on)."""
    out: dict[str, int] = {}
    with open_gguf(path) as g:
        for t in g.tensors:
            if len(t.shape) >= 2:
                name = _type_name(t.ggml_type)
                out[name] = out.get(name, 0) + 1
    return out


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    from .engine.llama import cpu_count

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": cpu_count(),
        "ram_total_bytes": total,
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "load_average_1min": round(load, 2) if load is not None else None,
    }


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def default_threads() -> int:
    """The cores not already busy (by the 1-minute load average), at least one. llama.cpp's threads spin at
    their barriers, so running as many threads as cores on a machine that is busy elsewhere is many times
    slower than running fewer; on an idle machine this is all the cores."""
    from .engine.llama import cpu_count

    cores = cpu_count()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    return max(1, min(cores, cores - math.floor(busy + 0.5)))


def _resolve_engine(engine: str) -> str:
    from .evaluate import ENGINES

    if engine == "auto":
        return "llama.cpp" if _llama_cpp_available() else "builtin"
    if engine not in ENGINES:
        raise ReportError(f"unknown engine {engine!r} (known: auto, {', '.join(ENGINES)})")
    return engine


# -- the base ---------------------------------------------------------------------------------------------


def _prepare_base(
    model: Path, model_sha: str, work: Path, notes: list[str], progress, *, threads=None
) -> dict:
    """The full-precision base: the model itself, or its exact F32 dequantization (cached in `work`)."""
    from .quantize import quantize_file

    types = _weight_types(model)
    quantized = {t: n for t, n in types.items() if t not in _FLOAT_TYPES}
    if not quantized:
        main = max(types, key=types.get) if types else "F32"
        return {"path": str(model), "sha256": model_sha, "type": main, "dequantized_from": None}
    src_type = max(quantized, key=quantized.get)
    path = work / "base-F32.gguf"
    meta_path = work / "base-F32.json"
    key = {"model_sha256": model_sha, "code": _code_fingerprint(_QUANT_CODE), "v": CACHE_VERSION}
    meta = _read_json(meta_path)
    if not (meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get("size")):

        def cb(p):
            progress("base", f"dequantizing {src_type} -> F32", p.bytes_done / max(p.bytes_total, 1))

        quantize_file(model, path, "F32", allow_requantize=True, threads=threads, progress=cb)
        meta = {"key": key, "size": path.stat().st_size, "sha256": sha256_file(path)}
        _write_json(meta_path, meta)
    n_q = sum(quantized.values())
    notes.append(
        f"The base is not an original full-precision model: {model.name} stores {n_q} of its "
        f"{sum(types.values())} weight tensors as {'/'.join(sorted(quantized))}, so the base is their exact "
        f"F32 dequantization. Every PPL/KLD number below is the loss relative to that {src_type} model, not "
        f"to the original training weights, and levels above {src_type}'s precision mostly re-encode "
        f"{src_type}'s rounding."
    )
    return {"path": str(path), "sha256": meta["sha256"], "type": "F32", "dequantized_from": src_type}


# -- one level --------------------------------------------------------------------------------------------


def _quantize_level(base: dict, level: str, work: Path, progress, *, threads: int | None = None) -> dict:
    """The level's GGUF in `work/levels`, quantized once per (base, level, quantizer code)."""
    from . import recipes
    from .quantize import quantize_file

    folder = work / "levels"
    folder.mkdir(exist_ok=True)
    path = folder / f"{level}.gguf"
    meta_path = folder / f"{level}.json"
    key = {
        "base_sha256": base["sha256"],
        "level": level,
        "code": _code_fingerprint(_QUANT_CODE),
        "v": CACHE_VERSION,
    }
    meta = _read_json(meta_path)
    if meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get("size_bytes"):
        meta["reused"] = True
        return meta

    def cb(p):
        progress(f"quantizing {p.index + 1}/{p.n_tensors}", p.bytes_done / max(p.bytes_total, 1))

    s = quantize_file(base["path"], path, level, threads=threads, progress=cb)
    plan: recipes.Plan = s.plan
    fallbacks: dict[str, int] = {}  # "Q4_K -> Q5_0" -> number of tensors
    fallback_rows: set[int] = set()
    for tp in s.fallbacks:
        # the plan's reason ends with "fallback A -> B: row N not a multiple of K"
        what = tp.reason.rsplit("fallback ", 1)[-1].split(":")[0]
        fallbacks[what] = fallbacks.get(what, 0) + 1
        fallback_rows.add(int(tp.shape[0]))
    meta = {
        "key": key,
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "tensor_bytes": plan.total_bytes,
        "n_elements": plan.n_elements,
        "bpw": plan.bits_per_weight,
        "n_tensors": len(plan.tensors),
        "n_quantized": sum(1 for t in plan.tensors if t.quantize),
        "n_fallback": plan.n_fallback,
        "fallbacks": fallbacks,
        "fallback_rows": sorted(fallback_rows),
        "default_type": plan.level.default_type.name,
        "file_sha256": sha256_file(path),
        "tensor_sha256": tensor_sha256(path),
        "quantize_seconds": s.seconds,
    }
    _write_json(meta_path, meta)
    meta["reused"] = False
    return meta


def _speed(path, tokens, *, engine: str, threads: int | None) -> dict:
    """tokens/s of `path`: llama.cpp's prompt (SPEED_PROMPT tokens) and generation (SPEED_GEN greedy
    steps) speeds, or the built-in engine's prompt throughput."""
    import numpy as np

    prompt = np.asarray(tokens[:SPEED_PROMPT], dtype=np.int32)
    if engine == "llama.cpp":
        from .engine.llamacpp import LlamaCppRunner

        with LlamaCppRunner(path, ctx=len(prompt), threads=threads, gen_tokens=SPEED_GEN) as r:
            r.chunk_logits(prompt[:16], first=15)  # warm-up: page the weights in, start the threads
            t0 = time.perf_counter()
            r.chunk_logits(prompt, first=len(prompt) - 1)
            pp = len(prompt) / (time.perf_counter() - t0)
            tg = r.generation_speed()
        return {
            "tok_s": tg,
            "pp_tok_s": pp,
            "tok_s_engine": "llama.cpp",
            "tok_s_kind": f"generation ({SPEED_GEN} tokens, llama.cpp)",
        }
    from .engine.llama import LlamaModel, blas_threads

    with blas_threads(threads), open_gguf(path) as g:
        m = LlamaModel(g)
        t0 = time.perf_counter()
        for _ in m.chunk_logits(prompt[None, :], first=len(prompt) - 1):
            pass
        pp = len(prompt) / (time.perf_counter() - t0)
    return {
        "tok_s": pp,
        "pp_tok_s": pp,
        "tok_s_engine": "builtin",
        "tok_s_kind": "prompt processing (built-in numpy engine; llama-cpp-python not installed)",
    }


def _ram(path) -> dict:
    from . import memory

    info = memory.load_source(path)
    return {str(c): memory.estimate(info, n_ctx=c).needed_bytes for c in CONTEXTS}


def _measure(
    path: Path,
    ident: str,
    base: dict,
    opts: dict,
    work: Path,
    tokens,
    progress,
    *,
    is_base=False,
) -> dict:
    """Quality (against the base), speed and RAM of one file, cached by `ident` (the sha256 of its tensors:
    two levels with identical tensors are measured once) and the options."""
    from .evaluate import evaluate

    folder = work / "results"
    folder.mkdir(exist_ok=True)
    key = {
        "tensors": ident,
        "base_sha256": base["sha256"],
        "is_base": is_base,
        # the text by its sha256 (not its name or path); threads change the speed, not the results
        **{k: v for k, v in opts.items() if k not in ("threads", "text", "text_path")},
        "code": _code_fingerprint(_EVAL_CODE),
        "v": CACHE_VERSION,
    }
    out = folder / f"{_key(key)}.json"
    cached = _read_json(out)
    if cached and cached.get("key") == key:
        cached["reused"] = True
        return cached
    rec: dict = {"key": key}
    if not is_base:

        def cb(phase, c, n):
            start = 0.2 if phase == "base" else 0.55
            what = "the base" if phase == "base" else "the level"
            progress(f"evaluating {what}, chunk {c}/{n}", start + 0.35 * c / n)

        r = evaluate(
            path,
            base=base["path"],
            text=opts["text_path"],
            ctx=opts["ctx"],
            chunks=opts["chunks"],
            threads=opts["threads"],
            engine=opts["engine"],
            progress=cb,
        )
        rec.update(
            ppl=r.ppl,
            ppl_err=r.ppl_err,
            base_ppl=r.base_ppl,
            base_ppl_err=r.base_ppl_err,
            kld_mean=r.kld_mean,
            kld_err=r.kld_err,
            kld_p99=r.kld_p99,
            same_top=r.same_top,
            same_top_err=r.same_top_err,
            rms_dp=r.rms_dp,
            ln_ppl_ratio=r.ln_ppl_ratio,
            ln_ppl_ratio_err=r.ln_ppl_ratio_err,
            tokens=r.tokens,
            chunks=r.chunks,
            eval_seconds=r.seconds,
        )
    progress("measuring tokens/s", 0.92)
    rec.update(_speed(path, tokens, engine=opts["speed_engine"], threads=opts["threads"]))
    rec["threads"] = opts["threads"]
    rec["ram_by_ctx"] = _ram(path)
    rec["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_json(out, rec)
    rec["reused"] = False
    return rec


# -- notes ------------------------------------------------------------------------------------------------


def _bpw_of_type(name: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return 8.0 * size / block


def _bulk_type(row: dict) -> str:
    """The type most of a level's fallen-back tensors ended up in, else the level's own block type."""
    fb = row.get("fallbacks") or {}
    if fb:  # keys read "Q4_K -> Q5_0"
        return max(fb, key=fb.get).split(" -> ")[1]
    return row.get("default_type") or row["level"]


def _notes(rows: list[dict], quant: dict[str, dict], info, opts: dict) -> list[str]:
    notes = []
    for lv, q in quant.items():
        if q["n_fallback"]:
            what = ", ".join(f"{n} x {k}" for k, n in sorted(q["fallbacks"].items(), key=lambda kv: -kv[1]))
            rows_text = " or ".join(map(str, q.get("fallback_rows") or [])) or "their"
            notes.append(
                f"{lv}: {q['n_fallback']} of {q['n_quantized']} quantized tensors fell back to another type "
                f"({what}): rows of {rows_text} weights are not a multiple of the block they were meant for. "
                f"The file averages {q['bpw']:.2f} bits per weight, against "
                f"{_bpw_of_type(q['default_type']):.2f} for {q['default_type']} blocks alone."
            )
    groups: dict[str, list[str]] = {}
    for lv, q in quant.items():
        groups.setdefault(q["tensor_sha256"], []).append(lv)
    for levels in groups.values():
        if len(levels) > 1:
            same = quant[levels[0]]["file_sha256"] == quant[levels[1]]["file_sha256"]
            notes.append(
                f"{' and '.join(levels)} produce identical tensors (tensor sha256 "
                f"{quant[levels[0]]['tensor_sha256'][:12]}); "
                + ("the files are identical too." if same else "the files differ only in general.file_type.")
            )
    for r in rows:
        if r.get("base") or r.get("ppl") is None:
            continue
        diff = r["ppl"] - r["base_ppl"]
        err = r["ppl"] * (r.get("ln_ppl_ratio_err") or 0.0)
        if diff < 0:
            notes.append(
                f"{r['level']}: PPL {r['ppl']:.3f} is below the base's {r['base_ppl']:.3f} "
                f"({diff:+.3f}, ±{err:.3f}): noise of a short text, not a better model; its KLD "
                f"({r['kld_mean']:.4f}) still measures the damage."
            )
    q_rows = sorted((r for r in rows if not r.get("base") and r.get("kld_mean")), key=lambda r: -r["bpw"])
    if len(q_rows) >= 2:
        jumps = [
            (b["kld_mean"] / a["kld_mean"], a, b) for a, b in zip(q_rows, q_rows[1:]) if a["kld_mean"] > 0
        ]
        if jumps:
            ratio, a, b = max(jumps, key=lambda j: j[0])
            notes.append(
                f"The steepest step down the ladder is {a['level']} -> {b['level']}: mean KLD x{ratio:.1f} "
                f"({a['kld_mean']:.4f} -> {b['kld_mean']:.4f}), same top token {a['same_top']:.1f}% -> "
                f"{b['same_top']:.1f}%, for {100 * (1 - b['size_bytes'] / a['size_bytes']):.0f}% less file."
            )
    by_size = sorted(
        (r for r in rows if not r.get("base") and r.get("kld_mean") is not None),
        key=lambda r: -r["size_bytes"],
    )
    for a, b in zip(by_size, by_size[1:]):
        if b["kld_mean"] < a["kld_mean"] and b["size_bytes"] < a["size_bytes"]:
            ta, tb = _bulk_type(a), _bulk_type(b)
            why = f"; most of {b['level']}'s tensors are {tb} here, {a['level']}'s {ta}" if ta != tb else ""
            notes.append(
                f"{b['level']} measured closer to the base than the larger {a['level']} (KLD "
                f"{b['kld_mean']:.4f} ± {b.get('kld_err') or 0:.4f} vs {a['kld_mean']:.4f} ± "
                f"{a.get('kld_err') or 0:.4f}){why}: the ladder is not monotonic on this model."
            )
    if info.n_ctx_train:
        over = [c for c in CONTEXTS if c > info.n_ctx_train]
        if over:
            notes.append(
                f"The model was trained with a {info.n_ctx_train}-token context; the RAM column at "
                f"{', '.join(map(str, over))} shows what llama.cpp would allocate, not a context it handles "
                f"well."
            )
    speed = next((r for r in rows if r.get("tok_s_kind")), None)
    if speed is not None:
        used = sorted({r["threads"] for r in rows if r.get("threads")})
        notes.append(f"tok/s: {speed['tok_s_kind']}, {'/'.join(map(str, used))} thread(s).")
    return notes


# -- the run ----------------------------------------------------------------------------------------------


def _tokens_for_speed(path, text_path):
    from .engine.tokenizer import load_tokenizer
    from .evaluate import read_text

    body, _ = read_text(text_path)
    with open_gguf(path) as g:
        tok = load_tokenizer(g)
    return tok.encode(body[: 16 * SPEED_PROMPT * 4])


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
) -> Report:
    """Quantize `model` (default: SmolLM2-135M-Instruct) to each level, measure every level against the base
    and write report.md/json/html/png into `out` (default cache_dir("reports")/<model sha256>). Returns the
    Report; raises ReportError / GgufkitError for anything that cannot be done as asked. `work` is where the
    base, the level files and the cached measurements live (default cache_dir("report-cache")/<sha[:16]>)."""
    from . import memory, recipes
    from . import pick as picker
    from .evaluate import read_text

    t_start = time.perf_counter()
    machine = _machine()  # before the run: the load it competes with
    model = Path(default_model_path() if model is None else model)
    if model.is_dir():
        raise ReportError(f"{model}: Hugging Face folders are not supported yet; convert to GGUF first")
    if not model.is_file():
        raise ReportError(f"{model}: no such file")
    names = []
    for lv in levels or (QUICK_LEVELS if quick else DEFAULT_LEVELS):
        name = recipes.level(lv).name
        if name in _FLOAT_TYPES:
            raise ReportError(
                f"{name} is not a quantization level for the ladder (the base is full precision)"
            )
        if name not in names:
            names.append(name)
    chunks = chunks or (QUICK_CHUNKS if quick else DEFAULT_CHUNKS)
    engine = _resolve_engine(engine)
    threads = threads if threads and threads > 0 else default_threads()
    body, text_name = read_text(text)
    model_sha = sha256_file(model)
    work = Path(work) if work is not None else cache_dir("report-cache", model_sha[:16])
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(out) if out is not None else cache_dir("reports", model_sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_steps = 1 + len(names)

    def step(index: int, level: str):
        def cb(label: str, fraction: float) -> None:
            if progress:
                progress(ReportProgress(index, n_steps, level, label, min(max(fraction, 0.0), 1.0)))

        return cb

    notes: list[str] = []
    base_step = step(0, "base")
    base = _prepare_base(
        model, model_sha, work, notes, lambda _lv, label, f: base_step(label, 0.5 * f), threads=threads
    )
    opts = {
        "text": text_name,
        "text_path": None if text is None else str(text),
        "text_sha256": hashlib.sha256(body.encode()).hexdigest(),
        "ctx": ctx,
        "chunks": chunks,
        "engine": engine,
        "speed_engine": "llama.cpp" if _llama_cpp_available() else "builtin",
        "threads": threads,
    }
    tokens = _tokens_for_speed(base["path"], opts["text_path"])
    base_rec = _measure(
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
        q = _quantize_level(base, lv, work, lambda label, f, cb=cb: cb(label, 0.2 * f), threads=threads)
        quant[lv] = q
        results[lv] = _measure(Path(q["path"]), q["tensor_sha256"], base, opts, work, tokens, cb)
        cb("done", 1.0)

    rows = [_base_row(base, base_rec, results)]
    for lv in names:
        q, r = quant[lv], results[lv]
        rows.append(
            {
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
        )
    info = memory.load_source(model)
    notes += _notes(rows, quant, info, opts)
    data = {
        "ggufkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "model": str(model),
        "model_name": model.name,
        "model_sha256": model_sha,
        "base": base,
        "options": {k: v for k, v in opts.items() if k != "text_path"} | {"levels": names, "quick": quick},
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
    report = Report(data, out_dir)
    _write_outputs(report)
    return report


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


# -- outputs ----------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _ram_text(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


HEADERS = [
    "level",
    "size MiB",
    "bpw",
    "PPL",
    "ΔPPL",
    "mean KLD",
    "same top",
    "tok/s",
    *[f"RAM {c // 1024}K" for c in CONTEXTS],
]


def _cells(r: dict) -> list[str]:
    ppl = "" if r["ppl"] is None else f"{r['ppl']:.3f}"
    name = r["level"] + (" (base)" if r.get("base") else "")
    delta = "—" if r.get("base") else f"{r['ppl_delta_pct']:+.2f}%"
    kld = "—" if r.get("base") else f"{r['kld_mean']:.4f}"
    top = "—" if r.get("base") else f"{r['same_top']:.1f}%"
    return [
        name,
        _mib(r["size_bytes"]),
        f"{r['bpw']:.2f}",
        ppl,
        delta,
        kld,
        top,
        f"{r['tok_s']:.1f}",
        *[_ram_text(r["ram_by_ctx"][str(c)]) for c in CONTEXTS],
    ]


def format_table(data: dict) -> str:
    """The ladder as a Markdown table (also what the CLI prints)."""
    rows = [HEADERS, *[_cells(r) for r in data["levels"]]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    lines = [fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *[fmt(r) for r in rows[1:]]])


def _summary_lines(data: dict) -> list[str]:
    m, o, b = data["machine"], data["options"], data["base"]
    base = b["type"] + (f", dequantized from {b['dequantized_from']}" if b["dequantized_from"] else "")
    return [
        f"Model: {data['model_name']} (sha256 {data['model_sha256'][:12]}); base {base}.",
        f"Text: {o['text']}, ctx {o['ctx']}, {o['chunks']} chunks; quality engine {o['engine']}, "
        f"{o['threads']} thread(s); took {data.get('seconds', 0):.0f} s.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; load average {m['load_average_1min']} at "
        f"the start; {data['created']}.",
    ]


def render_markdown(data: dict) -> str:
    rec = data["recommendation"]
    parts = [
        f"# ggufkit report: {data['model_name']}",
        "",
        *_summary_lines(data),
        "",
        format_table(data),
        "",
        "PPL: perplexity on the text; ΔPPL against the base; mean KLD: KL divergence of the level's "
        "next-token distribution from the base's (nats/token); same top: how often both pick the same "
        "most likely token; RAM: what llama.cpp needs at that context (f16 KV cache).",
        "",
        "## Recommendation",
        "",
        f"**{rec['level'] or 'nothing fits'}** — {rec['reason']}",
    ]
    parts += [f"- {s}" for s in rec["suggestions"]]
    parts += [
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in data["notes"]],
        "",
        "![size vs quality](report.png)",
        "",
    ]
    return "\n".join(parts)


def render_png(data: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = sorted((r for r in data["levels"] if not r.get("base")), key=lambda r: r["size_bytes"])
    base = next((r for r in data["levels"] if r.get("base")), None)
    fig = Figure(figsize=(11, 4.5), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    size = [r["size_bytes"] / (1 << 20) for r in rows]
    kld = [max(r["kld_mean"], 1e-6) for r in rows]
    top = [r["same_top"] for r in rows]
    labels: dict[tuple, list[str]] = {}  # levels that land on the same point share one label
    for r, x, k, t in zip(rows, size, kld, top):
        labels.setdefault((round(x, 3), round(k, 9), round(t, 6)), []).append(r["level"])
    for ax, ys, title in ((ax1, kld, "mean KL divergence vs base (log)"), (ax2, top, "same top token (%)")):
        ax.plot(size, ys, "o-", color="tab:blue")
        for i, ((x, k, t), names) in enumerate(labels.items()):
            y = k if ax is ax1 else t
            off = (4, 5) if i % 2 == 0 else (4, -11)  # alternate above/below: neighbours do not overlap
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=off, fontsize=8)
        ax.set_xlabel("file size (MiB)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    if base is not None:
        ax2.axhline(100.0, color="gray", ls="--", lw=1)
        ax2.annotate(
            f"base {base['level']} ({base['size_bytes'] / (1 << 20):.0f} MiB)",
            (min(size), 100.0),
            textcoords="offset points",
            xytext=(0, -12),
            fontsize=8,
            color="gray",
        )
    fig.suptitle(
        f"{data['model_name']}: size vs quality ({data['options']['text']}, {data['options']['chunks']}"
        f"x{data['options']['ctx']} tokens)",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_html(data: dict, png: bytes) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in data["levels"])
    rec = data["recommendation"]
    notes = "".join(f"<li>{e(n)}</li>" for n in data["notes"])
    summary = "".join(f"<p>{e(s)}</p>" for s in _summary_lines(data))
    img = base64.b64encode(png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>ggufkit report: {e(data['model_name'])}</title><style>"
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>"
        f"<h1>ggufkit report: {e(data['model_name'])}</h1>{summary}"
        f"<table><tr>{head}</tr>{body}</table>"
        f"<h2>Recommendation</h2><p><b>{e(rec['level'] or 'nothing fits')}</b> — {e(rec['reason'])}</p>"
        f"<h2>Notes</h2><ul>{notes}</ul>"
        f"<img alt='size vs quality' src='data:image/png;base64,{img}'></body></html>\n"
    )


def _write_outputs(report: Report) -> None:
    data, out = report.data, report.out_dir
    png = render_png(data)
    files = {
        "png": out / "report.png",
        "md": out / "report.md",
        "html": out / "report.html",
        "json": out / "report.json",
    }
    _atomic_write(files["png"], png)
    _atomic_write(files["md"], render_markdown(data).encode())
    _atomic_write(files["html"], render_html(data, png).encode())
    _write_json(files["json"], data)  # last: its presence means the set is complete
    pick_copy = cache_dir("reports", data["model_sha256"]) / "report.json"
    if pick_copy.resolve() != files["json"].resolve():
        _write_json(pick_copy, data)
        files["json_for_pick"] = pick_copy
    report.files = files
