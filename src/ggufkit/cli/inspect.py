"""`ggufkit inspect FILE.gguf [--tensors] [--json]`: what a GGUF file holds (nothing in it is run)."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser(
        "inspect",
        help="show a GGUF file's metadata, tokenizer, chat template, tensor types and bits per weight",
        description="Validate a GGUF file and show what it holds: format, metadata (long arrays summarised), "
        "architecture hyper-parameters, tokenizer, chat template (shown, never run), size by tensor type, "
        "bits per weight and the quantization level. A malformed file gives one error line and exit 2.",
    )
    p.add_argument("file", metavar="FILE.gguf", help="the GGUF file")
    p.add_argument("--tensors", action="store_true", help="also list every tensor (shape, type, bytes, bpw)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inspect import format_inspect, inspect_gguf

    info = inspect_gguf(args.file, tensors=args.tensors)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    return 0
