"""The options several commands share, each defined once, and how their values reach the library.

Cheap to import (argparse and sys only): every command module imports it, `ggufkit quantize` too, whose
start-up is part of a small job's time.
"""

from __future__ import annotations

import sys


def add_text(p, help: str) -> None:
    """--text FILE: the UTF-8 text a command runs a model over (each command says which by default)."""
    p.add_argument("--text", metavar="FILE", help=help)


def add_chunk_options(p) -> None:
    """--ctx, --chunks, --threads: how a command runs a model over a text in chunks (eval, imatrix)."""
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most N chunks (default: all)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")


def chunk_args(args) -> dict:
    """The text and its chunking as the library functions take them (evaluate, compute_imatrix,
    run_report): keyword arguments text, ctx, chunks, threads."""
    return {"text": args.text, "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads}


def print_chunk_progress(phase: str, done: int, total: int) -> None:
    """One line on stderr, rewritten in place: `phase: chunk done/total` (a terminal only)."""
    end = "\n" if done == total else ""
    print(f"\r{phase}: chunk {done}/{total}", end=end, file=sys.stderr, flush=True)


def add_imatrix(p) -> None:
    """--imatrix FILE: an importance matrix in either of llama.cpp's formats (quantize, convert)."""
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama.cpp GGUF or legacy .dat)")


def repeatable(p, flag: str, metavar: str, help: str) -> None:
    """An option that may be given many times, collected in order into a list (empty when absent)."""
    p.add_argument(flag, action="append", default=[], metavar=metavar, help=f"{help} (repeatable)")
