"""The statistics of `ggufkit eval`, as llama-perplexity computes them (tools/perplexity/perplexity.cpp):
per-row softmax parts in float32 with the exp sum in double, per-token NLL / KLD / Δp / same-top against the
base records, and the aggregates with llama.cpp's uncertainties (mean_and_uncertainty, the covariance of
the two NLLs for the PPL ratio, float32 percentile interpolation)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numba import njit, prange

if TYPE_CHECKING:
    from . import EvalResult
    from .base_cache import BaseRecords

_F = np.float32


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


def softmax_parts(logits: np.ndarray):
    """max, first argmax, float32(log Σ exp(l - max)) and the double sum, as llama.cpp computes them."""
    mx, imax, sum_exp = _row_stats(np.ascontiguousarray(logits, dtype=_F))
    return mx, imax, np.log(sum_exp).astype(_F), sum_exp


@dataclass
class Sums:
    """Running sums (double) of llama.cpp's kl_divergence_result, plus the per-token values."""

    nll: list = field(default_factory=list)
    nll_base: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    p_diff: list = field(default_factory=list)
    same_top: list = field(default_factory=list)


def ppl_only(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL per token as llama-perplexity's plain run computes it: -(l_tok - max - log(sum_exp))."""
    mx, _, _, sum_exp = softmax_parts(logits)
    rows = np.arange(len(targets))
    return -((logits[rows, targets] - mx).astype(np.float64) - np.log(sum_exp))


def against_base(logits: np.ndarray, targets: np.ndarray, base: BaseRecords, sums: Sums) -> None:
    """One chunk's per-token statistics against the base records (perplexity.cpp's kld log_softmax)."""
    logits = np.ascontiguousarray(logits, dtype=_F)
    n = len(targets)
    rows = np.arange(n)
    mx, imax, lse, _ = softmax_parts(logits)
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


def ppl_stats(nll: np.ndarray) -> tuple[float, float]:
    mean, unc = _mean_unc(nll)
    ppl = math.exp(mean)
    return ppl, ppl * unc


def kld_stats(res: EvalResult, s: Sums) -> None:
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
