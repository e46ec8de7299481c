"""`ggufkit quantize [options] INPUT.gguf [OUTPUT.gguf] TYPE [THREADS]`: llama-quantize's command line.

Thin: parses, calls ggufkit.quantize.quantize_file, prints the plan (--dry-run) or a progress bar (on a
terminal only) and the final summary. Errors come back as GgufkitError: one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from ..errors import QuantizeError
from ..gguf.writer import WriteInterrupted
from .options import add_imatrix, repeatable

USAGE = "ggufkit quantize [options] [--optimize] INPUT.gguf [OUTPUT.gguf] TYPE [THREADS]"


def add_parser(sub):
    p = sub.add_parser(
        "quantize",
        help="quantize a GGUF file to a llama-quantize level, byte-identical to llama.cpp",
        usage=USAGE,
        description="Quantize INPUT.gguf to TYPE (Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_0, Q4_1, Q4_K_S, Q4_K_M, "
        "Q5_0, Q5_1, Q5_K_S, Q5_K_M, Q6_K, Q8_0, IQ4_NL, IQ4_XS, F16, BF16, F32; case-insensitive). "
        "OUTPUT defaults to <input stem>-<TYPE>.gguf beside the input; THREADS to all cores.",
    )
    p.add_argument("args", nargs="+", metavar="INPUT [OUTPUT] TYPE [THREADS]")
    add_imatrix(p)
    repeatable(p, "--include-weights", "NAME", "use imatrix entries whose name contains NAME only")
    repeatable(p, "--exclude-weights", "NAME", "ignore imatrix entries whose name contains NAME")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="ggml type for output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="ggml type for token_embd.weight")
    repeatable(p, "--tensor-type", "REGEX=TYPE", "type for tensors whose name matches REGEX (first wins)")
    p.add_argument("--pure", action="store_true", help="no mixture rules: every tensor gets the default type")
    p.add_argument("--leave-output-tensor", action="store_true", help="leave output.weight unquantized")
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="allow a quantized input (dequantized first; loses quality)",
    )
    repeatable(p, "--override-kv", "KEY=TYPE:VALUE", "set output metadata (TYPE: int, float, bool, str)")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="quantize tensors holding NaN/Inf instead of refusing them",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the per-tensor plan and sizes, write nothing"
    )
    o = p.add_argument_group(
        "optimize",
        "--optimize: each tensor's standard type chosen for the least calibrated damage within the size of "
        "llama-quantize's TYPE file (or --target-bpw / --target-size; TYPE may then be left out). "
        "Statistics: --imatrix FILE, or the built-in engine over --calib TEXT (default: the calibration "
        "half of the pydoc topics).",
    )
    o.add_argument("--optimize", action="store_true", help="calibrated per-tensor types (ggufkit's own)")
    o.add_argument("--calib", metavar="TEXT", help="text file to calibrate on (with --optimize)")
    o.add_argument("--target-bpw", type=float, metavar="X", help="size budget in bits per weight")
    o.add_argument("--target-size", type=int, metavar="BYTES", help="size budget of the tensor data")
    repeatable(o, "--exclude-type", "TYPE", "never use this tensor type")
    o.add_argument("--calib-chunks", type=int, metavar="N", help="calibrate on the first N chunks of 512")
    o.add_argument(
        "--kernel",
        choices=("standard", "refine", "feedback"),
        help="how each tensor is rounded at its type: llama.cpp's search (standard), that and then each "
        "block's scales refit (refine), or GPTQ-style error feedback on each weight's input covariance "
        "(feedback: calibrates itself, so not with --imatrix). Default: feedback, or standard with --imatrix",
    )
    p.set_defaults(func=run)


# Each job's own options: its keyword argument -> the parsed option (args.<dest>, --dest-with-dashes). Both
# take --imatrix and --allow-requantize; --allow-nonfinite is quantize_file's, and --optimize ignores it.
_QUANTIZE_ONLY = {
    "include_weights": "include_weights",
    "exclude_weights": "exclude_weights",
    "tensor_types": "tensor_type",
    "override_kv": "override_kv",
    "output_tensor_type": "output_tensor_type",
    "token_embedding_type": "token_embedding_type",
    "pure": "pure",
    "leave_output_tensor": "leave_output_tensor",
    "dry_run": "dry_run",
}
_OPTIMIZE_ONLY = {
    "calib": "calib",
    "target_bpw": "target_bpw",
    "target_size": "target_size",
    "chunks": "calib_chunks",
    "exclude_types": "exclude_type",
    "kernel": "kernel",
}


def _job_options(args, table: dict[str, str], other: dict[str, str], given, refusal: str) -> dict:
    """The job's own options as keyword arguments; the first of the other job's options given is refused."""
    for dest in other.values():
        if given(getattr(args, dest)):
            raise QuantizeError(f"--{dest.replace('_', '-')} {refusal}")
    return {kw: getattr(args, dest) for kw, dest in table.items()}


def _is_type(name: str) -> bool:
    from ..quantize.levels import level

    try:
        level(name)
    except Exception:
        return False
    return True


def _positionals(args: list[str]) -> tuple[str, str | None, str, int | None]:
    if len(args) < 2:
        raise QuantizeError(f"expected INPUT [OUTPUT] TYPE [THREADS]; usage: {USAGE}")
    src, rest = args[0], args[1:]
    dst = None
    if not _is_type(rest[0]):
        if len(rest) < 2:
            raise QuantizeError(f"unknown quantization type {rest[0]!r} (or missing TYPE after OUTPUT)")
        dst, rest = rest[0], rest[1:]
    qtype, rest = rest[0], rest[1:]
    if len(rest) > 1:
        raise QuantizeError(f"unexpected arguments after THREADS: {' '.join(rest[1:])}")
    threads = None
    if rest:
        try:
            threads = int(rest[0])
        except ValueError:
            raise QuantizeError(f"invalid THREADS {rest[0]!r} (expected a number)") from None
    return src, dst, qtype, threads


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class _Bar:
    """A tqdm progress bar over input bytes, on stderr; only when stderr is a terminal."""

    def __init__(self):
        self.bar = None

    def __call__(self, p) -> None:
        desc = f"[{p.index + 1}/{p.n_tensors}] {p.name}"
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=p.bytes_total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
        self.bar.set_description_str(desc, refresh=False)
        self.bar.update(p.bytes_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_plan(s) -> None:
    rows = []
    for i, tp in enumerate(s.plan.tensors):
        shape = "x".join(str(d) for d in tp.shape)
        src, dst = _type_name(tp.src_type), _type_name(tp.dst_type)
        rows.append((f"[{i + 1}/{len(s.plan.tensors)}]", tp.name, shape, f"{src} -> {dst}", str(tp.reason)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)] if rows else [0] * 4
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])


def _type_name(t) -> str:
    from ..gguf.types import GGMLQuantizationType

    return GGMLQuantizationType(int(t)).name


def _print_summary(s) -> None:
    if s.dry_run:
        print(f"{s.src} as {s.level} (dry run, nothing written)")
    else:
        print(f"{s.src} -> {s.dst} as {s.level} ({s.threads} threads)")
    print(
        f"  size:  {_mib(s.size_before)} -> {_mib(s.size_after)} "
        f"({s.bits_per_weight_before:.2f} -> {s.bits_per_weight:.2f} bits per weight)"
    )
    if s.file_size is not None:
        print(f"  file:  {s.file_size} bytes")
    if s.imatrix_entries:
        print(f"  imatrix: {s.imatrix_entries} entries")
    print(f"  time:  {s.seconds:.2f} s" + (f" ({s.kernels} kernels)" if s.kernels else ""))
    missing = s.plan.missing_imatrix() if s.dry_run else []
    if missing:
        print(
            f"  warning: a real run needs an importance matrix (--imatrix) for {len(missing)} tensors "
            f"(first: {missing[0].name})"
        )
    if s.fallbacks:
        print(f"  fallbacks: {len(s.fallbacks)} of {s.n_tensors} tensors")
        groups = defaultdict(list)
        for tp in s.fallbacks:  # grouped by the fallback itself: (wanted, used) and the row length
            groups[(tp.fallback, tp.shape[0])].append(tp)
        for tps in groups.values():
            names = [tp.name for tp in tps]
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            print(f"    {len(names):4d} x {tps[0].fallback_note}: {', '.join(names[:3])}{more}")


def _optimize_positionals(
    args: list[str], has_target: bool
) -> tuple[str, str | None, str | None, int | None]:
    """INPUT [OUTPUT] [TYPE] [THREADS]: TYPE may be left out when a target size is given."""
    if not args:
        raise QuantizeError(f"expected INPUT [OUTPUT] TYPE [THREADS]; usage: {USAGE}")
    src, rest = args[0], list(args[1:])
    dst = level = threads = None
    if rest and not _is_type(rest[0]) and not rest[0].isdigit():
        dst = rest.pop(0)
    if rest and _is_type(rest[0]):
        level = rest.pop(0)
    if rest and rest[0].isdigit():
        threads = int(rest.pop(0))
    if rest:
        raise QuantizeError(f"unexpected arguments: {' '.join(rest)} (unknown TYPE?)")
    if level is None and not has_target:
        raise QuantizeError("--optimize needs a TYPE (its size is the budget), --target-bpw or --target-size")
    return src, dst, level, threads


def _run_optimize(args) -> int:
    from ..optimize.job import optimize_file

    options = _job_options(args, _OPTIMIZE_ONLY, _QUANTIZE_ONLY, bool, "cannot be combined with --optimize")
    has_target = args.target_bpw is not None or args.target_size is not None
    src, dst, level, threads = _optimize_positionals(args.args, has_target)
    s = optimize_file(
        src,
        dst,
        level,
        imatrix=args.imatrix,
        threads=threads,
        allow_requantize=args.allow_requantize,
        **options,
    )
    print(f"{s.src} -> {s.dst} optimized" + (f" within {s.level}'s size" if s.level else ""))
    print(f"  size:  {_mib(s.size_after)} of a {_mib(s.budget)} budget ({s.bits_per_weight:.3f} bpw)")
    if s.reference_bytes is not None:
        print(f"  llama-quantize {s.level}: {_mib(s.reference_bytes)}")
    print(f"  file:  {s.file_size} bytes")
    print(f"  calibration: {s.calibration}; kernel: {s.kernel}")
    counts: dict[str, int] = {}
    for t in s.types.values():
        counts[t] = counts.get(t, 0) + 1
    print("  types: " + ", ".join(f"{n} x {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    print(f"  time:  {s.seconds:.2f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items()) + ")")
    return 0


def run(args) -> int:
    from ..quantize.job import quantize_file

    if args.optimize:
        return _run_optimize(args)
    # given: not None (a number may be 0), or a non-empty list (--exclude-type)
    options = _job_options(
        args, _QUANTIZE_ONLY, _OPTIMIZE_ONLY, lambda v: v not in (None, []), "needs --optimize"
    )
    src, dst, qtype, threads = _positionals(args.args)
    bar = _Bar() if sys.stderr.isatty() and not args.dry_run else None
    interrupted = None
    try:
        summary = quantize_file(
            src,
            dst,
            qtype,
            threads=threads,
            imatrix=args.imatrix,
            allow_requantize=args.allow_requantize,
            allow_nonfinite=args.allow_nonfinite,
            progress=bar,
            **options,
        )
    except WriteInterrupted as e:  # SIGTERM while writing: the partial file is gone, the destination intact
        interrupted = e
    finally:
        if bar is not None:
            bar.close()
    if interrupted is not None:
        print(f"ggufkit quantize: interrupted by {interrupted}; nothing written", file=sys.stderr)
        return 128 + interrupted.signum
    if args.dry_run:
        _print_plan(summary)
    _print_summary(summary)
    return 0
