"""Measure the damage: perplexity, KL divergence, same-top-token agreement and Δp against a base model.

Method and statistics are llama-perplexity's (tools/perplexity/perplexity.cpp; facts digest §6):
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

Base cache. We DO reproduce the uint16 quantization of the base log-probs, so the KLD, base PPL and
same-top computed from the same logits are llama-perplexity's to the digit. But instead of the full
n_vocab codes per position (llama.cpp's multi-gigabyte file) the cache keeps only what the statistics
read: per position scale, min_log_prob, the true token's code, the base argmax, and the (index, code)
pairs whose p̂ > -16 (the only terms of the KLD sum); a few MB for a typical run. It is keyed by the
base file's sha256, the token ids, ctx, chunks and the engine, so a ladder of levels runs the base once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numba import njit, prange

from ..errors import EvalError
from ..gguf.reader import open_gguf
from ..models import cache_dir, sha256_file

log = logging.getLogger(__name__)

ENGINES = ("builtin", "llama.cpp")
CACHE_VERSION = 4  # 4: rms_norm and rope rounded as ggml's (2026-11-27)
KLD_CUTOFF = np.float32(-16.0)
_F = np.float32


# -- text ------------------------------------------------------------------------------------------
def default_text() -> str:
    """The Python standard library's pydoc topics (pydoc_data.topics): ~110k tokens, offline, fixed."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


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


# -- per-chunk reductions (float32 arithmetic as in perplexity.cpp) ---------------------------------
@njit(parallel=True, cache=True)
def _row_stats(logits):
    """Per row: max, first argmax, Σ expf(l - max) summed in double in index order (perplexity.cpp)."""
    n, V = logits.shape
    mx = np.empty(n, np.float32)
    imax = np.empty(n, np.int64)
    sum_exp = np.empty(n, np.float64)
    for r in prange(n):
        row = logits[r]
        m, im = row[0], 0
        for i in range(1, V):
            if row[i] > m:
                m, im = row[i], i
        acc = 0.0
        for i in range(V):
            acc += np.float64(np.exp(row[i] - m))
        mx[r], imax[r], sum_exp[r] = m, im, acc
    return mx, imax, sum_exp


def _softmax_parts(logits: np.ndarray):
    """max, first argmax, float32(log Σ exp(l - max)) and the double sum, as llama.cpp computes them."""
    mx, imax, sum_exp = _row_stats(np.ascontiguousarray(logits, dtype=_F))
    return mx, imax, np.log(sum_exp).astype(_F), sum_exp


@dataclass
class BaseRecords:
    """What the statistics need of the base model, per scored position (see the module doc)."""

    scale: np.ndarray  # float32 [N]
    min_log_prob: np.ndarray  # float32 [N]
    code_tok: np.ndarray  # uint16 [N]: code of the true next token
    imax: np.ndarray  # int32 [N]: first argmax of the codes
    offsets: np.ndarray  # int64 [N+1]: CSR rows into idx/code
    idx: np.ndarray  # int32: token ids with p̂ > -16
    code: np.ndarray  # uint16: their codes
    nll: np.ndarray  # float64 [N]: base NLL from the unquantized logits (the base run's own PPL)

    @staticmethod
    def concat(parts: list[BaseRecords]) -> BaseRecords:
        offs, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return BaseRecords(
            cat("scale"),
            cat("min_log_prob"),
            cat("code_tok"),
            cat("imax"),
            np.concatenate(offs),
            cat("idx"),
            cat("code"),
            cat("nll"),
        )

    def rows(self, start: int, stop: int) -> BaseRecords:
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return BaseRecords(
            self.scale[start:stop],
            self.min_log_prob[start:stop],
            self.code_tok[start:stop],
            self.imax[start:stop],
            self.offsets[start : stop + 1] - a,
            self.idx[a:b],
            self.code[a:b],
            self.nll[start:stop],
        )


