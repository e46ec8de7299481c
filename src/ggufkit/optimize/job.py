"""optimize_file(): calibration, the per-tensor types (allocate.py), and the write through quantize/'s writer.

The pipeline:
  1. the budget: the tensor bytes (padded as written) of llama-quantize's file at LEVEL - the smaller of its
     plans with and without the importance matrix - or --target-bpw / --target-size (the whole data
     section, the tensors kept as they are included);
  2. the statistics: an importance matrix from `imatrix` (a llama-imatrix file), or computed by the
     built-in engine over `calib` (default: evaluation.calibration_text, never the evaluation half); with
     kernel "feedback", also each weight's full input covariance (calibrate/hessian.py), or those given;
  3. the tensors llama-quantize's plan leaves as they are (1-D, norms, ...) are copied; every other one gets
     its candidates' damage measured (allocate.measure), weighted per tensor (sensitivity.py), and the
     allocation picks its type;
  4. the file: llama-quantize's metadata for the level (general.file_type: LEVEL's ftype, or, with only a
     target, the level whose default type holds the most weights) and the tensors in llama.cpp's order,
     written atomically (gguf.writer). The same inputs give the same bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import QuantizeError
from ..gguf.layout import pad
from ..gguf.reader import open_gguf
from ..gguf.types import FLOAT_TYPES, GGMLQuantizationType
from ..gguf.writer import GGUFStreamWriter, TensorEntry
from ..quants import registry
from . import allocate

__all__ = ["OptimizeSummary", "optimize_file"]

log = logging.getLogger(__name__)

_MEMO: dict = {}  # the last job's statistics, damages and factors: reused for another budget
LLAMA_FTYPE_GUESSED = 1024  # include/llama.h: the file type when no level describes the mixture


KERNELS = ("standard", "refine", "feedback")  # how the job quantizes one tensor at its chosen type
FEEDBACK_DAMP = 0.03  # feedback.py's damping with ~16 chunks of calibration (docs/benchmarks.md)


def _quantize(w: np.ndarray, qtype: str, hessian: np.ndarray | None, importance: np.ndarray | None,
              kernel: str = "standard"):  # fmt: skip
    """Rows w [n, k] float32 -> block bytes [n, row_bytes]. kernel "standard": ggufkit's libggml-identical
    kernel with the importance vector; "refine": that, then feedback.py's weighted refit of each block's
    scales (refine.py); "feedback": GPTQ-style error feedback with the tensor's input covariance (where
    there is one and the type has blocks of codes and scales; the standard kernel elsewhere)."""
    if kernel == "standard" or qtype not in _feedback_types():
        return registry.quantize(w, qtype, importance=importance)
    from .feedback import quantize_tensor

    if kernel == "refine" or hessian is None:
        if kernel == "feedback":  # no covariance (token_embd is looked up, not multiplied)
            return registry.quantize(w, qtype, importance=importance)
        return quantize_tensor(w, qtype, importance=importance, refine_scales=True)
    return quantize_tensor(w, qtype, hessian=hessian, damp=FEEDBACK_DAMP)


@functools.cache
def _feedback_types() -> tuple[str, ...]:
    from .packing import supported

    return supported()


@dataclass
class OptimizeSummary:
    src: Path
    dst: Path
    level: str | None
    budget: int  # data-section bytes allowed
    size_after: int  # data-section bytes written (padded)
    reference_bytes: int | None  # llama-quantize's data section at LEVEL
    n_elements: int
    file_size: int
    types: dict[str, str]  # tensor name -> type written
    damage: float  # the allocation's predicted (weighted) damage
    calibration: str  # what the statistics came from
    seconds: float
    kernel: str = "standard"  # how each tensor was rounded at its type (KERNELS)
    measure_kernel: str = "standard"  # the kernel the candidates' damages were measured with
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_after / self.n_elements if self.n_elements else 0.0


def _tensor_f32(t) -> np.ndarray:
    """The tensor's values as float32 numpy [rows, ne0] (a 3-D tensor's experts stacked along rows)."""
    rows = t.n_elements // t.shape[0]
    return registry.dequantize(np.asarray(t.data()), int(t.ggml_type), (rows, t.shape[0]))


def _quantized_tensor(t, qtype: str, imps, hs, kernel: str = "standard") -> list[np.ndarray]:
    """The whole tensor's block bytes at qtype, one array per expert (one for a 2-D tensor)."""
    w = _tensor_f32(t)
    per = w.shape[0] // len(imps)
    return [
        _quantize(np.ascontiguousarray(w[e * per : (e + 1) * per]), qtype, hs[e], imps[e], kernel)
        for e in range(len(imps))
    ]


