"""Convert a Hugging Face folder: `ggufkit convert` vs llama.cpp's convert_hf_to_gguf.py (+ llama-quantize).

Same checkpoint folder, same thread count, same run, two jobs:
  Q4_K_M  `ggufkit convert DIR OUT --type Q4_K_M --threads N` vs `convert_hf_to_gguf.py DIR --outtype
          <checkpoint dtype>` then `llama-quantize CONVERTED OUT Q4_K_M N` (the peer's wall and CPU time are
          the two steps' sums, its peak RSS the larger of the two processes'). Goals: <= 0.5x wall, <= 0.5x
          peak RSS.
  F16     `ggufkit convert DIR OUT --type F16 --threads N` vs `convert_hf_to_gguf.py DIR --outtype f16`.
          Goal: <= 1.0x wall.
Every tool runs as a fresh process, started by a small launcher that reads that one process's peak RSS
(ru_maxrss) from os.wait4 (bench_quantize.run_measured); the rounds alternate which side goes first, after
one untimed run of each (page cache, bytecode cache). Medians of wall and CPU time, largest peak RSS; the
two outputs' sha256 must be equal (the same job). convert_hf_to_gguf.py runs as the tests run it
(tests/helpers/convert_oracle.py): this Python, the oracle tree's own gguf-py; it has no thread option.

    PYTHONPATH=src python -m benchmarks.bench_convert [--models smollm2_f32,smollm2_bf16,gemma3_bf16]
        [--jobs Q4_K_M,F16] [--threads N] [--repeat 3] [--write-docs]

from the repository root. Models: the real SmolLM2-135M-Instruct and Gemma 3 270M (262,144-token
vocabulary) GGUFs, dequantized to F32 by llama.cpp (llama_programs.base_model), exported to Hugging Face
folders by ggufkit export at F32 or BF16 matrices (vectors stay F32, as export writes them), kept in
ggufkit's cache under bench/hf. --write-docs replaces the "## Convert: Hugging Face folder to GGUF"
section of docs/benchmarks.md (or appends it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from ggufkit.cache import cache_dir
from ggufkit.models import model_path

from .bench_quantize import ROOT, ggufkit_env, machine, run_measured, sha256

# model name -> (known model, folder stem)
MODELS = {"smollm2": ("smollm2-135m", "SmolLM2-135M-Instruct"), "gemma3": ("gemma3-270m", "gemma-3-270m")}
# job -> (wall goal, peak RSS goal): ggufkit / peer at most this
GOALS = {"Q4_K_M": (0.5, 0.5), "F16": (1.0, None)}
SECTION = "## Convert: Hugging Face folder to GGUF\n"


def checkpoint(name: str) -> Path:
    """The HF folder for `name` ("smollm2_bf16", ...), exported once into the cache."""
    from ggufkit.conversion.export import export
    from tests.helpers.llama_programs import base_model

    model, dtype = name.rsplit("_", 1)
    known, stem = MODELS[model]
    folder = cache_dir("bench", "hf") / f"{stem}-{dtype.upper()}"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(f".tmp{os.getpid()}-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        export(base_model(model_path(known), "F32"), tmp, dtype=dtype.lower())
        os.rename(tmp, folder)
    return folder


def peer_env() -> dict[str, str]:
    """convert_hf_to_gguf.py's environment, as tests/helpers/convert_oracle.py sets it, with Python's bytecode
    cache allowed (as for ggufkit: otherwise the script, its conversion package and gguf-py are compiled
    again in every run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONDONTWRITEBYTECODE")}
    return env | dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def load() -> float:
    return os.getloadavg()[0]


def bench_job(folder: Path, job: str, threads: int, repeat: int, tmp: Path) -> dict:
    import sys

    from ggufkit.conversion.safetensors import open_checkpoint
    from ggufkit.conversion.tensors import source_ftype
    from tests.helpers.convert_oracle import script
    from tests.helpers.llama_programs import tool

    with open_checkpoint(folder) as ckpt:
        dtype = source_ftype(ckpt)
    ours_out, conv, ref_out = tmp / "ours.gguf", tmp / "converted.gguf", tmp / "ref.gguf"
    ours = [sys.executable, "-m", "ggufkit", "convert", str(folder), str(ours_out), "--type", job,
            "--threads", str(threads)]  # fmt: skip
    convert_cmd = [sys.executable, str(script()), str(folder), "--outfile"]
    if job == "F16":
        steps = [[*convert_cmd, str(ref_out), "--outtype", "f16"]]
    else:
        steps = [
            [*convert_cmd, str(conv), "--outtype", dtype.lower()],
            [str(tool("llama-quantize")), str(conv), str(ref_out), job, str(threads)],
        ]
    env_ours, env_peer = ggufkit_env(), peer_env()

    def run_peer():
        rs = [run_measured(cmd, env_peer) for cmd in steps]
        return sum(r[0] for r in rs), max(r[1] for r in rs), sum(r[2] for r in rs), [r[0] for r in rs]

    def run_ours():
        w, m, c = run_measured(ours, env_ours)
        return w, m, c, [w]

    run_peer(), run_ours()  # untimed warm-up
    peer, mine, loads = [], [], []
    for i in range(repeat):
        before = load()
        if i % 2:
            mine.append(run_ours())
            peer.append(run_peer())
        else:
            peer.append(run_peer())
            mine.append(run_ours())
        loads.append((before, load()))
        print(f"  {folder.name} {job} round {i + 1}: peer {peer[-1][0]:.2f} s {peer[-1][1] / 2**20:.0f} MiB, "
              f"ggufkit {mine[-1][0]:.2f} s {mine[-1][1] / 2**20:.0f} MiB, load {before:.1f} -> {load():.1f}",
              flush=True)  # fmt: skip
    same = sha256(ours_out) == sha256(ref_out)
    r = dict(
        model=folder.name, dtype=dtype, job=job, same=same, loads=loads, size=ours_out.stat().st_size,
        peer_t=statistics.median(p[0] for p in peer), our_t=statistics.median(m[0] for m in mine),
        peer_m=max(p[1] for p in peer), our_m=max(m[1] for m in mine),
        peer_c=statistics.median(p[2] for p in peer), our_c=statistics.median(m[2] for m in mine),
        peer_steps=[statistics.median(p[3][k] for p in peer) for k in range(len(steps))],
    )  # fmt: skip
    for f in (ours_out, conv, ref_out):
        f.unlink(missing_ok=True)
    return r


def verdict(r: dict) -> str:
    goal_t, goal_m = GOALS[r["job"]]
    t, m = r["our_t"] / r["peer_t"], r["our_m"] / r["peer_m"]
    parts = [f"wall x{t:.2f} (goal <= {goal_t}: {'met' if t <= goal_t else 'NOT met'})"]
    if goal_m is not None:
        parts.append(f"peak RSS x{m:.2f} (goal <= {goal_m}: {'met' if m <= goal_m else 'NOT met'})")
    return ", ".join(parts)


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| checkpoint | job | peer wall (steps) | ggufkit wall | ratio | peer CPU | ggufkit CPU | ratio "
        "| peer peak RSS | ggufkit peak RSS | ratio | goals | same sha256 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        steps = " + ".join(f"{s:.2f}" for s in r["peer_steps"])
        goal_t, goal_m = GOALS[r["job"]]
        met = r["our_t"] / r["peer_t"] <= goal_t and (goal_m is None or r["our_m"] / r["peer_m"] <= goal_m)
        goals = f"wall <= {goal_t}" + (f", RSS <= {goal_m}" if goal_m else "")
        goals += ": met" if met else ": NOT met"
        lines.append(
            f"| {r['model']} | {r['job']} | {r['peer_t']:.2f} s"
            + (f" ({steps})" if len(r["peer_steps"]) > 1 else "")
            + f" | {r['our_t']:.2f} s | {r['our_t'] / r['peer_t']:.2f} | {r['peer_c']:.2f} s | "
            f"{r['our_c']:.2f} s | {r['our_c'] / r['peer_c']:.2f} | {r['peer_m'] / 2**20:.0f} MiB | "
            f"{r['our_m'] / 2**20:.0f} MiB | {r['our_m'] / r['peer_m']:.2f} | {goals} | "
            f"{'yes' if r['same'] else 'NO'} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2_f32,smollm2_bf16,gemma3_bf16", help="comma-separated")
    ap.add_argument("--jobs", default="Q4_K_M,F16", help="comma-separated: Q4_K_M, F16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    if unknown := [j for j in jobs if j not in GOALS]:
        ap.error(f"unknown job(s) {unknown}; known: {list(GOALS)}")

    start, load_start = datetime.datetime.now(datetime.timezone.utc), load()
    folders = [checkpoint(name) for name in args.models.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        for folder in folders:
            for job in jobs:
                r = bench_job(folder, job, args.threads, args.repeat, Path(tmp))
                rows.append(r)
                print(f"{r['model']} ({r['dtype']}) {job}: peer {r['peer_t']:.2f} s "
                      f"{r['peer_m'] / 2**20:.0f} MiB | ggufkit {r['our_t']:.2f} s "
                      f"{r['our_m'] / 2**20:.0f} MiB | {verdict(r)} | "
                      f"identical: {r['same']}", flush=True)  # fmt: skip
    load_end = load()
    round_loads = [x for r in rows for pair in r["loads"] for x in pair]
    sizes = ", ".join(
        f"{f.name} {sum(p.stat().st_size for p in f.iterdir()) / 2**20:.0f} MiB" for f in folders
    )
    lines = [
        f"{start:%Y-%m-%d %H:%M} UTC, {machine()}; `PYTHONPATH=src python -m benchmarks.bench_convert "
        f"--models {args.models} --jobs {args.jobs} --threads {args.threads} --repeat {args.repeat}`.",
        "",
        f"Checkpoints (folder sizes): {sizes}. Times: median of {args.repeat} fresh processes per side, "
        "rounds alternating which side goes first, after one untimed run of each. The peer's Q4_K_M time is "
        "convert_hf_to_gguf.py at the checkpoint's dtype plus llama-quantize (the two steps' medians in "
        "brackets), its peak RSS the larger of the two processes'. Peak RSS: ru_maxrss of each process from "
        "os.wait4 in a small launcher; the largest over the runs. CPU: user + system seconds. Ratios are "
        f"ggufkit / peer. ggufkit and llama-quantize ran on {args.threads} threads; convert_hf_to_gguf.py "
        "has no thread option.",
        "",
        *table(rows),
        "",
        f"1-minute load average (other jobs included): {load_start:.1f} at the start, {load_end:.1f} at the "
        f"end, {min(round_loads):.1f}-{max(round_loads):.1f} before/after the rounds.",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.write_docs:
        doc = ROOT / "docs" / "benchmarks.md"
        old = doc.read_text()
        body = f"\n(benchmarks/bench_convert.py)\n\n{text}\n"
        if SECTION in old:
            start_i = old.index(SECTION) + len(SECTION)
            nxt = old.find("\n## ", start_i)
            rest = old[nxt + 1 :] if nxt >= 0 else ""
            doc.write_text(old[:start_i] + body + ("\n" + rest if rest else ""))
        else:
            doc.write_text(old.rstrip("\n") + "\n\n" + SECTION + body)


if __name__ == "__main__":
    main()
