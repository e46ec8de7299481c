"""`ggufkit qat HF_DIR OUT_DIR --level Q4_0 [--text FILE] [--steps N] [--lr LR] ...`: quantization-aware
training (self-distillation through llama.cpp's block formats), resumable, into an HF folder for convert."""

from __future__ import annotations

import sys

NEEDS = "ggufkit qat needs torch and transformers: pip install 'ggufkit[qat]'"

# train()'s keyword arguments that options give as they are (args.<name>)
_TRAIN_OPTIONS = "level text steps lr ctx warmup save_every threads seed max_seconds".split()


def add_parser(sub):
    p = sub.add_parser(
        "qat",
        help="quantization-aware training: an HF folder trained to lose less at a level, for convert",
        description="Train a Hugging Face checkpoint through the types `convert --type LEVEL` will give its "
        "weights, to match its own full-precision next-token distribution (KL divergence) on calibration "
        "text. Checkpoints to OUT_DIR/checkpoint every --save-every steps and continues from there when run "
        "again with the same settings. OUT_DIR ends as an HF folder: `ggufkit convert OUT_DIR x.gguf "
        "--type LEVEL`. Needs the qat extra (torch, transformers).",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="the full-precision checkpoint folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (checkpoint/ inside it)")
    p.add_argument("--level", required=True, help="the llama-quantize level to train for (Q4_0, Q4_K_M, ...)")
    p.add_argument(
        "--text", default=None, help="UTF-8 text to train on (default: the calibration half of pydoc topics)"
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps, one window each (default 200)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(20, steps/10))")
    p.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget; the folder is written")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window order (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    try:  # torch first (transformers without torch warns on stderr as it is imported); by name, so that
        # the one package importing torch stays ggufkit.qat (tests/test_qat.py)
        importlib.import_module("torch")
        importlib.import_module("transformers")

        from ..qat.train import train
    except ImportError:
        print(NEEDS, file=sys.stderr)
        return 2
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.steps, unit="step", desc=f"qat {args.level}", file=sys.stderr)

    def progress(step: int, steps: int, loss: float) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(step - bar.n)
        elif step == 1 or step % 10 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    try:
        r = train(
            args.hf_dir,
            args.out_dir,
            resume=not args.no_resume,
            progress=progress,
            **{name: getattr(args, name) for name in _TRAIN_OPTIONS},
        )
    finally:
        if bar is not None:
            bar.close()
    first = f"{r.losses[0]:.4f}" if r.losses else "-"
    last = f"{r.losses[-1]:.4f}" if r.losses else "-"
    resumed = f", resumed at step {r.resumed_from}" if r.resumed_from else ""
    print(
        f"{r.out_dir}: {r.level}, {r.steps}/{args.steps} steps{resumed}, loss {first} -> {last}, "
        f"{r.windows} windows of {args.ctx} tokens, {r.seconds:.0f} s; "
        f"next: ggufkit convert {r.out_dir} OUT.gguf --type {r.level}"
    )
    return 0