def _requantized(t, qtype: str, imps, hs, kernel: str = "standard") -> np.ndarray:
    """The tensor quantized at qtype and dequantized: float32 [rows, ne0]."""
    parts = _quantized_tensor(t, qtype, imps, hs, kernel)
    return np.concatenate([registry.dequantize(q, qtype, (q.shape[0], t.shape[0])) for q in parts])


def calibration_body(calib) -> str:
    """The calibration text itself (the file's, or evaluation.calibration_text)."""
    from ..evaluation import calibration_text, read_text

    return calibration_text() if calib is None else read_text(calib)[0]


def _budget(model, level_name, vectors, target_bpw, target_size, quantizable) -> tuple[int, int | None]:
    from ..quantize.plan import plan_for_gguf

    reference = None
    if level_name is not None:
        plans = [plan_for_gguf(model, level_name)]
        if vectors:
            plans.append(plan_for_gguf(model, level_name, imatrix=vectors))
        reference = min(sum(pad(tp.nbytes) for tp in p.tensors) for p in plans)
    if target_size is not None:
        return int(target_size), reference
    if target_bpw is not None:
        n = sum(t.n_elements for t in model.tensors)
        return int(target_bpw * n / 8), reference
    if reference is None:
        raise QuantizeError("give a LEVEL, target_bpw or target_size")
    return reference, reference


def _calibrate(src, calib, imatrix, hessian, *, folder: Path, ctx, chunks, threads, want_hessian):
    """(imatrix vectors by name, hessian folder or None, description)."""
    from ..quantize.imatrix import load_for_quantize

    if imatrix is not None:
        vectors, meta = load_for_quantize(imatrix)
        return vectors, (Path(hessian) if want_hessian else None), f"imatrix {imatrix}"
    from ..calibrate import compute_imatrix
    from ..errors import CalibrationError

    hess = folder / "hessian" if want_hessian else None
    try:
        res = compute_imatrix(
            src, output=folder / "calib.imatrix.gguf", text=calib, ctx=ctx, chunks=chunks, threads=threads,
            save_every=0, hessian=hess,
        )  # fmt: skip
    except CalibrationError as e:
        raise QuantizeError(f"calibration: {e}") from None
    vectors, _ = load_for_quantize(res.output)
    return vectors, hess, f"{res.datasets[0] if res.datasets else 'text'}, {res.chunks} chunks of {ctx}"


def _level_for(types: dict[str, str], model) -> int:
    from ..quantize.levels import LEVELS

    weight: dict[str, int] = {}
    for t in model.tensors:
        q = types.get(t.name)
        if q is not None:
            weight[q] = weight.get(q, 0) + t.n_elements
    top = max(sorted(weight), key=lambda q: weight[q]) if weight else None
    for lv in LEVELS.values():
        if top is not None and lv.default_type.name == top:
            return int(lv.ftype_id)
    return LLAMA_FTYPE_GUESSED


