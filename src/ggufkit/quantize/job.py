"""quantize_file(): plan -> stream tensors through the block kernels -> atomic GGUF write (llama-quantize).

The pipeline, one tensor at a time, in llama.cpp's output order (sorted by layer, then name):
  1. the plan (plan.plan_for_gguf) decides each tensor's type; nothing here chooses types;
  2. a tensor whose type does not change is copied byte for byte;
  3. otherwise its rows are read in chunks (never the whole model), widened to float32 (F16/BF16 exactly,
     quantized inputs only with allow_requantize), checked for NaN/Inf, quantized with the tensor's
     importance vector, and appended to the output (stream.py: the chunks run on raw memory, several at
     once, and are written in order; with the native library numpy is never imported).
The output is a GGUF v3 file byte-identical to llama-quantize's (gguf.writer), written to a temporary
file and renamed into place only when complete.

Metadata (llama_model_quantize_impl, `src/llama-quant.cpp`; gguf_set_* removes a key and appends it):
input KVs verbatim and in input order; general.quantization_version = 2 (u32) and general.file_type (u32)
moved to the end; split.no / split.count / split.tensors.count removed; then --override-kv entries in
order (an int is stored as the u32 of its absolute value), then the quantize.imatrix.* entries.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .. import quants
from ..errors import QuantizeError
from ..gguf.reader import GGUFModel, open_gguf
from ..gguf.types import FLOAT_TYPES, GGMLQuantizationType, GGUFValueType
from ..gguf.writer import GGUFStreamWriter, TensorEntry, copy_kv, kv_bytes
from . import stream

if TYPE_CHECKING:
    from .plan import Plan, TensorPlan

__all__ = [
    "QuantizeProgress",
    "QuantizeSummary",
    "default_output_path",
    "imatrix_kvs",
    "parse_override_kv",
    "quantize_file",
]

GGML_QNT_VERSION = 2  # ggml.h: written as general.quantization_version
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


class QuantizeProgress(NamedTuple):
    """Passed to the `progress` callback after each chunk: where the job is, in input bytes."""

    index: int  # 0-based index of the current tensor
    n_tensors: int
    name: str
    bytes_done: int  # input bytes processed so far (all tensors)
    bytes_total: int


class QuantizeSummary(NamedTuple):
    """What a quantize job did (or, with dry_run, would do)."""

    src: Path
    dst: Path | None  # None for a dry run
    level: str
    ftype: int
    threads: int
    dry_run: bool
    n_tensors: int
    n_elements: int
    size_before: int  # tensor bytes of the input (llama-quantize's "model size")
    size_after: int  # tensor bytes of the output (its "quant size")
    file_size: int | None  # bytes of the output file, header and padding included
    seconds: float
    plan: Plan
    fallbacks: list[TensorPlan]  # kind FALLBACK: tp.fallback = (wanted, used)
    imatrix_entries: int = 0
    kernels: str = ""  # "native" (the compiled library) or "jit" (numba's fallback); "" for a dry run

    @property
    def bits_per_weight_before(self) -> float:
        return 8.0 * self.size_before / self.n_elements if self.n_elements else 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_after / self.n_elements if self.n_elements else 0.0


# -- metadata ---------------------------------------------------------------------------------------------


def _atol(text: str) -> int:
    """C atol: optional whitespace and sign, then as many digits as there are; 0 if none."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


def _atof(text: str) -> float:
    m = re.match(r"\s*([+-]?(?:inf(?:inity)?|nan|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))", text, re.I)
    return float(m.group(1)) if m else 0.0


def parse_override_kv(spec: str) -> tuple[str, GGUFValueType, object]:
    """KEY=TYPE:VALUE as llama.cpp's string_parse_kv_override reads it, typed as llama-quantize stores it.

    int -> UINT32 of |value| (mod 2^32), float -> FLOAT32, bool (true/false) -> BOOL, str (<= 127 bytes).
    """
    key, sep, rest = spec.partition("=")
    if not sep or not key or len(key.encode()) >= 128:
        raise QuantizeError(f"malformed --override-kv {spec!r} (expected KEY=TYPE:VALUE, key < 128 bytes)")
    kind, _, value = rest.partition(":")
    if kind == "int" and rest.startswith("int:"):
        return key, GGUFValueType.UINT32, abs(_atol(value)) & 0xFFFFFFFF
    if kind == "float" and rest.startswith("float:"):
        return key, GGUFValueType.FLOAT32, struct.unpack("<f", struct.pack("<f", _atof(value)))[0]
    if kind == "bool" and rest.startswith("bool:"):
        if value not in ("true", "false"):
            raise QuantizeError(f"--override-kv {spec!r}: a bool must be true or false")
        return key, GGUFValueType.BOOL, value == "true"
    if kind == "str" and rest.startswith("str:"):
        if len(value.encode()) > _KV_STR_MAX:
            raise QuantizeError(f"--override-kv {spec!r}: a string value cannot exceed {_KV_STR_MAX} bytes")
        return key, GGUFValueType.STRING, value
    raise QuantizeError(f"--override-kv {spec!r}: type must be int, float, bool or str")


