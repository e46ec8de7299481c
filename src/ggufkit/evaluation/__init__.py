"""Measure the damage: perplexity, KL divergence, same-top-token agreement and Δp against a base model.

Method and statistics are llama-perplexity's (tools/perplexity/perplexity.cpp, perplexity() and
kl_divergence()):
- the text is tokenized whole (BOS first when the vocab adds one), cut into n_chunk = min(chunks,
  n_tokens // ctx) chunks of ctx tokens; at least 2·ctx tokens are needed;
- each chunk is its own sequence; when the vocab adds BOS its first token is *overwritten* by BOS;
- only the second half is scored: logits at positions first = ctx/2 .. ctx-2 predict the next token,
  ctx - 1 - ctx/2 tokens per chunk;
- NLL = max + log Σ exp(l - max) - l_tok, the exp sum in double over float32 exps; PPL = exp(mean NLL),
  ± = PPL · sqrt((E[nll²] - E[nll]²)/(N - 1));
- against a base: llama.cpp stores each base position as uint16 codes of the log-probs (min_logit =
  max(min, max - 16), scale = (max - min_logit)/65535, code = rint((l - min_logit)/scale)) plus scale and
  min_log_prob; the KLD sums exp(p̂)(p̂ - log q) over tokens whose decoded base log-prob p̂ > -16;
  same-top compares the first argmax of the model's logits with the first argmax of the base codes;
  Δp = p(tok) - p_base(tok); percentiles interpolate in float32 as llama.cpp's lambda does.

The base model's records are cached (evaluation/base_cache.py), so a ladder of levels runs the base once;
the statistics are in evaluation/stats.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EvalError
from ..gguf.reader import open_gguf
from .base_cache import BaseRecords, base_records, cache_path, load_base, save_base
from .stats import Sums, against_base, kld_stats, ppl_only, ppl_stats

__all__ = [
    "ENGINES",
    "EvalResult",
    "base_records",
    "calibration_text",
    "default_text",
    "evaluate",
    "read_text",
]

ENGINES = ("builtin", "llama.cpp")


# -- text ------------------------------------------------------------------------------------------
def default_text() -> str:
    """The Python standard library's pydoc topics (pydoc_data.topics): ~110k tokens, offline, fixed."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# The default text's calibration half: the topics from this key on (sorted order). default_text() is the two
# halves joined, and evaluation reads it from the start.
CALIBRATION_FROM = "id-classes"
CALIBRATION_NAME = f"pydoc_data.topics[{CALIBRATION_FROM}:]"


def calibration_text() -> str:
    """`ggufkit imatrix`'s default text: the second half of the same topics, those whose key sorts at or
    after CALIBRATION_FROM (~63k SmolLM2 tokens). The first half alone is ~50k tokens, so an evaluation of
    the default text reading up to 97 chunks of 512 (the report reads 8) never sees a calibration token."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics) if k >= CALIBRATION_FROM)


def read_text(path: str | os.PathLike | None) -> tuple[str, str]:
    """(text, name): the file's UTF-8 text, or the default text."""
    if path is None:
        return default_text(), "pydoc_data.topics"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e.strerror or e}") from None


def make_chunks(tokens: np.ndarray, *, ctx: int, chunks: int | None) -> np.ndarray:
    """[n_chunk, ctx] token ids as llama-perplexity feeds them (first token of each chunk -> BOS if any).

    The returned array holds the ORIGINAL tokens; the BOS overwrite is applied by `chunk_inputs`."""
    if ctx < 4 or ctx % 2:
        raise EvalError(f"--ctx must be an even number >= 4, got {ctx}")
    n = len(tokens)
    if n < 2 * ctx:
        raise EvalError(
            f"the text has {n} tokens; perplexity with a context of {ctx} needs at least {2 * ctx} "
            "(two chunks)"
        )
    n_chunk = n // ctx if not chunks or chunks < 0 else min(chunks, n // ctx)
    return np.asarray(tokens[: n_chunk * ctx], dtype=np.int32).reshape(n_chunk, ctx)


def chunk_inputs(chunks: np.ndarray, bos_id: int | None) -> np.ndarray:
    inputs = chunks.copy()
    if bos_id is not None:
        inputs[:, 0] = bos_id
    return inputs


# -- engines ---------------------------------------------------------------------------------------
def _builtin_logits(path, inputs: np.ndarray, first: int, threads: int | None) -> Iterator[np.ndarray]:
    from ..engine import load_model
    from ..engine.numerics import blas_threads

    with blas_threads(threads), open_gguf(path) as g:
        yield from load_model(g).chunk_logits(inputs, first=first)


def _llamacpp_logits(path, inputs, first, threads, timing: dict) -> Iterator[np.ndarray]:
    from ..engine.llamacpp import LlamaCppRunner

    with LlamaCppRunner(path, ctx=inputs.shape[1], threads=threads) as runner:
        for chunk in inputs:
            yield runner.chunk_logits(chunk, first=first)
        timing.update(runner.timing())


def _logits(engine: str, path, inputs, first, threads, timing: dict) -> Iterator[np.ndarray]:
    if engine == "builtin":
        return _builtin_logits(path, inputs, first, threads)
    if engine == "llama.cpp":
        return _llamacpp_logits(path, inputs, first, threads, timing)
    raise EvalError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")


