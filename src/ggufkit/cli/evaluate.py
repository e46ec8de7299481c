"""`ggufkit eval MODEL.gguf [--base BASE.gguf] ...`: perplexity, and with a base KLD / same-top / Δp.

Thin: parses, calls ggufkit.evaluation.evaluate, prints a llama-perplexity-like summary or one JSON object.
"""

from __future__ import annotations

import sys

from .options import add_chunk_options, add_text, chunk_args, print_chunk_progress


def add_parser(sub):
    p = sub.add_parser(
        "eval",
        help="measure perplexity, and KL divergence / same-top agreement against a full-precision base",
        description="Perplexity of MODEL on a text (default: Python's pydoc topics, offline), computed as "
        "llama-perplexity does: chunks of --ctx tokens, the second half of each scored. With --base, also "
        "the base perplexity, PPL ratio and difference, KL divergence (mean, percentiles), same-top-token "
        "agreement and RMS Δp, as llama-perplexity --kl-divergence reports them. The base's per-token "
        "results are cached, so a ladder of levels runs the base once.",
    )
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--base", metavar="BASE.gguf", help="full-precision reference (same vocabulary)")
    add_text(p, "UTF-8 text to score (default: pydoc_data.topics)")
    add_chunk_options(p)
    p.add_argument(
        "--engine",
        choices=("builtin", "llama.cpp"),
        default="builtin",
        help="builtin numpy engine, or llama.cpp through llama-cpp-python (default builtin)",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute the base even if it is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import evaluate

    res = evaluate(
        args.model,
        base=args.base,
        **chunk_args(args),
        engine=args.engine,
        use_cache=not args.no_cache,
        progress=print_chunk_progress if sys.stderr.isatty() and not args.json else None,
    )
    if args.json:
        print(res.to_json())
        return 0
    print(f"model   : {res.model}")
    print(
        f"text    : {res.text} ({res.chunks} chunks of {res.ctx} tokens, {res.tokens} scored, "
        f"engine {res.engine})"
    )
    print(f"PPL     : {res.ppl:.4f} ± {res.ppl_err:.4f}")
    if res.base is not None:
        cached = " (cached)" if res.base_cached else ""
        print(f"base    : {res.base}{cached}")
        print(f"PPL(base)            : {res.base_ppl:.4f} ± {res.base_ppl_err:.4f}")
        print(f"PPL(Q)/PPL(base)     : {res.ppl_ratio:.6f} ± {res.ppl_ratio_err:.6f}")
        print(f"PPL(Q)-PPL(base)     : {res.ppl_diff:.6f} ± {res.ppl_diff_err:.6f}")
        print(f"Mean KLD             : {res.kld_mean:.6f} ± {res.kld_err:.6f}")
        print(
            f"KLD median/90/99/max : {res.kld_median:.6f} / {res.kld_p90:.6f} / {res.kld_p99:.6f} / "
            f"{res.kld_max:.6f}"
        )
        print(f"Same top token       : {res.same_top:.3f} ± {res.same_top_err:.3f} %")
        print(f"RMS Δp               : {res.rms_dp:.3f} ± {res.rms_dp_err:.3f} %")
    for k, v in res.speed.items():
        print(f"{k:<32}: {v:.1f}")
    return 0