def base_records(logits: np.ndarray, targets: np.ndarray) -> BaseRecords:
    """Reduce base logits [n, V] (predicting targets [n]) to BaseRecords, quantizing like llama.cpp's
    --kl-divergence-base writer (log_softmax with uint16 output)."""
    logits = np.ascontiguousarray(logits, dtype=_F)
    n, V = logits.shape
    rows = np.arange(n)
    mx, _, lse, _ = _softmax_parts(logits)
    mn = np.maximum(logits.min(axis=1), mx - _F(16))
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / _F(65535)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, _F(1) / scale, _F(0)).astype(_F)
    codes = np.rint(inv[:, None] * (logits - mn[:, None]))
    codes = np.where(logits > mn[:, None], codes, 0).astype(np.uint16)
    codes[scale == 0] = 0
    plog = scale[:, None] * codes.astype(_F) + min_log_prob[:, None]
    keep = plog > KLD_CUTOFF
    counts = keep.sum(axis=1)
    r, c = np.nonzero(keep)
    nll = ((mx + lse) - logits[rows, targets]).astype(np.float64)
    return BaseRecords(
        scale=scale.astype(_F),
        min_log_prob=min_log_prob.astype(_F),
        code_tok=codes[rows, targets],
        imax=codes.argmax(axis=1).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        idx=c.astype(np.int32),
        code=codes[r, c],
        nll=nll,
    )


@dataclass
class _Sums:
    """Running sums (double) of llama.cpp's kl_divergence_result, plus the per-token values."""

    nll: list = field(default_factory=list)
    nll_base: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    p_diff: list = field(default_factory=list)
    same_top: list = field(default_factory=list)


