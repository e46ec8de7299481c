"""The measuring steps of the report, each cached in the work folder: the full-precision base, one level's
quantized file, and one file's quality (against the base), speed and RAM (the machine facts and the thread
and engine choices they run with are in machine.py)."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path

from ..cache import cache_dir, sha256_file
from ..errors import GgufkitError
from ..gguf import types as gguf_types
from ..gguf.reader import open_gguf
from .records import code_fingerprint, read_json, record_key, tensor_sha256, write_json

CONTEXTS = (4096, 8192, 32768)  # the RAM columns
SPEED_PROMPT = 256  # tokens of the timed prompt; then SPEED_GEN generated tokens
SPEED_GEN = 32
CACHE_VERSION = 2  # bump when a cached record changes shape
FLOAT_TYPES = frozenset(t.name for t in gguf_types.FLOAT_TYPES)  # by name
# the sources whose code decides a level file's bytes / a level's measurements: part of the cache keys.
# _QUANT_CODE holds every module the quantize job imports but the package's lazy __init__ and errors.py
# (tests/test_report.py checks it); cache.py writes the file and moves it into place.
_QUANT_CODE = ("quantize", "gguf", "quants", "cache.py")
_EVAL_CODE = ("evaluation", "engine", "gguf", "memory")
# the sources that decide a converted checkpoint's bytes: the converter and the quantize stream it runs on
_CONVERT_CODE = ("conversion", *_QUANT_CODE)


class ReportError(GgufkitError):
    """The report cannot be made as asked (model, levels, options)."""


def _type_name(t) -> str:
    from ..gguf.types import GGMLQuantizationType

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


# -- the base ---------------------------------------------------------------------------------------------


def folder_sha256(folder: Path) -> str:
    """sha256 of a checkpoint folder's content: every file the converter may read (the folder's own files
    and additional_chat_templates/, hidden ones left out), by relative path and sha256."""
    h = hashlib.sha256()
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    templates = folder / "additional_chat_templates"
    if templates.is_dir():
        files += [f for f in templates.iterdir() if f.is_file() and not f.name.startswith(".")]
    for f in sorted(files, key=lambda f: f.relative_to(folder).as_posix()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def convert_checkpoint(folder: Path, work: Path | None, progress, *, threads=None) -> tuple[dict, Path]:
    """A Hugging Face checkpoint folder as the report's model: `ggufkit convert` to the checkpoint's own
    float type (F32, F16 or BF16: lossless, the highest precision there is, and what llama-quantize's
    levels start from in llama.cpp's own flow, convert_hf_to_gguf.py --outtype <dtype> then llama-quantize),
    written once into the work folder (default cache_dir("report-cache")/hf-<content sha256[:16]>) and
    reused while the folder's content and the converter's code are the same. Returns (the source's facts,
    the work folder); ConvertError for a folder the converter refuses, before anything is hashed."""
    from ..conversion.hf import load_model_config
    from ..conversion.job import convert
    from ..conversion.safetensors import open_checkpoint
    from ..conversion.tensors import source_ftype

    cfg = load_model_config(folder)  # an architecture or config the converter refuses fails here, first
    with open_checkpoint(folder) as ckpt:
        dtype = source_ftype(ckpt)
    progress("base", "hashing the checkpoint", 0.0)
    digest = folder_sha256(folder)
    work = Path(work) if work is not None else cache_dir("report-cache", "hf-" + digest[:16])
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"model-{dtype}.gguf"
    meta_path = work / f"model-{dtype}.json"
    key = {
        "folder_sha256": digest,
        "type": dtype,
        "code": code_fingerprint(_CONVERT_CODE),
        "v": CACHE_VERSION,
    }
    meta = read_json(meta_path)
    reused = bool(
        meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get("size")
    )
    if not reused:

        def cb(p):
            progress("base", f"converting to {dtype}", p.bytes_done / max(p.bytes_total, 1))

        convert(folder, path, type=dtype, threads=threads, progress=cb)
        meta = {"key": key, "size": path.stat().st_size, "sha256": sha256_file(path)}
        write_json(meta_path, meta)
    return {
        "kind": "hf",
        "path": str(folder),
        "sha256": digest,
        "architecture": cfg.architecture,
        "dtype": dtype,
        "converted": str(path),
        "converted_sha256": meta["sha256"],
        "converted_now": not reused,
    }, work


def prepare_base(
    model: Path, model_sha: str, work: Path, notes: list[str], progress, *, threads=None
) -> dict:
    """The full-precision base: the model itself, or its exact F32 dequantization (cached in `work`)."""
    from ..quantize.job import quantize_file

    types = _weight_types(model)
    quantized = {t: n for t, n in types.items() if t not in FLOAT_TYPES}
    if not quantized:
        main = max(types, key=types.get) if types else "F32"
        return {"path": str(model), "sha256": model_sha, "type": main, "dequantized_from": None}
    src_type = max(quantized, key=quantized.get)
    path = work / "base-F32.gguf"
    meta_path = work / "base-F32.json"
    key = {"model_sha256": model_sha, "code": code_fingerprint(_QUANT_CODE), "v": CACHE_VERSION}
    meta = read_json(meta_path)
    if not (meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get("size")):

        def cb(p):
            progress("base", f"dequantizing {src_type} -> F32", p.bytes_done / max(p.bytes_total, 1))

        quantize_file(model, path, "F32", allow_requantize=True, threads=threads, progress=cb)
        meta = {"key": key, "size": path.stat().st_size, "sha256": sha256_file(path)}
        write_json(meta_path, meta)
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


def quantize_level(
    base: dict, level: str, work: Path, progress, *, threads: int | None = None, imatrix: dict | None = None
) -> dict:
    """The level's GGUF in `work/levels`, quantized once per (base, level, quantizer code); with `imatrix`
    (the report's record of one), llama-quantize --imatrix's file in `work/optimized`, once per (base,
    level, imatrix, code)."""
    from ..quantize.job import quantize_file

    folder = work / ("optimized" if imatrix else "levels")
    folder.mkdir(exist_ok=True)
    stem = f"{level}-imatrix" if imatrix else level
    path = folder / f"{stem}.gguf"
    meta_path = folder / f"{stem}.json"
    key = {
        "base_sha256": base["sha256"],
        "level": level,
        "code": code_fingerprint(_QUANT_CODE),
        "v": CACHE_VERSION,
    }
    if imatrix:
        key["imatrix_sha256"] = imatrix["sha256"]
    meta = read_json(meta_path)
    if meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get("size_bytes"):
        meta["reused"] = True
        return meta

    def cb(p):
        progress(f"quantizing {p.index + 1}/{p.n_tensors}", p.bytes_done / max(p.bytes_total, 1))

    imx = imatrix["path"] if imatrix else None
    s = quantize_file(base["path"], path, level, imatrix=imx, threads=threads, progress=cb)
    meta = level_record(s, key)
    write_json(meta_path, meta)
    meta["reused"] = False
    return meta


def level_record(s, key: dict) -> dict:
    """The JSON record of a level file quantize_file wrote (its QuantizeSummary `s`), under `key`."""
    path, plan = Path(s.dst), s.plan
    fallbacks: dict[str, int] = {}  # "Q4_K -> Q5_0" -> number of tensors
    fallback_rows: set[int] = set()
    for tp in s.fallbacks:
        wanted, used = tp.fallback
        what = f"{wanted.name} -> {used.name}"
        fallbacks[what] = fallbacks.get(what, 0) + 1
        fallback_rows.add(int(tp.shape[0]))
    return {
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


def _speed(path, tokens, *, engine: str, threads: int | None) -> dict:
    """tokens/s of `path`: llama.cpp's prompt (SPEED_PROMPT tokens) and generation (SPEED_GEN greedy
    steps) speeds, or the built-in engine's prompt throughput."""
    import numpy as np

    prompt = np.asarray(tokens[:SPEED_PROMPT], dtype=np.int32)
    if engine == "llama.cpp":
        from ..engine.llamacpp import LlamaCppRunner

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
    from ..engine import load_model
    from ..engine.numerics import blas_threads

    with blas_threads(threads), open_gguf(path) as g:
        m = load_model(g)
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


def speed_tokens(path, text_path):
    """The tokens of the text the speed runs time (the first SPEED_PROMPT of them are the prompt)."""
    from ..engine.tokenizer import load_tokenizer
    from ..evaluation import read_text

    body, _ = read_text(text_path)
    with open_gguf(path) as g:
        tok = load_tokenizer(g)
    return tok.encode(body[: 16 * SPEED_PROMPT * 4])


def _ram(path) -> dict:
    from .. import memory

    info = memory.load_source(path)
    return {str(c): memory.estimate(info, n_ctx=c).needed_bytes for c in CONTEXTS}


def measure_file(
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
    from ..evaluation import evaluate

    folder = work / "results"
    folder.mkdir(exist_ok=True)
    key = {
        "tensors": ident,
        "base_sha256": base["sha256"],
        "is_base": is_base,
        # the text by its sha256 (not its name or path); threads change the speed, not the results
        **{k: v for k, v in opts.items() if k not in ("threads", "text", "text_path")},
        "code": code_fingerprint(_EVAL_CODE),
        "v": CACHE_VERSION,
    }
    out = folder / f"{record_key(key)}.json"
    cached = read_json(out)
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
    write_json(out, rec)
    rec["reused"] = False
    return rec
