"""ggufkit: take a full-precision model to the GGUF level that fits, and prove it with numbers.

The tree is the pipeline: gguf_file (I/O) -> quants (block formats) -> quantize.plan (per-tensor policy)
-> quantize (streaming pipeline) -> engine (forward pass) -> evaluate / memory / pick -> report.
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import ggufkit` stays cheap for the CLI
    if name == "quantize_file":
        from .quantize.job import quantize_file

        return quantize_file
    raise AttributeError(name)
