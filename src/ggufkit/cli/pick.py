"""`ggufkit pick [SOURCE]`: one recommended level and why, for this machine, context and task."""

from __future__ import annotations

import json

from .. import memory
from .. import recommend as picker


def add_parser(sub):
    p = sub.add_parser(
        "pick",
        help="recommend a level for a memory budget, context and task",
        description=(
            "Recommend one quantization level from the memory headroom (ggufkit ram's estimate), the task's "
            "quality floor and, when ggufkit has a report for the model, its measured quality. Exit status 1 "
            "when nothing fits (the output says what would)."
        ),
    )
    p.add_argument("source", nargs="?", help="GGUF, Hugging Face folder or size (7B); default: SmolLM2-135M")
    p.add_argument(
        "--ram", default="auto", metavar="SIZE", help="memory budget (16G, 8GiB) or auto (default)"
    )
    p.add_argument("--task", default="chat", choices=picker.TASKS)
    p.add_argument("--ctx", type=int, default=4096, metavar="N", help="context size (default 4096)")
    p.add_argument(
        "--report", metavar="PATH", help="a ggufkit report.json (or its folder) with measured quality"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.source is None:
        from ..models import default_model_path

        args.source = str(default_model_path())
    model = memory.load_source(args.source)
    ram = memory.parse_budget(args.ram)
    if args.report:
        report = picker.load_report(args.report)
    else:
        report = picker.find_report(model.path) if model.kind == "gguf" else None
    result = picker.pick(model, ram_bytes=ram, task=args.task, n_ctx=args.ctx, report=report)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.reason)
        for tip in result.suggestions:
            print(f"  - {tip}")
    return 0 if result.level else 1
