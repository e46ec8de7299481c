"""train(hf_dir, out_dir, level=...): quantization-aware training by self-distillation, resumable.

The recipe, small on purpose:
- teacher: the checkpoint as it is (eval, no gradients), its next-token distribution at every position;
- student: a float32 copy whose weights are fake-quantized with convert's plan at `level` (qat.prepare);
- loss: KL(teacher || student) at temperature 1, summed over the vocabulary, averaged over the positions
  of one window of `ctx` tokens of the calibration text (default: evaluation.calibration_text(), the half
  of the pydoc topics evaluation does not read);
- AdamW (no weight decay), linear warm-up then cosine decay to a tenth of `lr` at `steps`; the windows are
  visited in a seeded order that depends on the step alone, so a resumed run reads what the uninterrupted
  one would.
- every `save_every` steps, OUT_DIR/checkpoint/state.pt (latent weights, optimizer moments, step, torch
  RNG, the run's settings) is written atomically; a later call with the same settings continues from it
  (bit for bit the same result as without the interruption: same threads, same machine).
- at the end OUT_DIR is a Hugging Face folder (the student's latent weights after qat.finish, float32, and
  the base's tokenizer and generation files) that `ggufkit convert OUT_DIR x.gguf --type LEVEL` turns
  into a GGUF holding exactly the weights the last forward saw. The weights are saved in float32 whatever
  the base's dtype: the student trains in float32, and rounding its latent weights to bfloat16 before
  convert quantizes them could move a weight across a rounding boundary of the level.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import atomic_output
from ..errors import QatError
from .prepare import finish, prepare

CHECKPOINT = "checkpoint"
STATE = "state.pt"
# files of the base folder the output does not take from it (save_pretrained writes its own)
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


@dataclass
class TrainResult:
    out_dir: str
    level: str
    steps: int  # steps done in total (including those of a resumed checkpoint)
    resumed_from: int  # the checkpoint's step (0: a fresh start)
    windows: int  # windows of the text
    tokens: int  # tokens of the text
    losses: list[float] = field(default_factory=list)  # the loss of every step, from step 1
    seconds: float = 0.0  # this call's wall time
    stopped_early: bool = False  # stop_at ended it before `steps` (checkpointed, no HF folder)
    out_of_time: bool = False  # max_seconds ended it before `steps` (HF folder written at that step)


def _settings(hf_dir: Path, level: str, text_sha: str, steps, lr, ctx, seed, warmup) -> dict:
    return {
        "base": str(hf_dir.resolve()),
        "level": level,
        "text_sha256": text_sha,
        "steps": steps,
        "lr": lr,
        "ctx": ctx,
        "seed": seed,
        "warmup": warmup,
    }


def lr_at(step: int, *, steps: int, lr: float, warmup: int) -> float:
    """The learning rate of step `step` (0-based): linear warm-up over `warmup` steps, then a cosine from
    lr down to lr/10 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def window_order(step: int, n_windows: int, seed: int) -> int:
    """The window step `step` trains on: epoch e = step // n visits the windows in a permutation seeded by
    (seed, e)."""
    epoch, k = divmod(step, n_windows)
    return int(np.random.default_rng([seed, epoch]).permutation(n_windows)[k])


def _check_folder(hf_dir: Path) -> None:
    if not hf_dir.is_dir():
        raise QatError(f"{hf_dir} is not a folder (a Hugging Face checkpoint: config.json, *.safetensors)")
    if not (hf_dir / "config.json").is_file():
        raise QatError(f"{hf_dir} is not a Hugging Face checkpoint folder (no config.json)")


def _text(text) -> tuple[str, str]:
    from ..evaluation import CALIBRATION_NAME, calibration_text, read_text

    if text is None:
        return calibration_text(), CALIBRATION_NAME
    try:
        return read_text(text)
    except Exception as e:  # EvalError: one line, as a QatError
        raise QatError(str(e)) from None


