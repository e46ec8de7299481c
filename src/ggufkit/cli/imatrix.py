"""`ggufkit imatrix MODEL.gguf [--text FILE] [-o OUT] ...`: llama-imatrix's importance matrix, computed by
the built-in engine.

Thin: parses, calls ggufkit.calibrate.compute_imatrix, prints what was written. Errors come back as
GgufkitError: one line on stderr, exit status 2; Ctrl-C writes the chunks done and exits with 130.
"""

from __future__ import annotations

import sys
from functools import partial

from .options import add_chunk_options, add_text, chunk_args, print_chunk_progress


def add_parser(sub):
    p = sub.add_parser(
        "imatrix",
        help="compute an importance matrix (llama-imatrix's GGUF or legacy .dat) for --imatrix",
        description="Run MODEL over a text and collect, for every matrix multiplication of the blocks, the "
        "sum of squared inputs per column and the rows seen (per expert for mixture-of-experts weights), "
        "as llama-imatrix does; written in its GGUF imatrix format (or the legacy .dat) for "
        "`ggufkit quantize --imatrix` and `llama-quantize --imatrix`. The default text is the second half "
        "of Python's pydoc topics (from 'id-classes' on); `ggufkit eval` reads the first half.",
    )
    p.add_argument("model", metavar="MODEL.gguf")
    add_text(p, "UTF-8 calibration text (default: pydoc topics, 2nd half)")
    p.add_argument("-o", "--output", metavar="OUT", help="output file (default <model stem>.imatrix.gguf)")
    p.add_argument(
        "--output-format",
        choices=("gguf", "dat"),
        default=None,
        help="gguf (default) or the legacy dat (default dat when OUT ends in .dat)",
    )
    add_chunk_options(p)
    p.add_argument("--process-output", action="store_true", help="collect output.weight too")
    p.add_argument(
        "--save-every",
        type=int,
        default=10,
        metavar="N",
        help="write OUT every N chunks (default 10; 0: at end)",
    )
    p.add_argument(
        "--in-file",
        action="append",
        default=[],
        metavar="F",
        help="merge this imatrix first (repeatable; without --text only the merge is written)",
    )
    p.add_argument(
        "--hessian",
        metavar="DIR",
        help="also write each weight's input covariance X^T X (float64, upper triangle) into DIR",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibrate import ImatrixInterrupted, compute_imatrix
    from ..calibrate.hessian import hessian_bytes
    from ..gguf.reader import open_gguf

    if args.hessian is not None:
        with open_gguf(args.model) as g:
            n = hessian_bytes(g, process_output=args.process_output)
        print(f"covariances: {n} bytes ({n / 2**30:.2f} GiB) of float64 accumulators", file=sys.stderr)
    try:
        r = compute_imatrix(
            args.model,
            output=args.output,
            **chunk_args(args),
            output_format=args.output_format,
            process_output=args.process_output,
            save_every=args.save_every,
            in_files=args.in_file,
            hessian=args.hessian,
            progress=partial(print_chunk_progress, "imatrix") if sys.stderr.isatty() else None,
        )
    except ImatrixInterrupted as e:
        r = e.result
        if r is not None and r.output is not None:
            print(f"ggufkit imatrix: interrupted; {r.output} covers {r.chunk_count} chunks", file=sys.stderr)
        else:
            print("ggufkit imatrix: interrupted before the first chunk; nothing written", file=sys.stderr)
        return 130
    print(
        f"{r.output}: {r.format}, {r.entries} entries, {r.chunk_count} chunks of {r.chunk_size} tokens "
        f"({r.chunks} computed, datasets: {', '.join(r.datasets)})"
    )
    if r.hessian:
        print(f"{r.hessian}: covariances of {r.entries} weights")
    return 0