def _damages(names, by_name, stats, exclude, weighting, model, calib, progress, kernel, measure_kernel):
    """Each tensor's options (allocate.measure, summed over experts) and its sensitivity factor."""
    from . import sensitivity

    options = []
    for i, n in enumerate(names):
        t = by_name[n]
        w = _tensor_f32(t)
        imps, hs = stats(n)
        n_mat = len(imps)
        per = w.shape[0] // n_mat
        types = allocate.candidates(t.shape, exclude=exclude)
        total = None
        for e in range(n_mat):
            opts = allocate.measure(
                w[e * per : (e + 1) * per], t.shape, types,
                lambda x, q, h=hs[e], im=imps[e]: _quantize(x, q, h, im, measure_kernel),
                importance=imps[e], hessian=hs[e],
            )  # fmt: skip
            total = (
                opts
                if total is None
                else [a._replace(damage=a.damage + b.damage) for a, b in zip(total, opts)]
            )
        options.append(total)
        if progress:
            progress("measure", i + 1, len(names))
    cheapest = [min(opts, key=lambda o: (o.nbytes, o.damage)) for opts in options]

    def quantized(n: str) -> np.ndarray:
        t = by_name[n]
        qtype = cheapest[names.index(n)].qtype
        return _requantized(t, qtype, *stats(n), kernel).reshape(tuple(reversed(t.shape)))

    text = calibration_body(calib)
    factors = sensitivity.factors(weighting, model, names, [c.damage for c in cheapest], quantized, text=text)
    return options, factors


def _plan_options(model, level_name: str, vectors, names) -> list[list[allocate.Option]]:
    """llama-quantize's type for each of `names` at the level (with `vectors` as its imatrix), as the only
    option of each tensor (damage 0: nothing is measured)."""
    from ..quantize.plan import plan_for_gguf

    plan = {tp.name: tp for tp in plan_for_gguf(model, level_name, imatrix=vectors or None).tensors}
    return [[allocate.Option(plan[n].dst_type.name, pad(plan[n].nbytes), 0.0)] for n in names]


