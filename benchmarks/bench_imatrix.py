"""`ggufkit imatrix` vs llama-imatrix: tokens/s on the same model, text, context, chunks and threads.

    PYTHONPATH=src python -m benchmarks.bench_imatrix [MODEL.gguf ...] [--ctx 512] [--chunks 8] [--threads 2]
                                                      [--repeat 2]

from the repository root (the helpers are imported as tests.helpers).

Default model: SmolLM2-135M F16 (made by llama.cpp from the default model). Both programs read the same
text file (the calibration half of the pydoc topics, evaluation.calibration_text, which `ggufkit imatrix`
uses by default), -c ctx --chunks N -t threads, and write a GGUF imatrix to a temporary folder. Each is
run as a fresh process and timed from its start to its exit (wall clock), so model loading, tokenization
and writing the file count for both, and so does Python's start for ours. The two alternate `--repeat`
times and the best run of each is kept. tokens/s = chunks * ctx / seconds.

llama-imatrix runs with --no-ppl (as the tests run it) and OMP_WAIT_POLICY left as the environment has it;
it still computes the output logits of every token (imatrix.cpp asks for all outputs), a 49152 x 576
product per token on SmolLM2 that `ggufkit imatrix` leaves out unless --process-output asks for
output.weight's statistics (then it needs only the final-norm hidden states, never the logits).
The BLAS library numpy uses and its kernel (threadpoolctl, when installed) are printed first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_models() -> list[Path]:
    from ggufkit.models import default_model_path
    from tests.helpers.llama_programs import base_model

    return [base_model(default_model_path(), "F16")]


def blas_kernel() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    import numpy  # noqa: F401  (loads its BLAS)

    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i['internal_api']} {i['version']} {i.get('architecture')}" for i in infos) or "none"


def run_timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from ggufkit.evaluation import calibration_text
    from tests.helpers.llama_programs import tool

    models = [Path(m) for m in args.models] or default_models()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cpus, "
        f"threads={args.threads}, "
        f"load average {os.getloadavg()[0]:.1f}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}, "
        f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}; numpy's BLAS: {blas_kernel()}"
    )
    print(f"ctx {args.ctx}, {args.chunks} chunks, best of {args.repeat}, timed from process start to exit")
    print(f"{'model':<48} {'ggufkit t/s':>12} {'llama-imatrix t/s':>18} {'ratio':>7}")
    imatrix = str(tool("llama-imatrix"))
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "calibration.txt"
        text.write_text(calibration_text() + "\n", encoding="utf-8")  # both drop one trailing newline
        common = ["-c", str(args.ctx), "--chunks", str(args.chunks)]
        for path in models:
            theirs_cmd = [imatrix, "-m", str(path), "-f", str(text), *common, "-t", str(args.threads)]
            theirs_cmd += ["--no-ppl", "--output-format", "gguf", "-o", str(Path(tmp) / "theirs.gguf")]
            ours_cmd = [sys.executable, "-m", "ggufkit", "imatrix", str(path), "--text", str(text)]
            ours_cmd += ["--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", str(args.threads)]
            ours_cmd += ["-o", str(Path(tmp) / "ours.gguf")]
            ours, theirs, loads = [], [], []
            for _ in range(args.repeat):
                loads.append(os.getloadavg()[0])
                theirs.append(run_timed(theirs_cmd))
                ours.append(run_timed(ours_cmd))
            n = args.ctx * args.chunks
            a, b = n / min(ours), n / min(theirs)
            print(f"{path.name:<48} {a:>12.1f} {b:>18.1f} {a / b:>6.2f}x", flush=True)
            print(
                f"  seconds ours {[round(s, 2) for s in ours]}, "
                f"llama-imatrix {[round(s, 2) for s in theirs]}, "
                f"load averages {[round(x, 1) for x in loads]}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
