"""`ggufkit convert HF_DIR [OUT.gguf] [--type TYPE] [--imatrix FILE] [--threads N] [--dry-run]`.

Thin: parses, calls ggufkit.conversion.convert, prints a summary. OUT defaults to <folder>-<TYPE>.gguf beside
the checkpoint folder (never inside it). Errors come back as GgufkitError: one line on stderr, exit 2.
"""

from __future__ import annotations

from ..errors import ConvertError
from .options import add_imatrix


def add_parser(sub):
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face checkpoint folder to GGUF (any level), byte-identical to llama.cpp",
        description="Convert HF_DIR (config.json, *.safetensors, tokenizer files) to GGUF in one streaming "
        "pass. --type F32, F16, BF16 or Q8_0 writes what convert_hf_to_gguf.py --outtype writes; any other "
        "llama-quantize level (Q4_K_M, Q6_K, IQ4_XS, ...) what convert_hf_to_gguf.py at the checkpoint's "
        "dtype followed by llama-quantize writes. OUT defaults to <folder>-<TYPE>.gguf beside HF_DIR.",
    )
    p.add_argument("src", metavar="HF_DIR")
    p.add_argument("dst", metavar="OUT.gguf", nargs="?")
    p.add_argument("--type", default="F16", metavar="TYPE", help="F32, F16 (default), BF16, Q8_0 or a level")
    add_imatrix(p)
    p.add_argument("--threads", type=int, metavar="N", help="worker threads (default: all cores)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..conversion.job import convert

    if args.threads is not None and args.threads < 1:
        raise ConvertError(f"--threads must be at least 1, got {args.threads}")
    s = convert(args.src, args.dst, type=args.type, imatrix=args.imatrix, threads=args.threads,
                dry_run=args.dry_run)  # fmt: skip
    if s.dry_run:
        for name, t in s.tensor_types.items():
            print(f"{name:40s} {t}")
    mib = s.size_after / (1 << 20)
    what = "would write" if s.dry_run else f"wrote {s.dst}"
    print(
        f"{s.architecture} ({s.arch}, {s.source_dtype}) -> {s.type}: {what}; {s.n_tensors} tensors, "
        f"{mib:.2f} MiB, {s.bits_per_weight:.2f} bpw"
        + ("" if s.dry_run else f", {s.seconds:.2f} s on {s.threads} thread(s)")
    )
    if s.fallbacks:
        print(f"{len(s.fallbacks)} tensor(s) stored in another type (row length): {', '.join(s.fallbacks)}")
    return 0
