"""The one console script. A table of subcommands; each module adds its parser and calls a library function.

No computing here: every subcommand module (cli/<name>.py) only parses arguments, calls the library and
prints. Library errors (ggufkit.errors.GgufkitError) become one line on stderr and exit status 2.

Start-up is part of every command's time (a small `ggufkit quantize` job is over in a fraction of a second),
so when the command line names a subcommand only that module is imported; `ggufkit --help`, no command or
an unknown one import them all, to list every subcommand with its help.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import GgufkitError

# name -> module under ggufkit.cli; each module defines add_parser(subparsers) that sets `func`.
COMMANDS = {
    "report": "report",
    "quantize": "quantize",
    "imatrix": "imatrix",
    "convert": "convert",
    "eval": "evaluate",
    "ram": "ram",
    "pick": "pick",
    "inspect": "inspect",
    "export": "export",
    "qat": "qat",
}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option), if known."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
        if arg == "--":
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: with every subcommand, or only `command`'s (the others are not imported)."""
    parser = argparse.ArgumentParser(
        prog="ggufkit",
        description="Quantize models to GGUF levels byte-identical to llama.cpp, measure what each level "
        "costs, and pick the one that fits.",
    )
    parser.add_argument("--version", action="version", version=f"ggufkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if command is not None and name != command:
            continue
        mod = importlib.import_module(f"{__name__}.{module}")
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_chosen(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GgufkitError as e:
        print(f"ggufkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ggufkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ggufkit inspect big.gguf | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# Commands whose process may end without tearing the interpreter down: once a quantize job has returned,
# its output is closed, fsynced and renamed, and nothing is left to clean up, while finalizing the
# interpreter (collecting and freeing every object and module) takes ~10 ms of a ~0.1 s small job.
_FAST_EXIT = ("quantize",)


def run() -> None:
    """The console script (and `python -m ggufkit`): main(), then exit with its status."""
    argv = sys.argv[1:]
    rc = main(argv)
    if _chosen(argv) in _FAST_EXIT:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
