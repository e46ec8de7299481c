"""`ggufkit report [MODEL]`: the quantization ladder of a model, measured on this machine, as one table."""

from __future__ import annotations

import re
import sys

from .. import report as rep
from ..models import DEFAULT_MODEL, MODELS
from ..recommend import TASKS
from .options import add_imatrix, add_text, chunk_args


def add_parser(sub):
    p = sub.add_parser(
        "report",
        help="quantize a model to every level, measure each, print the table and a recommendation",
        description=(
            "Quantize MODEL (a F32/F16/BF16 GGUF; a quantized GGUF is first dequantized to F32; a "
            "Hugging Face checkpoint folder is first converted, once, to a GGUF of its own dtype; or a known "
            f"model by --model NAME; default: {DEFAULT_MODEL}) to each level, measure perplexity, KL "
            "divergence, same-top-token agreement, tokens/s and RAM against the full-precision base, and "
            "write report.md, report.json, report.html and report.png. Work is cached: a re-run reuses what "
            "is done."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        help=f"GGUF file or Hugging Face checkpoint folder (default: --model {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--model",
        dest="known_model",
        choices=tuple(MODELS),
        metavar="NAME",
        help=f"a known model instead of a file, fetched and cached: {', '.join(MODELS)}",
    )
    p.add_argument(
        "--levels",
        metavar="L1,L2",
        help=f"comma-separated levels (default: {','.join(rep.DEFAULT_LEVELS)}; "
        f"with --quick: {','.join(rep.QUICK_LEVELS)})",
    )
    add_text(p, "UTF-8 text to measure on (default: Python's pydoc topics)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"where report.md/json/html/png go (default: ./{rep.DEFAULT_OUT}; level files stay cached)",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"fewer levels and {rep.QUICK_CHUNKS} chunks (a few minutes)"
    )
    p.add_argument("--ctx", type=int, default=rep.DEFAULT_CTX, metavar="N", help="tokens per chunk (512)")
    p.add_argument(
        "--chunks",
        type=int,
        metavar="N",
        help=f"chunks of text to score (default {rep.DEFAULT_CHUNKS}, --quick {rep.QUICK_CHUNKS})",
    )
    p.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "builtin", "llama.cpp"),
        help="engine for the quality numbers (auto: llama.cpp when llama-cpp-python is installed)",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="threads (default: the cores not busy elsewhere, at least 1)"
    )
    p.add_argument("--task", default="chat", choices=TASKS, help="task for the recommendation (ggufkit pick)")
    _add_optimize_options(p)
    p.set_defaults(func=run)


def _add_optimize_options(p) -> None:
    o = p.add_argument_group(
        "calibrated rows",
        "--optimize: after each level that uses an importance matrix (not Q8_0), 'LEVEL imatrix' "
        "(llama-quantize --imatrix's file) and 'LEVEL opt' (ggufkit quantize --optimize's, no larger than "
        "LEVEL's file), both from --imatrix FILE or, by default, one computed on the calibration half of "
        "the pydoc topics.",
    )
    o.add_argument("--optimize", action="store_true", help="add the calibrated rows")
    add_imatrix(o)
    o.add_argument(
        "--calib-chunks", type=int, metavar="N", help="chunks of 512 tokens to calibrate on (default 16)"
    )
    o.add_argument(
        "--weighting", default="perturb", metavar="W", help="the optimizer's tensor weighting: perturb, none"
    )


class _Progress:
    """A tqdm bar over the steps (base, then one per level) on a terminal; one line per step otherwise."""

    def __init__(self):
        self.bar = None
        self.last = (-1, "")
        self.tty = sys.stderr.isatty()

    def __call__(self, p: rep.ReportProgress) -> None:
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=p.n_steps,
                    unit="step",
                    file=sys.stderr,
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]",
                )
            self.bar.n = p.index + p.fraction
            self.bar.set_description(f"{p.level}: {p.label}", refresh=False)
            self.bar.refresh()
        elif (p.index, re.sub(r"\d+", "", p.label)) != self.last:
            self.last = (p.index, re.sub(r"\d+", "", p.label))
            print(f"[{p.index + 1}/{p.n_steps}] {p.level}: {p.label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    levels = [s.strip() for s in args.levels.split(",") if s.strip()] if args.levels else None
    if args.model and args.known_model:
        raise rep.ReportError(f"give a GGUF file or --model {args.known_model}, not both")
    progress = _Progress()
    try:
        result = rep.run_report(
            args.model or args.known_model,
            levels=levels,
            out=args.out,
            quick=args.quick,
            engine=args.engine,
            task=args.task,
            **chunk_args(args),
            progress=progress,
            optimize=args.optimize,
            imatrix=args.imatrix,
            calib_chunks=args.calib_chunks,
            weighting=args.weighting,
        )
    finally:
        progress.close()
    data = result.data
    print(rep.format_table(data))
    print()
    rec = data["recommendation"]
    print(f"Recommended for this machine ({args.task}, n_ctx {rec['n_ctx']}): {rec['reason']}")
    for tip in rec["suggestions"]:
        print(f"  - {tip}")
    print()
    for note in data["notes"]:
        print(f"- {note}")
    print()
    print(f"Written: {', '.join(str(result.files[k]) for k in ('md', 'json', 'html', 'png'))}")
    return 0
