"""optimize/feedback.py on SmolLM2-135M: H-weighted error vs the standard imatrix kernel, and seconds.

For a few layers' weights of ggufkit's default model (SmolLM2-135M-Instruct, Q4_1 GGUF, dequantized) and
their input covariances H = X^T X from `ggufkit.compute_imatrix(..., hessian=...)` on the first chunks of
`evaluation.calibration_text()` (computed once into --work and reused), it prints, per tensor kind and
type, the ratio of tr((W-Q) H (W-Q)^T) for

    b      quantize_tensor(importance=diag H)            (refined scales only, no feedback)
    a      quantize_tensor(hessian=H, act_order=False, refine_scales=False)
    a+ao   quantize_tensor(hessian=H)                    (the default: act_order, no refinement)
    a+ao+b the same with refine_scales=True

to the standard kernel's (registry.quantize with importance = diag H, i.e. llama.cpp's imatrix path;
the imatrix is diag H divided by the token count, which no kernel sees). Geometric mean over the layers.
H is fitted on the first half of the calibration text (--chunks chunks of 512) and the error is scored
with the H of --chunks chunks of its second half (held out); in parentheses the in-sample ratio.
SmolLM2's weights are dequantized Q4_1 (every block on a 16-level grid), so it does it twice: on those
weights and "off-grid", with seeded uniform noise of +-0.5 * (the element's Q4_1 block step d) added.
It also times quantize_tensor against the standard kernel on the three shapes of SmolLM2's matrices.

    PYTHONPATH=src python -m benchmarks.bench_optimize_feedback [--layers 0 15 29] [--chunks 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LEVELS = ("Q4_0", "IQ4_NL", "Q5_0", "Q4_K", "Q3_K", "Q2_K", "Q6_K")


def _hessians(work: Path, chunks: int) -> tuple[Path, Path]:
    """H of the first half of calibration_text() (fit) and of its second half (held out)."""
    import ggufkit
    from ggufkit.evaluation import calibration_text
    from ggufkit.models import default_model_path

    text = calibration_text()
    halves = {"train": text[: len(text) // 2], "test": text[len(text) // 2 :]}
    for name, body in halves.items():
        folder = work / f"hess_{name}"
        if not (folder / "index.json").exists():
            work.mkdir(parents=True, exist_ok=True)
            path = work / f"{name}.txt"
            path.write_text(body)
            ggufkit.compute_imatrix(
                default_model_path(), output=work / f"{name}.imatrix.gguf", text=path, chunks=chunks,
                threads=2, hessian=folder,
            )  # fmt: skip
    return work / "hess_train", work / "hess_test"


def _weights(model, name: str, noise: bool) -> np.ndarray:
    from ggufkit.quants import registry

    t = model.tensor(name)
    raw = np.asarray(t.data())
    rows, k = int(np.prod(t.shape[1:])), t.shape[0]
    w = registry.dequantize(raw, t.ggml_type.name, (rows, k))
    if noise:  # +-0.5 of each Q4_1 block's step d (fp16 at byte 0 of each 20-byte block)
        fmt = registry.get_format(t.ggml_type.name)
        d = raw.reshape(-1, fmt.type_size)[:, :2].copy().view(np.float16).astype(np.float32)
        step = np.repeat(np.abs(d[:, 0]), fmt.block_size).reshape(rows, k)
        rng = np.random.default_rng(sum(map(ord, name)))  # seeded by the name
        w = (w + (rng.random((rows, k), dtype=np.float32) - 0.5) * step).astype(np.float32)
    return w


def _herr(w, q, h) -> float:
    e = (w - q).astype(np.float64)
    return float(np.sum((e @ h) * e))


def compare(layers, *, work: Path, chunks: int) -> dict:
    from ggufkit.calibrate.hessian import read_hessian
    from ggufkit.gguf.reader import open_gguf
    from ggufkit.models import default_model_path
    from ggufkit.optimize.feedback import quantize_tensor
    from ggufkit.quants import registry

    train, test = _hessians(work, chunks)
    model = open_gguf(default_model_path())
    variants = {
        "b": lambda w, q, h: quantize_tensor(w, q, importance=np.diag(h)),
        "a": lambda w, q, h: quantize_tensor(w, q, hessian=h, act_order=False, refine_scales=False),
        "a+ao": lambda w, q, h: quantize_tensor(w, q, hessian=h),
        "a+ao+b": lambda w, q, h: quantize_tensor(w, q, hessian=h, refine_scales=True),
    }
    out = {}
    for noise in (False, True):
        for kind in KINDS:
            logs = {(lv, v, s): [] for lv in LEVELS for v in variants for s in ("in", "out")}
            for layer in layers:
                name = f"blk.{layer}.{kind}.weight"
                h = read_hessian(train, name)[0]
                ht = read_hessian(test, name)[0]
                w = _weights(model, name, noise)
                for lv in LEVELS:
                    if w.shape[1] % registry.get_format(lv).block_size:
                        continue  # K-quants need rows of 256 (llama.cpp falls back for 576)
                    std = registry.quantize(w, lv, importance=np.diag(h).astype(np.float32))
                    qs = registry.dequantize(std, lv, w.shape)
                    base = {"in": _herr(w, qs, h), "out": _herr(w, qs, ht)}
                    for v, fn in variants.items():
                        q = registry.dequantize(fn(w, lv, h), lv, w.shape)
                        logs[lv, v, "in"].append(np.log(_herr(w, q, h) / base["in"]))
                        logs[lv, v, "out"].append(np.log(_herr(w, q, ht) / base["out"]))
            for lv in LEVELS:
                if not logs[lv, "b", "in"]:
                    continue
                row = {
                    (v, s): float(np.exp(np.mean(logs[lv, v, s]))) for v in variants for s in ("out", "in")
                }
                out["off-grid" if noise else "grid", kind, lv] = row
                cells = " ".join(f"{v}={row[v, 'out']:.3f} ({row[v, 'in']:.3f})" for v in variants)
                print("off-grid" if noise else "grid", kind, lv, cells, flush=True)
    return out


def timings(*, work: Path) -> None:
    from ggufkit.calibrate.hessian import read_hessian
    from ggufkit.gguf.reader import open_gguf
    from ggufkit.models import default_model_path
    from ggufkit.optimize.feedback import quantize_tensor
    from ggufkit.quants import registry

    folder = work / "hess_train"
    model = open_gguf(default_model_path())
    h576 = read_hessian(folder, "blk.0.ffn_up.weight")[0]
    cases = {
        "ffn_up 1536x576": (_weights(model, "blk.0.ffn_up.weight", True), h576),
        "ffn_down 576x1536": (
            _weights(model, "blk.0.ffn_down.weight", True),
            read_hessian(folder, "blk.0.ffn_down.weight")[0],
        ),
        # token_embd has no covariance (a row lookup); timed with blk.0.ffn_up's H (576 inputs)
        "token_embd 49152x576": (_weights(model, "token_embd.weight", False), h576),
    }
    for n in (64, 1100):  # numba compile (or cache load) of both group kernels
        quantize_tensor(cases["token_embd 49152x576"][0][:n], "Q4_0", hessian=h576)
    for label, (w, h) in cases.items():
        for lv in ("Q4_0", "IQ4_NL", "Q4_K", "Q6_K"):
            if w.shape[1] % registry.get_format(lv).block_size:
                continue
            t0 = time.perf_counter()
            registry.quantize(w, lv, importance=np.diag(h).astype(np.float32))
            t1 = time.perf_counter()
            quantize_tensor(w, lv, hessian=h)
            t2 = time.perf_counter()
            print(
                f"{label} {lv}: standard {t1 - t0:.2f} s, feedback {t2 - t1:.2f} s, "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/optfb"))
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args()
    if not args.skip_compare:
        compare(args.layers, work=args.work, chunks=args.chunks)
    timings(work=args.work)


if __name__ == "__main__":
    main()