def _truncated(text: str) -> bytes:
    """strncpy(val_str, text, 127): at most 127 bytes, cut wherever byte 127 falls."""
    return os.fsencode(text)[:_KV_STR_MAX]


def output_kvs(model: GGUFModel, ftype: int, overrides: Sequence[tuple[str, GGUFValueType, object]]) -> list:
    """The output KV entries (serialized), in llama-quantize's order."""
    entries: dict[str, bytes] = {}  # dicts keep insertion order; set = remove + append

    def set_(key: str, data: bytes) -> None:
        entries.pop(key, None)
        entries[key] = data

    for kv in model.kv.values():
        set_(kv.key, copy_kv(kv))
    set_(
        "general.quantization_version",
        kv_bytes("general.quantization_version", GGUFValueType.UINT32, GGML_QNT_VERSION),
    )
    set_("general.file_type", kv_bytes("general.file_type", GGUFValueType.UINT32, ftype))
    for key in _SPLIT_KEYS:
        entries.pop(key, None)
    for key, vtype, value in overrides:
        set_(key, kv_bytes(key, vtype, value))
    return list(entries.values())


def imatrix_kvs(meta: dict) -> list[tuple[str, GGUFValueType, object]]:
    """The quantize.imatrix.* KVs llama-quantize appends (tools/quantize/quantize.cpp), in its order, from
    Imatrix.quantize_metadata: strings as bytes cut at 127 bytes (strncpy), chunks_count only when
    positive; nothing at all when no entry is left (llama-quantize then runs as without an imatrix)."""
    if not meta["entries_count"]:
        return []
    out = [("quantize.imatrix.file", GGUFValueType.STRING, _truncated(str(meta["file"])))]
    if meta.get("dataset") is not None:
        out.append(("quantize.imatrix.dataset", GGUFValueType.STRING, _truncated(meta["dataset"])))
    out.append(("quantize.imatrix.entries_count", GGUFValueType.UINT32, int(meta["entries_count"])))
    if meta.get("chunks_count", 0) > 0:
        out.append(("quantize.imatrix.chunks_count", GGUFValueType.UINT32, int(meta["chunks_count"])))
    return out


# -- paths ------------------------------------------------------------------------------------------------


def default_output_path(src: str | os.PathLike, level_name: str) -> Path:
    """<input stem>-<TYPE>.gguf beside the input."""
    src = Path(src)
    return src.with_name(f"{src.stem}-{level_name}.gguf")


def _check_paths(src: Path, dst: Path) -> None:
    if dst.exists() and dst.is_dir():
        raise QuantizeError(f"output {dst} is a directory")
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and dst.exists():
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            pass
    if same:
        raise QuantizeError(f"input and output are the same file: {src} (the input is never overwritten)")
    if not dst.parent.is_dir():
        raise QuantizeError(f"output folder {dst.parent} does not exist")


# -- tensor data ------------------------------------------------------------------------------------------


