"""`compute_imatrix()`: run the engine over a text and collect what llama-imatrix collects.

The text is fed as llama-imatrix feeds it (tools/imatrix/imatrix.cpp, compute_imatrix): a text file loses
one trailing newline (common's -f), the tokens start with BOS when the vocabulary adds one, n_chunk =
min(chunks, n_tokens // ctx) chunks of ctx tokens, each its own sequence with its first token overwritten
by BOS, and at least 2 * ctx tokens are required. The default text is the calibration half of the pydoc
topics (evaluation.calibration_text), so `ggufkit eval` on its default text measures on other tokens.

The engine is layer-major, so chunks go in passes: every chunk of a pass goes through all layers before
the pass counts. A pass collects into its own ImatrixStats, added to the totals only when it is complete;
so whatever stops the run (Ctrl-C, SIGTERM), the totals cover whole chunks. They are written every
`save_every` chunks (atomically, through ggufkit.cache), and on an interrupt before the exception goes on
(ImatrixInterrupted says which file covers how many chunks).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError
from ..gguf.reader import open_gguf
from .stats import ImatrixStats

__all__ = ["FORMATS", "ImatrixInterrupted", "ImatrixResult", "compute_imatrix"]

log = logging.getLogger(__name__)

FORMATS = ("gguf", "dat")
MIN_CTX = 16  # llama-imatrix ignores a (dense) matmul of fewer than 16 rows: shorter chunks could meet that
RESIDENT_BYTES = 1 << 29  # residual streams of one pass, as the engine's chunk_logits bounds them


@dataclass
class ImatrixResult:
    output: str
    format: str
    chunks: int  # chunks collected in this run
    chunk_count: int  # chunks the file covers (with the merged files')
    chunk_size: int
    entries: int
    tokens: int  # tokens of the text
    datasets: list[str]
    hessian: str | None = None
    hessian_bytes: int = 0
    seconds: float = 0.0


class ImatrixInterrupted(KeyboardInterrupt):
    """The run was interrupted; `result.output` (if not None) holds the statistics of the chunks done."""

    def __init__(self, result: ImatrixResult | None):
        super().__init__("interrupted")
        self.result = result


def _read_text(text) -> tuple[str, str]:
    from ..evaluation import CALIBRATION_NAME, calibration_text, read_text

    if text is None:
        return calibration_text(), CALIBRATION_NAME
    body, name = read_text(text)
    return (body[:-1] if body.endswith("\n") else body), name


@contextmanager
def _sigint_deferred():
    """Hold back SIGINT (raise it at the end of the block) while totals are updated and written, so an
    interrupt never leaves them half-added. Only from the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending:
            raise KeyboardInterrupt


def compute_imatrix(
    model: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    output_format: str | None = None,
    process_output: bool = False,
    save_every: int = 10,
    in_files: Iterable[str | os.PathLike] = (),
    hessian: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImatrixResult:
    """The importance matrix of `model` on `text`, written to `output` as llama-imatrix writes it.

    output: default `<model stem>.imatrix.<format>`; output_format: "gguf" or "dat" (default: "dat" if
    output ends in .dat, else "gguf"). in_files: imatrix files merged first (as --in-file); with in_files
    and no text, only the merge is written. hessian: a folder for every weight's input covariance X^T X
    (calibrate.hessian; its size is logged before the run). progress(chunks done, chunks) after each pass.
    """
    from ..engine import load_model, model_args
    from ..engine.numerics import blas_threads
    from ..engine.tokenizer import load_tokenizer
    from .hessian import hessian_bytes, write_hessians

    t0 = time.perf_counter()
    in_files = [os.fspath(f) for f in in_files]
    if output_format is None:
        output_format = "dat" if output is not None and os.fspath(output).endswith(".dat") else "gguf"
    if output_format not in FORMATS:
        raise CalibrationError(f"unknown output format {output_format!r} (known: {', '.join(FORMATS)})")
    if output is None:
        output = f"{Path(model).stem}.imatrix.{output_format}"
    if ctx < MIN_CTX:
        raise CalibrationError(
            f"--ctx must be at least {MIN_CTX}, got {ctx} (llama-imatrix skips matmuls of fewer rows)"
        )
    if save_every < 0:
        raise CalibrationError(f"--save-every must be >= 0, got {save_every}")
    if hessian is not None and in_files:
        raise CalibrationError(
            "--hessian cannot be combined with --in-file (imatrix files hold no covariances)"
        )
    stats = ImatrixStats(ctx, process_output=process_output, hessian=hessian is not None)
    for f in in_files:
        stats.load(f)
    result = ImatrixResult(os.fspath(output), output_format, 0, 0, ctx, 0, 0, [])

    def save(dataset: str | None) -> None:
        if not stats.sums:
            return
        if output_format == "gguf":
            stats.write_gguf(output)
        else:
            stats.write_dat(output, dataset=dataset)
        if hessian is not None:
            write_hessians(hessian, stats)
        result.chunk_count, result.entries = stats.chunk_count, len(stats.sums)
        result.datasets = list(stats.datasets)

    if text is None and in_files:  # merge only, as llama-imatrix without a prompt
        save(None)
        result.seconds = time.perf_counter() - t0
        return result

    with open_gguf(model) as g:
        args = model_args(g)  # an architecture the engine does not run stops here
        tok = load_tokenizer(g)
        if hessian is not None:
            result.hessian, result.hessian_bytes = (
                os.fspath(hessian),
                hessian_bytes(g, process_output=process_output),
            )
            log.info(
                "covariances: %d bytes (%.2f GiB) of float64 accumulators",
                result.hessian_bytes,
                result.hessian_bytes / 2**30,
            )
        has_output = any(t.name == "output.weight" for t in g.tensors)
    body, name = _read_text(text)
    ids = tok.encode(body)
    result.tokens = len(ids)
    if len(ids) < 2 * ctx:
        raise CalibrationError(
            f"{name}: the text has {len(ids)} tokens; a context of {ctx} needs at least {2 * ctx} "
            "(two chunks, as llama-imatrix requires)"
        )
    n_chunk = len(ids) // ctx if not chunks or chunks < 0 else min(chunks, len(ids) // ctx)
    inputs = np.asarray(ids[: n_chunk * ctx], dtype=np.int32).reshape(n_chunk, ctx)
    if tok.add_bos and tok.bos_id is not None:
        inputs[:, 0] = tok.bos_id
    stats.datasets.append(name)
    per_pass = max(1, RESIDENT_BYTES // (ctx * args.embedding_length * 4))
    if save_every:
        per_pass = min(per_pass, save_every)

    done = 0
    try:
        with blas_threads(threads), open_gguf(model) as g:
            engine = load_model(g)
            while done < n_chunk:
                k = min(per_pass, n_chunk - done)
                part = engine.observer = stats.empty_like()
                h = engine.hidden(inputs[done : done + k])
                if process_output and has_output:  # the final-norm hidden states are output's input
                    part("output.weight", h.reshape(-1, h.shape[-1]))
                engine.observer = None
                part.forget_last()
                with _sigint_deferred():
                    stats.add(part)
                    del part
                    saved_at = done // save_every if save_every else 0
                    done += k
                    result.chunks = done
                    if save_every and done // save_every > saved_at and done < n_chunk:
                        save(name)
                if progress:
                    progress(done, n_chunk)
        with _sigint_deferred():
            save(name)
    except KeyboardInterrupt:
        save(name)  # the totals: whole chunks only
        result.seconds = time.perf_counter() - t0
        if not stats.sums:
            result.output = None
        raise ImatrixInterrupted(result) from None
    result.seconds = time.perf_counter() - t0
    return result
