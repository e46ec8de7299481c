"""Quantization-aware training vs post-training quantization on SmolLM2-135M-Instruct (issue 16 item 4).

The full-precision model is the default model's F32 export (ggufkit.export of the Q4_1 GGUF at float32:
its dequantized weights exactly), and its F32 GGUF (convert --type F32) is the evaluation base. Per level:
  PTQ        convert(HF_F32, --type LEVEL)
  imatrix    convert(HF_F32, --type LEVEL, --imatrix I), I = compute_imatrix(F32 GGUF) on the
             calibration half of the pydoc topics (--imatrix-chunks chunks of 512)
  QAT        qat.train(HF_F32, level=LEVEL) on the same calibration text for a wall-clock budget
             (--budget seconds; the steps reached are reported), then convert(OUT, --type LEVEL)
  optimize   ggufkit's calibrated quantization (issue 15): optimize_file(F32 GGUF, LEVEL, imatrix=I),
             Q4_1 and Q5_1 excluded (they re-encode this base, the shipped Q4_1 dequantized, exactly)
each evaluated against the F32 base on the held-out first half of the topics (evaluate()'s default text,
never trained or calibrated on): mean KLD ± its error, PPL, same-top. Goal: QAT's mean KLD <= 0.6 x PTQ's.

    OMP_WAIT_POLICY=passive PYTHONPATH=src python -m benchmarks.bench_qat [--levels Q4_0,Q3_K_M]
        [--budget 1200] [--steps 80] [--lr 1e-4] [--ctx 128] [--chunks 20] [--work DIR]
        [--methods ptq,imatrix,qat,optimize]

Results (one JSON line per evaluated file) go to DIR/results.jsonl as they are measured, and a table to
stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import ggufkit
from ggufkit.cache import cache_dir
from ggufkit.evaluation import calibration_text


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _engine() -> str:
    try:
        import llama_cpp  # noqa: F401

        return "llama.cpp"
    except ImportError:
        return "builtin"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="Q4_0,Q3_K_M")
    ap.add_argument("--budget", type=float, default=1200.0, help="QAT seconds per level (<= 1200)")
    ap.add_argument("--steps", type=int, default=80, help="planned steps (the schedule's length)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=20, help="evaluation chunks of 512 (held-out text)")
    ap.add_argument("--imatrix-chunks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--methods", default="ptq,imatrix,qat", help="of ptq,imatrix,qat,optimize")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else cache_dir("bench", "qat")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "results.jsonl"
    engine = _engine()
    print(f"start {_uptime()}; engine {engine}; work {work}", flush=True)

    hf = work / "smollm2-f32"
    if not (hf / "model.safetensors").is_file():
        ggufkit.export(ggufkit.default_model_path(), hf, dtype="f32", overwrite=True)
    base = work / "smollm2-F32.gguf"
    if not base.is_file():
        ggufkit.convert(hf, base, type="F32", threads=args.threads)
    calib = work / "calibration.txt"
    calib.write_text(calibration_text(), encoding="utf-8")
    imatrix = work / "smollm2-F32.imatrix.gguf"
    if not imatrix.is_file():
        t = time.perf_counter()
        ggufkit.compute_imatrix(
            base, output=imatrix, text=calib, chunks=args.imatrix_chunks, threads=args.threads
        )
        print(f"imatrix {time.perf_counter() - t:.0f} s; {_uptime()}", flush=True)

    def measure(level: str, kind: str, gguf: Path, extra: dict) -> dict:
        t = time.perf_counter()
        r = ggufkit.evaluate(
            gguf, base=base, ctx=512, chunks=args.chunks, threads=args.threads, engine=engine
        )
        row = {
            "level": level,
            "kind": kind,
            "kld": r.kld_mean,
            "kld_err": r.kld_err,
            "ppl": r.ppl,
            "ppl_err": r.ppl_err,
            "base_ppl": r.base_ppl,
            "same_top": r.same_top,
            "same_top_err": r.same_top_err,
            "tokens": r.tokens,
            "engine": engine,
            "eval_seconds": round(time.perf_counter() - t, 1),
            "uptime": _uptime(),
            **extra,
        }
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    rows = []
    methods = set(args.methods.split(","))
    for level in args.levels.split(","):
        if "ptq" in methods:
            ptq = work / f"ptq-{level}.gguf"
            ggufkit.convert(hf, ptq, type=level, threads=args.threads)
            rows.append(measure(level, "PTQ", ptq, {}))
        if "imatrix" in methods:
            imq = work / f"imatrix-{level}.gguf"
            ggufkit.convert(hf, imq, type=level, imatrix=imatrix, threads=args.threads)
            rows.append(measure(level, "PTQ+imatrix", imq, {}))
        if "optimize" in methods:
            from ggufkit.optimize.job import optimize_file

            opt = work / f"optimize-{level}.gguf"
            summary = optimize_file(
                base, opt, level, imatrix=imatrix, exclude_types=["Q4_1", "Q5_1"], threads=args.threads
            )
            rows.append(measure(level, "optimize", opt, {"optimize_seconds": round(summary.seconds, 1)}))
        if "qat" not in methods:
            continue
        from ggufkit.qat.train import train

        out = work / f"qat-{level}"
        up0 = _uptime()
        t = time.perf_counter()

        def progress(step, steps, loss, t=t, level=level):
            dt = time.perf_counter() - t
            print(f"  {level} step {step}/{steps} loss {loss:.4f} {dt:.0f} s", flush=True)

        r = train(
            hf,
            out,
            level=level,
            steps=args.steps,
            lr=args.lr,
            ctx=args.ctx,
            save_every=10,
            threads=args.threads,
            max_seconds=args.budget,
            progress=progress,
        )
        qat = work / f"qat-{level}.gguf"
        ggufkit.convert(out, qat, type=level, threads=args.threads)
        extra = {
            "steps": r.steps,
            "planned_steps": args.steps,
            "train_seconds": round(r.seconds, 1),
            "lr": args.lr,
            "ctx": args.ctx,
            "loss_first10": sum(r.losses[:10]) / max(1, len(r.losses[:10])),
            "loss_last10": sum(r.losses[-10:]) / max(1, len(r.losses[-10:])),
            "uptime_train_start": up0,
        }
        rows.append(measure(level, "QAT", qat, extra))
    print(f"end {_uptime()}", flush=True)
    print("| level | method | mean KLD | PPL | same top % |")
    print("|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['level']} | {x['kind']} | {x['kld']:.5f} ± {x['kld_err']:.5f} | {x['ppl']:.3f} ± "
            f"{x['ppl_err']:.3f} | {x['same_top']:.2f} ± {x['same_top_err']:.2f} |"
        )
    for level in args.levels.split(","):
        by = {x["kind"]: x for x in rows if x["level"] == level}
        if {"PTQ", "QAT", "PTQ+imatrix"} <= set(by):
            print(
                f"{level}: KLD QAT/PTQ = {by['QAT']['kld'] / by['PTQ']['kld']:.3f}, "
                f"QAT/imatrix = {by['QAT']['kld'] / by['PTQ+imatrix']['kld']:.3f}"
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