def _windows(tokenizer, body: str, ctx: int) -> tuple[torch.Tensor, int]:
    ids = tokenizer(body, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // ctx
    if n < 1:
        raise QatError(f"the text has {len(ids)} tokens; training with --ctx {ctx} needs at least {ctx}")
    return torch.tensor(ids[: n * ctx], dtype=torch.long).reshape(n, ctx), len(ids)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) (natural log), in float32."""
    s = torch.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = torch.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum") / s.shape[0]


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        torch.save(state, f)


def _save_output(student, hf_dir: Path, out_dir: Path) -> None:
    finish(student)
    student.save_pretrained(out_dir, safe_serialization=True)
    for f in hf_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_FILES):
            shutil.copy2(f, out_dir / f.name)


def train(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    level: str,
    text: str | os.PathLike | None = None,
    steps: int = 200,
    lr: float = 1e-4,
    ctx: int = 256,
    warmup: int | None = None,
    save_every: int = 25,
    resume: bool = True,
    threads: int = 2,
    seed: int = 0,
    stop_at: int | None = None,
    max_seconds: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Quantization-aware training of the HF checkpoint `hf_dir` at `level` (see the module doc).

    text: a UTF-8 file to train on (default: the calibration half of the pydoc topics); ctx: tokens per
    window (one window per step); warmup: default min(20, steps // 10). save_every: checkpoint period in
    steps (0: only at the end). resume: continue from OUT_DIR/checkpoint when it was written by a run with
    the same settings (a checkpoint of other settings is an error; resume=False starts over).
    stop_at: stop after that step (checkpointed, no HF folder written), as an interruption would; a later
    call continues. max_seconds: a time budget: no step starts after it, and the HF folder is written with
    the steps done (the schedule stays the one planned for `steps`). progress(step, steps, loss) after
    every step.
    Raises QatError / QuantizeError / ConvertError for input it cannot train on."""
    import transformers

    from ..quantize.levels import level as level_of

    t0 = time.perf_counter()
    lv = level_of(str(level)).name  # unknown level: QuantizeError, before anything loads
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_folder(hf_dir)
    if steps < 1 or ctx < 2 or lr <= 0 or save_every < 0 or threads < 1:
        raise QatError(
            f"steps ({steps}) and threads ({threads}) must be >= 1, ctx ({ctx}) >= 2, lr ({lr}) > 0, "
            f"save_every ({save_every}) >= 0"
        )
    warmup = min(20, steps // 10) if warmup is None else warmup
    if out_dir.exists() and not out_dir.is_dir():
        raise QatError(f"{out_dir} exists and is not a folder")
    body, _name = _text(text)
    torch.set_num_threads(threads)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:
        raise QatError(f"{hf_dir}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    windows, n_tokens = _windows(tokenizer, body, ctx)
    settings = _settings(hf_dir, lv, hashlib.sha256(body.encode()).hexdigest(), steps, lr, ctx, seed, warmup)

    def load():
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        except Exception as e:
            raise QatError(f"{hf_dir}: transformers cannot load it: {str(e).splitlines()[0]}") from None
        return m

    teacher = load().eval()
    teacher.requires_grad_(False)
    student = load().train()
    prepare(student, lv)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)

    state_path = out_dir / CHECKPOINT / STATE
    start, losses = 0, []
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("settings") != settings:
            diff = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
            raise QatError(
                f"{state_path} is a checkpoint of another run (differs in {', '.join(diff)}); "
                "remove it or start over with --no-resume"
            )
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, losses = state["step"], list(state["losses"])
    else:
        torch.manual_seed(seed)

    def checkpoint(step: int) -> None:
        _save_state(
            state_path,
            {
                "settings": settings,
                "step": step,
                "losses": losses,
                "student": student.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
        )

    result = TrainResult(str(out_dir), lv, start, start, len(windows), n_tokens)
    step = start
    while step < steps:
        if stop_at is not None and step >= stop_at:
            result.stopped_early = True
            break
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            result.out_of_time = True
            break
        ids = windows[window_order(step, len(windows), seed)].unsqueeze(0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps=steps, lr=lr, warmup=warmup)
        with torch.no_grad():
            t_logits = teacher(ids).logits
        loss = distill_loss(student(ids).logits, t_logits)
        if not torch.isfinite(loss):
            raise QatError(f"step {step + 1}: the loss is {loss.item()} (try a smaller --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.item()))
        if progress is not None:
            progress(step, steps, losses[-1])
        if save_every and step % save_every == 0 and step < steps:
            checkpoint(step)
    result.steps, result.losses = step, losses
    if step > start and (result.stopped_early or result.out_of_time or step == steps):
        checkpoint(step)
    if not result.stopped_early:
        _save_output(student, hf_dir, out_dir)
        (out_dir / "qat.json").write_text(json.dumps({**settings, "losses": losses}, indent=1) + "\n")
    result.seconds = time.perf_counter() - t0
    return result


def result_dict(r: TrainResult) -> dict:
    return asdict(r)