# -- the job ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def passive_omp_waits():
    """OMP_WAIT_POLICY=PASSIVE while the kernels run, unless the user set it; the environment is restored.

    The numba JIT kernels (the fallback when the native library is unavailable: quants/native) run on
    libgomp, which by default spin-waits between parallel regions; when the cores are shared with other
    processes that makes each region 10-20x slower (F16->F32 of 1M values, 2 threads on a loaded 2-core
    machine). Passive waiting costs nothing measurable otherwise. libgomp reads the variable once, when
    numba first starts its pool (quants.set_threads or the first kernel call, both inside this block), and
    keeps it for the process. The native path has no OpenMP: its threads are a Python thread pool.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def set_threads(threads: int | None) -> tuple[int, Callable[[], None]]:
    want = threads if threads and threads > 0 else quants.max_threads()
    use = max(1, min(int(want), quants.max_threads()))
    old = quants.set_threads(use)
    return use, lambda: quants.set_threads(old)


def load_imatrix(path, include_weights, exclude_weights):
    """(vectors by tensor name, metadata for quantize.imatrix.*), through ggufkit.quantize.imatrix."""
    from . import imatrix as imx

    return imx.load_for_quantize(path, include=tuple(include_weights), exclude=tuple(exclude_weights))


def _check_imatrix(vectors: dict, model: GGUFModel, path) -> None:
    """An imatrix none of whose entries names a tensor of the model was made for another model. (Entries
    whose size differs from their tensor's rows are refused by the plan, as llama-quantize refuses them.)"""
    names = {t.name for t in model.tensors}
    if vectors and not any(n in names for n in vectors):
        some = ", ".join(sorted(vectors)[:3])
        raise QuantizeError(
            f"imatrix {path} was made for another model: none of its entries ({some}, ...) is a tensor "
            f"of {model.path}"
        )


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    qtype: str | None = None,
    *,
    threads: int | None = None,
    imatrix: str | os.PathLike | None = None,
    include_weights: Iterable[str] = (),
    exclude_weights: Iterable[str] = (),
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Iterable[str | tuple[str, str]] = (),
    pure: bool = False,
    leave_output_tensor: bool = False,
    allow_requantize: bool = False,
    override_kv: Iterable[str] = (),
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    progress: Callable[[QuantizeProgress], None] | None = None,
    _write_hook=None,
) -> QuantizeSummary:
    """Quantize the GGUF file `src` to the llama-quantize level `qtype` (e.g. "Q4_K_M"), writing `dst`
    (default: <src stem>-<TYPE>.gguf beside src). The output is byte-identical to llama-quantize's with the
    same options. Raises QuantizeError / GGUFError (GgufkitError) for anything that cannot be done as asked;
    on any error or interrupt the destination is left as it was. Returns a QuantizeSummary.
    """
    from .levels import level as level_of
    from .plan import plan_for_gguf

    t0 = time.perf_counter()
    if qtype is None:
        raise QuantizeError("no quantization type given (e.g. Q4_K_M)")
    level = level_of(str(qtype))
    include_weights, exclude_weights = list(include_weights), list(exclude_weights)
    if include_weights and exclude_weights:
        raise QuantizeError("--include-weights and --exclude-weights cannot be used together")
    overrides = [parse_override_kv(s) for s in override_kv]
    src = Path(src)
    dst_path = None if dry_run else Path(dst) if dst is not None else default_output_path(src, level.name)
    if dst_path is not None:
        _check_paths(src, dst_path)

    with open_gguf(src) as model:
        vectors, imeta = {}, None
        if imatrix is not None:
            vectors, imeta = load_imatrix(imatrix, include_weights, exclude_weights)
            _check_imatrix(vectors, model, imatrix)
        plan = plan_for_gguf(
            model,
            level.name,
            imatrix=vectors if vectors else None,
            output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type,
            tensor_types=tuple(tensor_types),
            pure=pure,
            leave_output_tensor=leave_output_tensor,
        )
        if vectors:
            overrides += imatrix_kvs(imeta)
        if not dry_run:
            plan.check_imatrix_requirement()
        if not allow_requantize:
            for tp in plan.tensors:
                if tp.quantize and GGMLQuantizationType(tp.src_type) not in FLOAT_TYPES:
                    have = GGMLQuantizationType(tp.src_type).name
                    raise QuantizeError(
                        f"{src} is already quantized (tensor {tp.name} is {have}); requantizing loses "
                        f"quality, pass allow_requantize / --allow-requantize to do it anyway"
                    )
        if not dry_run:
            known = quants.formats()
            for tp in plan.tensors:
                have = GGMLQuantizationType(tp.src_type).name
                if tp.quantize and have not in known:
                    raise QuantizeError(
                        f"cannot requantize tensor {tp.name}: ggufkit has no dequantizer for {have} "
                        f"(it reads {', '.join(known)})"
                    )
        by_name = {t.name: t for t in model.tensors}
        n_elements = sum(t.n_elements for t in model.tensors)
        size_before = sum(by_name[tp.name].nbytes for tp in plan.tensors)
        size_after = sum(tp.nbytes for tp in plan.tensors)
        summary = QuantizeSummary(
            src=src,
            dst=dst_path,
            level=level.name,
            ftype=int(level.ftype_id),
            threads=0,
            dry_run=dry_run,
            n_tensors=len(plan.tensors),
            n_elements=n_elements,
            size_before=size_before,
            size_after=size_after,
            file_size=None,
            seconds=0.0,
            plan=plan,
            fallbacks=plan.fallbacks(),
            imatrix_entries=len(vectors),
        )
        if dry_run:
            return summary._replace(seconds=time.perf_counter() - t0)

        kvs = output_kvs(model, int(level.ftype_id), overrides)
        entries = [
            TensorEntry(tp.name, tuple(tp.shape), GGMLQuantizationType(tp.dst_type)) for tp in plan.tensors
        ]
        report = None
        if progress:
            n = len(plan.tensors)

            def report(c, done):
                progress(QuantizeProgress(c.index, n, c.name, done, size_before))

        with passive_omp_waits():
            n_threads, restore = set_threads(threads)
            # quants.backend() loads (or, the first time, builds) the kernels before any output
            summary = summary._replace(threads=n_threads, kernels=quants.backend())
            try:
                with GGUFStreamWriter(dst_path, kvs, entries, write_hook=_write_hook) as writer:
                    todo = stream.chunks(model, plan, vectors, allow_nonfinite=allow_nonfinite)
                    stream.run(src, todo, writer, threads=n_threads, progress=report)
                    writer.commit()
                    summary = summary._replace(file_size=writer.file_size)
            except OSError as e:
                raise QuantizeError(f"cannot write {dst_path}: {e.strerror or e}") from None
            finally:
                restore()
    return summary._replace(seconds=time.perf_counter() - t0)
