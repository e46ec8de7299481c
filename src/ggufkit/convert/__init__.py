"""From a Hugging Face checkpoint folder to GGUF (`ggufkit convert`)."""

from __future__ import annotations

__all__ = ["convert"]


def __getattr__(name: str):
    if name == "convert":
        from .job import convert

        return convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
