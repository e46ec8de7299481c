"""How much memory a model needs under llama.cpp: weights + KV cache + compute buffers + runtime overhead.

Read in pipeline order:
- model.py      ModelInfo: the shapes the estimate needs, however they were found;
- sources.py    load_source(): a GGUF (header and tensor table only) or a Hugging Face checkpoint folder
                (convert's dry run: the header of the F16 file it would write), else
  hf_config.py  a config.json with no weights (the converter's tensors for that config), or
  sizes.py      a bare size such as "7B" or "qwen2:1.5B", resolved to a family's typical shape;
- estimator.py  estimate(): each resident term as llama.cpp allocates it (the derivations are there);
- fit.py        fit_table(): every level x context against a RAM budget, and the budget itself.
"""

from .estimator import Estimate, cpu_repack_types, estimate, runtime_overhead
from .fit import (
    DEFAULT_CONTEXTS,
    DEFAULT_LEVELS,
    GIB,
    FitTable,
    available_memory,
    default_contexts,
    fit_table,
    format_table,
    parse_budget,
    parse_bytes,
)
from .model import ModelInfo, describe
from .sizes import parse_param_count
from .sources import load_source

__all__ = [
    "DEFAULT_CONTEXTS",
    "DEFAULT_LEVELS",
    "GIB",
    "Estimate",
    "FitTable",
    "ModelInfo",
    "available_memory",
    "cpu_repack_types",
    "default_contexts",
    "describe",
    "estimate",
    "fit_table",
    "format_table",
    "load_source",
    "parse_budget",
    "parse_bytes",
    "parse_param_count",
    "runtime_overhead",
]
