"""`ggufkit quantize --optimize` against llama-imatrix + llama-quantize at the same sizes, one run.

    PYTHONPATH=src python -m benchmarks.bench_optimize [--model smollm2|gemma3]
        [--levels Q4_K_M,Q3_K_M,Q2_K] [--chunks 16] [--eval-chunks 8] [--exclude TYPE,...]
        [--weighting perturb,none | --variants ALLOCATION/KERNEL,...] [--stats calib|llama|ours]
        [--base f32|offgrid[:SEED[:SIZE]]] [--work DIR]

from the repository root (the helpers are imported as tests.helpers).

The input is SmolLM2-135M (or with --model gemma3, Gemma 3 270M) made F32 by llama.cpp from the shipped
quantized file (Q4_1; Gemma 3's Q4_K_M). Both sides calibrate on the same
file (evaluation.calibration_text, `--chunks` chunks of 512 tokens): llama-imatrix, then llama-quantize
--imatrix at each level (both timed, uncached); ggufkit's optimize_file at each level, on its own statistics
(--stats calib: the built-in engine over the same text, in every job) or on llama-imatrix's file (--stats
llama), or (--stats ours) on one run of the built-in engine over the same text that also keeps each weight's
input covariance, shared by every variant (its time is added to each variant's). Every
file is scored by ggufkit.evaluate against the F32 base on the held-out default text (the first half of the
topics; `--eval-chunks` chunks of 512). Printed: sizes, seconds, mean KLD and the ratio ours / llama's.

Because the F32 base is the shipped Q4_1 file dequantized, Q4_1 and Q5_1 re-encode it exactly (zero
error); `--exclude Q4_1,Q5_1` takes them out of the candidates so that the comparison is about quantizing
weights, not about recovering the shipped grid.

`--base offgrid[:SEED[:SIZE]]` (seed 0, size 0.5 by default) measures against the off-grid base instead:
that F32 with seeded noise below each block's own quantization step added to every quantized weight
(tests.helpers.offgrid: uniform in +-SIZE x the block's d), so that no grid reproduces it; Q4_1 and Q5_1 then
need not be excluded. Both sides calibrate on, quantize and are scored against the same base.

--variants (the ablation): each ALLOCATION/KERNEL pair is one optimize_file job per level. ALLOCATION:
perturb or none (the per-tensor allocation with that weighting) or plan (llama-quantize's own types for the
level, allocation=False); KERNEL: standard (libggml's kernels with the importance vector), refine (then each
block's scales refit, refine.py) or feedback (GPTQ-style error feedback, feedback.py: needs --stats ours or
calib). `--weighting W,...` is `--variants W/standard,...`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--exclude", default="")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--weighting", default="perturb", help="comma-separated: perturb, none")
    ap.add_argument("--variants", default=None, help="comma-separated ALLOCATION/KERNEL (see the docstring)")
    ap.add_argument("--stats", choices=("calib", "llama", "ours"), default="calib")
    ap.add_argument("--base", default="f32", help="f32 (the shipped file's own) or offgrid[:SEED[:SIZE]]")
    ap.add_argument("--work", default=None, help="folder for the files (default: a temporary one)")
    a = ap.parse_args()

    from ggufkit import evaluate, quants
    from ggufkit.calibrate import compute_imatrix
    from ggufkit.evaluation import calibration_text
    from ggufkit.models import default_model_path, model_path
    from ggufkit.optimize.job import optimize_file
    from tests.helpers.llama_programs import base_model, tool
    from tests.helpers.offgrid import offgrid_base, parse_base

    quants.set_threads(2)
    kind, seed, size = parse_base(a.base)
    src = default_model_path() if a.model == "smollm2" else model_path("gemma3-270m")
    if kind == "offgrid":
        base = offgrid_base(src, seed=seed, size=size)
    else:
        base = base_model(src, "F32")
    spec = a.variants or ",".join(f"{w}/standard" for w in a.weighting.split(","))
    variants = [(v.split("/") + [""])[:3] for v in spec.split(",")]  # ALLOCATION/KERNEL[/MEASURE_KERNEL]
    for v in variants:
        if (
            v[0] not in ("perturb", "none", "plan")
            or v[1] not in ("standard", "refine", "feedback")
            or v[2] not in ("", "standard", "refine", "feedback")
        ):
            raise SystemExit(f"bad variant {'/'.join(v)!r}: ALLOCATION/KERNEL, see the docstring")
        if v[1] == "feedback" and a.stats == "llama":
            raise SystemExit("the feedback kernel needs covariances: --stats ours or calib")
    print(f"base: {base}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-optimize-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.txt"
    calib.write_text(calibration_text() + "\n", encoding="utf-8")  # both readers drop one final newline
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    print(f"load average at start: {os.getloadavg()}")

    imx = work / "llama.imatrix.gguf"
    t0 = time.perf_counter()
    subprocess.run(
        [str(tool("llama-imatrix")), "-m", str(base), "-f", str(calib), "-c", "512",
         "--chunks", str(a.chunks), "-t", "2", "--no-ppl", "-o", str(imx)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    t_imatrix = time.perf_counter() - t0
    print(f"llama-imatrix: {t_imatrix:.1f} s")
    t_ours_stats = 0.0
    if a.stats == "ours":
        ours_imx, hess = work / "ours.imatrix.gguf", work / "hessian"
        t0 = time.perf_counter()
        compute_imatrix(base, output=ours_imx, text=calib, ctx=512, chunks=a.chunks, threads=2, save_every=0,
                        hessian=hess)  # fmt: skip
        t_ours_stats = time.perf_counter() - t0
        print(f"ggufkit calibration with covariances: {t_ours_stats:.1f} s")
    rows = []
    for level in a.levels.split(","):
        ref = work / f"llama-{level}.gguf"
        t0 = time.perf_counter()
        subprocess.run(
            [str(tool("llama-quantize")), "--imatrix", str(imx), str(base), str(ref), level, "2"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        t_ref = t_imatrix + time.perf_counter() - t0
        e_ref = evaluate(ref, base=base, chunks=a.eval_chunks, threads=2)
        for allocation, kernel, measure_kernel in variants:
            ours = work / f"opt-{level}-{allocation}-{kernel}{measure_kernel and '-' + measure_kernel}.gguf"
            options = {"exclude_types": [e for e in a.exclude.split(",") if e], "threads": 2,
                       "chunks": a.chunks, "kernel": kernel, "allocation": allocation != "plan",
                       "measure_kernel": measure_kernel or None,
                       "weighting": "none" if allocation == "plan" else allocation}  # fmt: skip
            if a.stats == "llama":
                options["imatrix"] = imx
            elif a.stats == "ours":
                options.update(imatrix=ours_imx, hessian=hess)
            else:
                options["calib"] = calib
            s = optimize_file(base, ours, level, **options)
            seconds = s.seconds + t_ours_stats
            e_opt = evaluate(ours, base=base, chunks=a.eval_chunks, threads=2)
            name = f"{level} {allocation}/{kernel}" + (f"/{measure_kernel}" if measure_kernel else "")
            rows.append((name, ref.stat().st_size, ours.stat().st_size, t_ref, seconds, e_ref, e_opt, s))
            print(
                f"{name}: llama {ref.stat().st_size} B KLD {e_ref.kld_mean:.5f} ({t_ref:.1f} s) | "
                f"ours {ours.stat().st_size} B KLD {e_opt.kld_mean:.5f} ({seconds:.1f} s, {s.timings}) | "
                f"KLD ratio {e_opt.kld_mean / e_ref.kld_mean:.3f} | time ratio {seconds / t_ref:.2f} | "
                f"same-top {e_ref.same_top:.2f} / {e_opt.same_top:.2f} | "
                f"KLD p99 {e_ref.kld_p99:.5f} / {e_opt.kld_p99:.5f} | PPL {e_ref.ppl:.3f} / {e_opt.ppl:.3f} "
                f"(base {e_ref.base_ppl:.3f}) | "
                f"types {dict(Counter(s.types[n] for n in s.types))}",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()}")
    print("\n| level | llama-quantize bytes | ours bytes | llama KLD | ours KLD | KLD ratio | "
          "KLD p99 llama / ours | PPL llama / ours | same-top llama / ours | "
          "seconds llama / ours |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level, rb, ob, tr, to, er, eo, _ in rows:
        print(
            f"| {level} | {rb} | {ob} | {er.kld_mean:.5f} | {eo.kld_mean:.5f} | "
            f"{eo.kld_mean / er.kld_mean:.3f} | {er.kld_p99:.4f} / {eo.kld_p99:.4f} | "
            f"{er.ppl:.3f} / {eo.ppl:.3f} | {er.same_top:.2f} / {eo.same_top:.2f} | {tr:.1f} / {to:.1f} |"
        )
    if rows:
        print(f"base PPL {rows[0][5].base_ppl:.3f}")


if __name__ == "__main__":
    main()