# -- results ---------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Everything `ggufkit eval` reports. Percent-valued fields say so in their name or doc."""

    model: str
    text: str
    engine: str
    ctx: int
    chunks: int
    tokens: int  # scored tokens
    ppl: float
    ppl_err: float
    base: str | None = None
    base_ppl: float | None = None
    base_ppl_err: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_err: float | None = None
    ppl_diff: float | None = None
    ppl_diff_err: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_err: float | None = None
    ppl_correlation: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_max: float | None = None
    kld_p999: float | None = None
    kld_p99: float | None = None
    kld_p95: float | None = None
    kld_p90: float | None = None
    kld_median: float | None = None
    kld_p10: float | None = None
    kld_p5: float | None = None
    kld_p1: float | None = None
    kld_p01: float | None = None
    kld_min: float | None = None
    same_top: float | None = None  # percent, 0-100
    same_top_err: float | None = None  # percent
    dp_mean: float | None = None  # percent
    dp_err: float | None = None  # percent
    dp_max: float | None = None  # percent
    dp_p99: float | None = None  # percent
    dp_median: float | None = None  # percent
    dp_p1: float | None = None  # percent
    dp_min: float | None = None  # percent
    rms_dp: float | None = None  # percent (as llama-perplexity prints "RMS Δp")
    rms_dp_err: float | None = None  # percent
    base_cached: bool | None = None
    seconds: float = 0.0
    speed: dict = field(default_factory=dict)  # tokens/s by phase and engine

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- vocab and cache -------------------------------------------------------------------------------
def _check_vocab(model_path, base_path) -> None:
    with open_gguf(model_path) as m, open_gguf(base_path) as b:
        tm, tb = m.get("tokenizer.ggml.tokens"), b.get("tokenizer.ggml.tokens")
        if tm is None or tb is None:
            raise EvalError("MODEL and BASE must both carry a tokenizer (tokenizer.ggml.tokens)")
        if len(tm) != len(tb):
            raise EvalError(f"MODEL and BASE have different vocabularies ({len(tm)} vs {len(tb)} tokens)")
        diff = next((i for i, (x, y) in enumerate(zip(tm, tb)) if x != y), None)
        if diff is not None:
            raise EvalError(
                f"MODEL and BASE have different vocabularies (token {diff}: {tm[diff]!r} vs {tb[diff]!r})"
            )


# -- the evaluation --------------------------------------------------------------------------------
def evaluate(
    model: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    engine: str = "builtin",
    use_cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Perplexity of `model` on `text` (default: pydoc topics); with `base`, KLD/same-top/Δp against it."""
    from ..engine.tokenizer import load_tokenizer

    if engine not in ENGINES:
        raise EvalError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    t_start = time.perf_counter()
    body, text_name = read_text(text)
    with open_gguf(model) as g:
        from ..engine import model_args

        if engine == "builtin":
            model_args(g)  # unsupported architecture -> EvalError before anything runs
        tok = load_tokenizer(g)
    if base is not None:
        _check_vocab(model, base)
        if engine == "builtin":
            with open_gguf(base) as g:
                model_args(g)
    ids = tok.encode(body)
    chunk_ids = make_chunks(ids, ctx=ctx, chunks=chunks)
    inputs = chunk_inputs(chunk_ids, tok.bos_id if tok.add_bos else None)
    first = ctx // 2
    targets = chunk_ids[:, first + 1 :]  # position first+k predicts token first+k+1
    n_chunk = len(chunk_ids)
    res = EvalResult(
        model=str(model),
        text=text_name,
        engine=engine,
        ctx=ctx,
        chunks=n_chunk,
        tokens=int(targets.size),
        ppl=0.0,
        ppl_err=0.0,
        base=None if base is None else str(base),
    )

    def run(path, phase: str, consume) -> None:
        timing: dict = {}
        t0 = time.perf_counter()
        for c, logits in enumerate(_logits(engine, path, inputs, first, threads, timing)):
            consume(c, logits[:-1])  # the last position predicts past the chunk
            if progress:
                progress(phase, c + 1, n_chunk)
        dt = time.perf_counter() - t0
        res.speed[f"{phase}_eval_tokens_per_s"] = inputs.size / dt
        for k, v in timing.items():
            res.speed[f"{phase}_{k}"] = v

    if base is None:
        nll: list[np.ndarray] = []
        run(model, "model", lambda c, lg: nll.append(ppl_only(lg, targets[c])))
        res.ppl, res.ppl_err = ppl_stats(np.concatenate(nll))
    else:
        cache = cache_path(base, chunk_ids, engine) if use_cache else None
        rec = load_base(cache) if cache is not None and cache.exists() else None
        res.base_cached = rec is not None
        if rec is None:
            parts: list[BaseRecords] = []
            run(base, "base", lambda c, lg: parts.append(base_records(lg, targets[c])))
            rec = BaseRecords.concat(parts)
            if cache is not None:
                save_base(cache, rec)
        per = targets.shape[1]
        sums = Sums()
        run(
            model,
            "model",
            lambda c, lg: against_base(lg, targets[c], rec.rows(c * per, (c + 1) * per), sums),
        )
        kld_stats(res, sums)
    res.seconds = time.perf_counter() - t_start
    return res
