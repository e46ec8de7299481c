"""Hugging Face checkpoints ⇄ GGUF.

    convert(hf_dir, dst, type="F16")         a checkpoint folder to GGUF at any level, one pass (job.py)
    export(gguf_path, hf_dir, dtype="f32")   a GGUF back to a folder transformers loads (export.py)

Imports are lazy, as in ggufkit/__init__.py: importing the package loads none of its modules.
"""

# public name -> (module under ggufkit.convert, attribute)
_API = {
    "convert": ("job", "convert"),
    "ConvertSummary": ("job", "ConvertSummary"),
    "export": ("export", "export"),
    "ExportError": ("export", "ExportError"),
    "ExportSummary": ("export", "ExportSummary"),
}

__all__ = list(_API)


def __getattr__(name):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'ggufkit.convert' has no attribute {name!r}") from None
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
