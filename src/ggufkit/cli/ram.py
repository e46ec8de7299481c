"""`ggufkit ram SOURCE`: how much memory llama.cpp needs for a model, and what fits where."""

from __future__ import annotations

import json

from .. import memory


def add_parser(sub):
    p = sub.add_parser(
        "ram",
        help="memory llama.cpp needs: weights + KV cache + compute + overhead; what fits where",
        description=(
            "Estimate the resident memory llama.cpp needs to run a model (its defaults: batch 2048, ubatch "
            "512, f16 KV cache, flash attention on the CPU), and tabulate levels x contexts against a budget."
        ),
    )
    p.add_argument(
        "source",
        help="a GGUF file, a Hugging Face checkpoint folder (estimated as the GGUF `ggufkit convert --type "
        "F16` writes, no weight read), a config.json alone, or a size: 7B, qwen2:1.5B",
    )
    p.add_argument("--ctx", type=int, action="append", metavar="N", help="context size (repeatable)")
    p.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        dest="types",
        help="quantization level (llama-quantize TYPE), repeatable; default: a ladder F16..Q2_K",
    )
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"], help="K and V cache type")
    p.add_argument("--batch", type=int, default=2048, metavar="N", help="logical batch (llama.cpp -b)")
    p.add_argument("--ubatch", type=int, default=512, metavar="N", help="physical batch (llama.cpp -ub)")
    p.add_argument("--ram", metavar="SIZE", help="memory budget (16G, 8GiB, 512M, 16GB) or auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):10.1f} MiB"


def run(args) -> int:
    model = memory.load_source(args.source)
    ram = memory.parse_budget(args.ram) if args.ram else None
    contexts = args.ctx or memory.default_contexts(model)
    options = dict(kv_type=args.kv_type, n_batch=args.batch, n_ubatch=args.ubatch)
    own = [None] if model.kind == "gguf" else []
    levels = list(args.types) if args.types else own + list(memory.DEFAULT_LEVELS)
    first = memory.estimate(model, n_ctx=contexts[0], level=(args.types or own or [None])[0], **options)
    table = memory.fit_table(model, levels=levels, contexts=contexts, ram_bytes=ram, **options)
    if args.json:
        print(json.dumps({**first.to_dict(), "ram_bytes": ram, "table": table.to_dict()}, indent=2))
        return 0
    print(memory.describe(model))
    print(
        f"{first.level} at n_ctx {first.n_ctx} ({first.kv_cells} cells, {first.kv_type} K/V, "
        f"ubatch {first.n_ubatch}):"
    )
    repack = (
        f"  (incl. {first.weights_repacked_bytes / (1 << 20):.1f} MiB CPU repack copies)"
        if first.weights_repacked_bytes
        else ""
    )
    print(f"  weights   {_mib(first.weights_bytes)}{repack}")
    print(f"  KV cache  {_mib(first.kv_bytes)}")
    print(
        f"  compute   {_mib(first.compute_bytes + first.output_bytes)}"
        f"  (reserved {first.compute_reserved_bytes / (1 << 20):.1f} MiB, not all touched)"
    )
    print(f"  overhead  {_mib(first.overhead_bytes)}")
    print(f"  total     {_mib(first.total_bytes)}  (peak resident)")
    if first.reclaimable_bytes:
        print(
            f"  needed    {_mib(first.needed_bytes)}  (less the mapped pages of repacked tensors, which the "
            f"kernel can drop)"
        )
    print()
    print(memory.format_table(table))
    return 0