def _ppl_only(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL per token as llama-perplexity's plain run computes it: -(l_tok - max - log(sum_exp))."""
    mx, _, _, sum_exp = _softmax_parts(logits)
    rows = np.arange(len(targets))
    return -((logits[rows, targets] - mx).astype(np.float64) - np.log(sum_exp))


def _against_base(logits: np.ndarray, targets: np.ndarray, base: BaseRecords, sums: _Sums) -> None:
    """One chunk's per-token statistics against the base records (perplexity.cpp's kld log_softmax)."""
    logits = np.ascontiguousarray(logits, dtype=_F)
    n = len(targets)
    rows = np.arange(n)
    mx, imax, lse, _ = _softmax_parts(logits)
    nll = (mx + lse) - logits[rows, targets]
    nll_base = -(base.scale * base.code_tok.astype(_F) + base.min_log_prob)
    top = mx + lse  # max_logit += log_sum_exp
    row_of = np.repeat(rows, np.diff(base.offsets))
    plog = base.scale[row_of] * base.code.astype(_F) + base.min_log_prob[row_of]
    terms = np.exp(plog) * ((plog - logits[row_of, base.idx]) + top[row_of])
    kld = np.bincount(row_of, weights=terms.astype(np.float64), minlength=n)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    sums.nll.append(nll.astype(_F))
    sums.nll_base.append(nll_base.astype(_F))
    sums.kld.append(kld)
    sums.p_diff.append(p_diff.astype(_F))
    sums.same_top.append(imax == base.imax)


def _mean_unc(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty over per-token values (sums in double)."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    v = values.astype(np.float64)
    f = v.sum() / n
    df = (v * v).sum() / n - f * f
    return float(f), float(math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile lambda: p = fraction·(N-1) in float32, linear interpolation in float32."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = _F(fraction) * _F(len(sorted_values) - 1)
    ip = int(p)
    p = _F(p - _F(ip))
    hi = min(ip + 1, len(sorted_values) - 1)
    return float((_F(1) - p) * sorted_values[ip] + p * sorted_values[hi])


def _median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    if n % 2 == 0:
        return float(_F(0.5) * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


# -- engines ---------------------------------------------------------------------------------------
def _builtin_logits(path, inputs: np.ndarray, first: int, threads: int | None) -> Iterator[np.ndarray]:
    from ..engine.llama import LlamaModel, blas_threads

    with blas_threads(threads), open_gguf(path) as g:
        yield from LlamaModel(g).chunk_logits(inputs, first=first)


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


def _ppl_stats(nll: np.ndarray) -> tuple[float, float]:
    mean, unc = _mean_unc(nll)
    ppl = math.exp(mean)
    return ppl, ppl * unc


def _kld_stats(res: EvalResult, s: _Sums) -> None:
    nll, nll_b = np.concatenate(s.nll), np.concatenate(s.nll_base)
    kld, p_diff = np.concatenate(s.kld), np.concatenate(s.p_diff)
    same = np.concatenate(s.same_top)
    n = len(nll)
    lq, uq = _mean_unc(nll)
    lb, ub = _mean_unc(nll_b)
    cov = _cov(nll, nll_b)
    res.ppl, res.ppl_err = math.exp(lq), math.exp(lq) * uq
    res.base_ppl, res.base_ppl_err = math.exp(lb), math.exp(lb) * ub
    res.ppl_correlation = cov / (uq * ub) if uq and ub else 0.0
    res.ln_ppl_ratio = lq - lb
    res.ln_ppl_ratio_err = math.sqrt(max(uq * uq + ub * ub - 2 * cov, 0.0))
    res.ppl_ratio = math.exp(res.ln_ppl_ratio)
    res.ppl_ratio_err = res.ppl_ratio * res.ln_ppl_ratio_err
    res.ppl_diff = res.ppl - res.base_ppl
    pcov = res.ppl * res.base_ppl * cov
    res.ppl_diff_err = math.sqrt(max(res.ppl_err**2 + res.base_ppl_err**2 - 2 * pcov, 0.0))
    res.kld_mean, res.kld_err = _mean_unc(kld)
    ks = np.sort(kld.astype(_F))
    res.kld_max, res.kld_min, res.kld_median = float(ks[-1]), float(ks[0]), _median(ks)
    for name, f in (
        ("p999", 0.999),
        ("p99", 0.99),
        ("p95", 0.95),
        ("p90", 0.90),
        ("p10", 0.10),
        ("p5", 0.05),
        ("p1", 0.01),
        ("p01", 0.001),
    ):
        setattr(res, f"kld_{name}", _percentile(ks, f))
    dm, du = _mean_unc(p_diff)
    ds = np.sort(p_diff)
    res.dp_mean, res.dp_err = 100 * dm, 100 * du
    res.dp_max, res.dp_min, res.dp_median = 100 * float(ds[-1]), 100 * float(ds[0]), 100 * _median(ds)
    res.dp_p99, res.dp_p1 = 100 * _percentile(ds, 0.99), 100 * _percentile(ds, 0.01)
    p2 = p_diff.astype(np.float64) ** 2
    mse, mse_unc = _mean_unc(p2)
    rms = math.sqrt(mse)
    res.rms_dp, res.rms_dp_err = 100 * rms, (100 * 0.5 / rms * mse_unc if rms else 0.0)
    top = float(same.sum()) / n
    res.same_top = 100 * top
    res.same_top_err = 100 * math.sqrt(top * (1 - top) / (n - 1))


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


def _cache_path(base_path, chunks: np.ndarray, engine: str) -> Path:
    h = hashlib.sha256()
    h.update(f"ggufkit-eval-base-v{CACHE_VERSION}|{engine}|{chunks.shape}|".encode())
    h.update(sha256_file(base_path).encode())
    h.update(np.ascontiguousarray(chunks, dtype=np.int32).tobytes())
    return cache_dir("eval") / f"base-{h.hexdigest()[:32]}.npz"


def _load_base(path: Path) -> BaseRecords | None:
    try:
        with np.load(path) as z:
            fields = {k: z[k] for k in BaseRecords.__dataclass_fields__ if k != "idx"}
            fields["idx"] = np.cumsum(z["idx_delta"], dtype=np.int64).astype(np.int32)
            return BaseRecords(**fields)
    except (OSError, KeyError, ValueError):
        return None


def _save_base(path: Path, rec: BaseRecords) -> None:
    """Compressed npz; the token ids of the kept entries are stored as differences (small numbers)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    arrays = asdict(rec)
    arrays["idx_delta"] = np.diff(arrays.pop("idx"), prepend=0).astype(np.int32)
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


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
        from ..engine.llama import ModelArgs

        if engine == "builtin":
            ModelArgs.from_gguf(g)  # unsupported architecture -> EvalError before anything runs
        tok = load_tokenizer(g)
    if base is not None:
        _check_vocab(model, base)
        if engine == "builtin":
            with open_gguf(base) as g:
                ModelArgs.from_gguf(g)
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
        run(model, "model", lambda c, lg: nll.append(_ppl_only(lg, targets[c])))
        res.ppl, res.ppl_err = _ppl_stats(np.concatenate(nll))
    else:
        cache = _cache_path(base, chunk_ids, engine) if use_cache else None
        rec = _load_base(cache) if cache is not None and cache.exists() else None
        res.base_cached = rec is not None
        if rec is None:
            parts: list[BaseRecords] = []
            run(base, "base", lambda c, lg: parts.append(base_records(lg, targets[c])))
            rec = BaseRecords.concat(parts)
            if cache is not None:
                _save_base(cache, rec)
        per = targets.shape[1]
        sums = _Sums()
        run(
            model,
            "model",
            lambda c, lg: _against_base(lg, targets[c], rec.rows(c * per, (c + 1) * per), sums),
        )
        _kld_stats(res, sums)
    res.seconds = time.perf_counter() - t_start
    return res
