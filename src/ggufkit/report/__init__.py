"""The ladder report: one model quantized to every level, each level measured against the base, one table.

The model is a GGUF or a Hugging Face checkpoint folder. A folder is first converted (conversion.convert)
to a GGUF of the checkpoint's own dtype (F32, F16 or BF16: lossless, so the base is the checkpoint itself),
once: the file lives in the work folder, keyed by the sha256 of the folder's files and the converter's code,
and report.json's `source` says where it came from. From there on the folder's GGUF is the model.

For each level of the ladder (default Q8_0 ... Q2_K) `run_report`:
  1. quantizes the base with ggufkit's own quantizer (quantize.quantize_file; byte-identical to
     llama-quantize). The base is the user's F32/F16/BF16 GGUF as it is, or, for a quantized GGUF such as
     the default SmolLM2 Q4_1, its exact F32 dequantization (the faithful full-precision form of that file);
  2. evaluates the level against the base (evaluation.evaluate: PPL, mean KLD, same-top-token agreement);
  3. measures tokens/s: llama.cpp's own generation speed when llama-cpp-python is installed, otherwise the
     built-in numpy engine's prompt throughput (labelled as such in every output);
  4. estimates resident memory at 4K/8K/32K contexts (memory.estimate on the level's file).
Then it asks `pick` for this machine's recommendation and writes report.md, report.json, report.html and
report.png (size vs KLD and same-top agreement) into the output folder (default ./ggufkit-report/), with a
copy of report.json in cache_dir("reports")/<model sha256>/ where `ggufkit pick` finds it.

Notes on where the model departs from the textbook are computed from the plans and the files: tensors
that fell back to another type because their rows are not a multiple of the K-quant block, levels whose
tensors come out identical, a base that is itself a dequantized model, a context beyond the trained one.

Resumable and safe. Work lives in cache_dir("report-cache")/<model sha256[:16]>/ (for a folder,
hf-<content sha256[:16]>/, which also holds the converted model): the base, each level's
GGUF with a JSON record of its quantization (keyed by the base and the quantizer's code), and each level's
measurements (keyed by the level file's sha256, the base, the text, ctx, chunks and the engines). Every
file is written to a temporary name and renamed into place when complete, so an interrupt leaves either
the old file or the new one, never half of one; a re-run reuses everything already done.

Modules, in the order the run uses them: run.py (run_report and the table's rows), measure.py (the cached
steps: base, level, quality/speed/RAM), records.py (JSON records, cache keys), notes.py (the
computed notes), render.py (table text, report.md/png/html/json); with `optimize`, optimized.py (the
"LEVEL imatrix" and "LEVEL opt" rows beside each level that uses an importance matrix).
"""

from .measure import CONTEXTS, ReportError
from .render import format_table, render_html, render_markdown, render_png
from .run import (
    DEFAULT_CHUNKS,
    DEFAULT_CTX,
    DEFAULT_LEVELS,
    DEFAULT_OUT,
    QUICK_CHUNKS,
    QUICK_LEVELS,
    Report,
    ReportProgress,
    run_report,
)

__all__ = [
    "CONTEXTS",
    "DEFAULT_CHUNKS",
    "DEFAULT_CTX",
    "DEFAULT_LEVELS",
    "DEFAULT_OUT",
    "QUICK_CHUNKS",
    "QUICK_LEVELS",
    "Report",
    "ReportError",
    "ReportProgress",
    "format_table",
    "render_html",
    "render_markdown",
    "render_png",
    "run_report",
]