def optimize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    level: str | None = None,
    *,
    calib: str | os.PathLike | None = None,
    imatrix: str | os.PathLike | None = None,
    hessian: str | os.PathLike | None = None,
    target_bpw: float | None = None,
    target_size: int | None = None,
    exclude_types: Iterable[str] = (),
    weighting: str = "perturb",
    kernel: str | None = None,
    measure_kernel: str | None = None,
    allocation: bool = True,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    allow_requantize: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> OptimizeSummary:
    """Quantize `src` into llama.cpp's standard tensor types, each tensor's type chosen for the least
    calibrated damage within the size of llama-quantize's `level` file (or target_bpw / target_size).

    calib: a text file to calibrate on (default: the calibration half of the pydoc topics); imatrix: a
    llama-imatrix file instead (diagonal statistics only). exclude_types: types never to use. weighting:
    how tensors' damages are made comparable (sensitivity.WEIGHTINGS). kernel: how each tensor is quantized
    at its type (KERNELS; by default "feedback" where there are covariances, else "standard":
    docs/benchmarks.md "Optimize: the ablation"). "feedback" needs each weight's input covariance: it
    calibrates on text and collects them, or takes `hessian`, the folder compute_imatrix(hessian=...) wrote
    in the run that made the imatrix file (given, they also weigh every kernel's measured damage:
    e H e^T instead of the imatrix's diagonal). allocation=False keeps llama-quantize's per-tensor types for
    LEVEL (with the statistics as its imatrix), to measure the kernels alone. measure_kernel: the kernel
    the candidates' damages are measured with (default: kernel, but standard for feedback: the same KLD in
    half the time, docs/benchmarks.md; the perturbation passes always use kernel).
    Returns an OptimizeSummary; raises QuantizeError (a GgufkitError) for what cannot be done."""
    from ..quantize.job import _check_paths, output_kvs
    from ..quantize.levels import level as level_of
    from ..quantize.plan import plan_for_gguf
    from ..quantize.rules import not_quantized_reason
    from . import sensitivity

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lv = level_of(level) if level is not None else None
    if lv is None and target_bpw is None and target_size is None:
        raise QuantizeError("optimize needs a LEVEL, --target-bpw or --target-size")
    if target_bpw is not None and target_size is not None:
        raise QuantizeError("give --target-bpw or --target-size, not both")
    if target_bpw is not None and not target_bpw > 0:
        raise QuantizeError(f"--target-bpw must be positive, got {target_bpw}")
    if target_size is not None and int(target_size) <= 0:
        raise QuantizeError(f"--target-size must be positive, got {target_size}")
    if calib is not None and imatrix is not None:
        raise QuantizeError("give --calib or --imatrix, not both")
    if kernel is None:
        kernel = "feedback" if imatrix is None or hessian is not None else "standard"
    if measure_kernel is None:  # feedback's gain barely depends on the type: measure with the standard kernel
        measure_kernel = "standard" if kernel == "feedback" else kernel
    for k in (kernel, measure_kernel):
        if k not in KERNELS:
            raise QuantizeError(f"unknown kernel {k!r} (known: {', '.join(KERNELS)})")
    if kernel == "feedback" and imatrix is not None and hessian is None:
        raise QuantizeError("error feedback needs each weight's input covariance: give calibration text, "
                            "or the covariances written with the imatrix file")  # fmt: skip
    if hessian is not None and imatrix is None:
        raise QuantizeError("covariances come with the imatrix file of the same run: give both")
    if not allocation and lv is None:
        raise QuantizeError("keeping llama-quantize's types (allocation=False) needs a LEVEL")
    if weighting not in sensitivity.WEIGHTINGS:
        raise QuantizeError(f"unknown weighting {weighting!r} (known: {', '.join(sensitivity.WEIGHTINGS)})")
    src = Path(src)
    name = lv.name if lv is not None else (f"{target_bpw}bpw" if target_bpw is not None else "size")
    dst = Path(dst) if dst is not None else src.with_name(f"{src.stem}-opt-{name}.gguf")
    _check_paths(src, dst)
    exclude = [e.upper() for e in exclude_types]
    for e in exclude:
        if e not in registry.FORMATS:
            raise QuantizeError(f"unknown type {e!r} to exclude (known: {', '.join(registry.FORMATS)})")

    from ..quantize.plan import T as _T
    from ..quantize.plan import TensorSpec

    with open_gguf(src) as model, tempfile.TemporaryDirectory(prefix="ggufkit-optimize-") as tmp:
        plan = plan_for_gguf(model, lv.name if lv is not None else "F16")  # llama.cpp's tensor order
        by_name = {t.name: t for t in model.tensors}
        quantizable = {
            tp.name
            for tp in plan.tensors
            if not_quantized_reason(TensorSpec(tp.name, tp.shape, _T(tp.src_type), 0), False) is None
        }
        for n in sorted(quantizable):
            have = GGMLQuantizationType(by_name[n].ggml_type)
            if have not in FLOAT_TYPES and not allow_requantize:
                raise QuantizeError(
                    f"{src} is already quantized (tensor {n} is {have.name}); requantizing loses quality, "
                    f"pass allow_requantize / --allow-requantize to do it anyway"
                )
            if have.name not in registry.FORMATS:
                raise QuantizeError(
                    f"cannot requantize tensor {n}: ggufkit has no dequantizer for {have.name}"
                )
        want_hessian = "feedback" in (kernel, measure_kernel) or hessian is not None  # given: always used
        st = os.stat(src)
        key = (os.path.realpath(src), st.st_size, st.st_mtime_ns, str(calib), str(imatrix), str(hessian),
               ctx, chunks, tuple(exclude), weighting, kernel, measure_kernel, allocation)  # fmt: skip
        keep = not want_hessian or hessian is not None  # a temporary covariance folder is gone afterwards
        memo = _MEMO.get(key) if keep else None
        if memo is None:
            vectors, hess, calibration = _calibrate(
                src, calib, imatrix, hessian, folder=Path(tmp), ctx=ctx, chunks=chunks, threads=threads,
                want_hessian=want_hessian,
            )  # fmt: skip
        else:
            (vectors, calibration, options, factors), hess = memo, (Path(hessian) if want_hessian else None)
            timings["reused"] = 1.0
        timings["calibrate"] = time.perf_counter() - t0
        budget, reference = _budget(model, lv.name if lv is not None else None, vectors, target_bpw,
                                    target_size, quantizable)  # fmt: skip
        kept = sum(pad(by_name[n].nbytes) for n in by_name if n not in quantizable)

        def stats(n):
            t = by_name[n]
            n_mat = t.shape[2] if len(t.shape) > 2 else 1
            v = vectors.get(n)
            if v is not None and v.size != t.shape[0] * n_mat:
                v = None
            imps = [None if v is None else np.ascontiguousarray(v.reshape(n_mat, -1)[e], np.float32)
                    for e in range(n_mat)]  # fmt: skip
            hs = [None] * n_mat
            if hess is not None:
                from ..calibrate.hessian import read_hessian, read_index

                if n in read_index(hess)["tensors"]:
                    hs = list(read_hessian(hess, n))
            return imps, hs

        names = [tp.name for tp in plan.tensors if tp.name in quantizable]
        t1 = time.perf_counter()
        if not allocation:
            options, factors = _plan_options(model, lv.name, vectors, names), [1.0] * len(names)
        elif memo is None:
            options, factors = _damages(
                names, by_name, stats, exclude, weighting, model, calib, progress, kernel, measure_kernel
            )  # fmt: skip
            if keep:
                while len(_MEMO) >= 4:
                    _MEMO.pop(next(iter(_MEMO)))
                _MEMO[key] = (vectors, calibration, options, factors)
        timings["measure"] = time.perf_counter() - t1
        weighted = [[o._replace(damage=o.damage * f) for o in opts] for opts, f in zip(options, factors)]
        if not allocation:  # llama-quantize's own plan with these statistics: its size is the budget
            budget = kept + sum(opts[0].nbytes for opts in options)
        if budget - kept <= 0:
            raise QuantizeError(
                f"the budget ({budget} bytes) is below the tensors kept as they are ({kept} bytes)"
            )
        try:
            choices = allocate.allocate(names, weighted, budget - kept)
        except ValueError as e:
            smallest = kept + sum(min(o.nbytes for o in opts) for opts in options)
            bpw = 8 * budget / sum(t.n_elements for t in model.tensors)
            raise QuantizeError(
                f"the budget ({budget} bytes, {bpw:.3f} bpw) "
                f"is below the smallest possible file's tensor data ({smallest} bytes)"
            ) from e
        types = {c.name: c.qtype for c in choices}
        ftype = int(lv.ftype_id) if lv is not None else _level_for(types, model)
        kvs = output_kvs(model, ftype, [])
        out_type = {tp.name: types.get(tp.name, GGMLQuantizationType(by_name[tp.name].ggml_type).name)
                    for tp in plan.tensors}  # fmt: skip
        entries = [
            TensorEntry(tp.name, tuple(tp.shape), GGMLQuantizationType[out_type[tp.name]])
            for tp in plan.tensors
        ]
        t3 = time.perf_counter()
        try:
            with GGUFStreamWriter(dst, kvs, entries) as writer:
                for i, tp in enumerate(plan.tensors):
                    t = by_name[tp.name]
                    writer.begin_tensor(tp.name)
                    if tp.name not in types or out_type[tp.name] == GGMLQuantizationType(t.ggml_type).name:
                        writer.write(memoryview(np.ascontiguousarray(t.data())))
                    else:
                        for q in _quantized_tensor(t, out_type[tp.name], *stats(tp.name), kernel):
                            writer.write(memoryview(q))
                    writer.end_tensor()
                    if progress:
                        progress("write", i + 1, len(plan.tensors))
                writer.commit()
                file_size = writer.file_size
        except OSError as e:
            raise QuantizeError(f"cannot write {dst}: {e.strerror or e}") from None
        timings["write"] = time.perf_counter() - t3
        size_after = kept + sum(c.nbytes for c in choices)
        assert size_after <= budget, (size_after, budget)
        return OptimizeSummary(
            src=src, dst=dst, level=lv.name if lv is not None else None, budget=budget, size_after=size_after,
            reference_bytes=reference, n_elements=sum(t.n_elements for t in model.tensors),
            file_size=file_size, types=out_type, damage=sum(c.damage for c in choices),
            calibration=calibration, seconds=time.perf_counter() - t0, timings=timings, kernel=kernel,
            measure_kernel=measure_kernel,
        )  # fmt: skip
