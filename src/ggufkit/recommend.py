"""Which level to run (`ggufkit pick`): the usual rules of thumb, made exact with the memory estimate.

Rules, in order:
1. Headroom. With the memory budget B and each level's needed memory N (ggufkit.memory, at the asked
   context, f16 KV cache): Q8_0 if it leaves >= 50% of B spare, else Q5_K_M if it leaves >= 25%, else
   Q4_K_M if it fits at all ("tight").
2. Task floors. code and creative need >= Q5_K_M; chat and summarize >= Q4_K_M; classify and extract may
   go down to Q3_K_M when Q4_K_M does not fit. Nothing below Q4 is picked for generation. A floor raises
   the headroom pick when the floor level fits.
3. Measured quality. When ggufkit has a report for this model (`ggufkit report`: report.json), the
   measured numbers are quoted, and when the picked level's measured KL divergence is above the task's
   tolerance (KLD_TOLERANCE) the smallest higher level that fits and is within it is picked instead.
When nothing fits, the pick is None and the suggestions say what would: a shorter context, a q8_0 (or
q4_0) KV cache, a smaller model.

Reports: report.json holds top-level `model_sha256` (sha256 of the GGUF the ladder was made from) and
`levels`: a list of {level, size_bytes, bpw, ppl, kld_mean, same_top, tok_s, ram_bytes} (ppl_delta_pct
is quoted when present; same_top is a percentage, 0-100). `find_report`
looks for one whose model_sha256 matches in ggufkit's cache, cache.cache_dir("reports")/<any>/report.json
(or report.json directly there); `load_report` reads a given report.json or the folder holding it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import memory
from .errors import PickError

__all__ = ["Pick", "PickError", "pick", "find_report", "load_report", "TASKS", "FLOORS", "KLD_TOLERANCE"]

TASKS = ("chat", "code", "creative", "summarize", "classify", "extract")
GENERATION = frozenset({"chat", "code", "creative", "summarize"})
FLOORS = {
    "code": "Q5_K_M",
    "creative": "Q5_K_M",
    "chat": "Q4_K_M",
    "summarize": "Q4_K_M",
    "classify": "Q3_K_M",
    "extract": "Q3_K_M",
}
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")  # best first
HEADROOM = (("Q8_0", 0.50), ("Q5_K_M", 0.25), ("Q4_K_M", 0.0))  # level, spare fraction it needs
# ggufkit's rule of thumb for the mean KL divergence (nats/token, vs the full-precision base) a task
# tolerates: roughly where llama.cpp's published ladders put Q5_K_M, Q4_K_M and Q3_K_M on 7-8B models.
KLD_TOLERANCE = {
    "code": 0.03,
    "creative": 0.03,
    "chat": 0.06,
    "summarize": 0.06,
    "classify": 0.15,
    "extract": 0.15,
}


@dataclass
class Pick:
    level: str | None  # None: nothing fits
    reason: str  # one line
    task: str
    n_ctx: int
    ram_bytes: int
    estimates: dict[str, memory.Estimate]  # by level, at n_ctx with an f16 KV cache
    measured: dict | None = None  # the report's row for the picked level
    suggestions: list[str] = field(default_factory=list)

    @property
    def estimate(self) -> memory.Estimate | None:
        return self.estimates.get(self.level) if self.level else None

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "reason": self.reason,
            "task": self.task,
            "n_ctx": self.n_ctx,
            "ram_bytes": self.ram_bytes,
            "needed_bytes": self.estimate.needed_bytes if self.estimate else None,
            "measured": self.measured,
            "suggestions": self.suggestions,
            "levels": {
                lv: {"needed_bytes": e.needed_bytes, "spare": round(_spare(e, self.ram_bytes), 4)}
                for lv, e in self.estimates.items()
            },
        }


def _spare(est: memory.Estimate, ram: int) -> float:
    return 1.0 - est.needed_bytes / ram


def _gib(n: int) -> str:
    return f"{n / memory.GIB:.2f} GiB"


def _rank(level: str) -> int:
    return LADDER.index(level)  # 0 = best


def pick(
    model: memory.ModelInfo,
    *,
    ram_bytes: int,
    task: str = "chat",
    n_ctx: int = 4096,
    report: dict | None = None,
) -> Pick:
    """The recommended level for `model` within `ram_bytes` at `n_ctx` for `task` (see the module doc)."""
    if task not in TASKS:
        raise PickError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if ram_bytes <= 0:
        raise PickError(f"the memory budget must be positive, got {ram_bytes} bytes")
    est = {lv: memory.estimate(model, n_ctx=n_ctx, level=lv) for lv in LADDER}
    spare = {lv: _spare(e, ram_bytes) for lv, e in est.items()}
    floor = FLOORS[task]
    budget = f"{_gib(ram_bytes)} at n_ctx {n_ctx}"

    level, rule = next(
        (
            (lv, f">= {need:.0%} spare -> {lv}" if need else "tight -> Q4_K_M")
            for lv, need in HEADROOM
            if spare[lv] >= need
        ),
        (None, ""),
    )
    if level is None and task not in GENERATION and spare["Q3_K_M"] >= 0:
        level, rule = "Q3_K_M", f"Q4_K_M does not fit; {task} may use Q3_K_M"
    if level is not None and _rank(level) > _rank(floor):  # below the task's floor
        level, rule = (floor, f"{task} needs >= {floor}") if spare[floor] >= 0 else (None, "")
    if level is None:
        return _nothing_fits(model, est, ram_bytes=ram_bytes, task=task, n_ctx=n_ctx, budget=budget)
    why = f"{_gib(est[level].needed_bytes)} of {budget} leaves {spare[level]:.0%} spare ({rule})"
    rows = _report_rows(report)
    measured = rows.get(level)
    if rows:
        tol = KLD_TOLERANCE[task]
        kld = measured.get("kld_mean") if measured else None
        if kld is not None and kld > tol:
            better = [
                lv
                for lv in reversed(LADDER[: _rank(level)])
                if spare[lv] >= 0
                and (rows.get(lv) or {}).get("kld_mean") is not None
                and rows[lv]["kld_mean"] <= tol
            ]
            if better:
                old, level = level, better[0]
                measured = rows[level]
                why = (
                    f"measured KLD of {old} {kld:.4f} > {tol} for {task}; {level} fits "
                    f"({_gib(est[level].needed_bytes)} of {budget}, {spare[level]:.0%} spare)"
                )
        if measured:
            why += "; measured: " + _measured_text(measured)
    return Pick(level, f"{level}: {why}", task, n_ctx, ram_bytes, est, measured)


def _measured_text(row: dict) -> str:
    parts = []
    if row.get("ppl") is not None:
        delta = row.get("ppl_delta_pct")
        parts.append(f"PPL {row['ppl']:.3f}" + (f" ({delta:+.2f}% vs base)" if delta is not None else ""))
    if row.get("kld_mean") is not None:
        parts.append(f"KLD {row['kld_mean']:.4f}")
    if row.get("same_top") is not None:
        parts.append(f"same top token {row['same_top']:.1f}%")  # report.json: percent, 0-100
    if row.get("tok_s") is not None:
        parts.append(f"{row['tok_s']:.1f} tok/s")
    return ", ".join(parts) or "no numbers"


def _nothing_fits(model, est, *, ram_bytes, task, n_ctx, budget) -> Pick:
    floor = target = FLOORS[task]
    need = est[target].needed_bytes
    reason = f"nothing fits: {target} (the least {task} allows) needs {_gib(need)}, more than {budget}"
    tips = []
    if task in ("code", "creative") and est["Q4_K_M"].needed_bytes <= ram_bytes:
        tips.append(
            f"Q4_K_M fits ({_gib(est['Q4_K_M'].needed_bytes)}) but is below the {floor} floor for {task}"
        )
    lo, hi = 0, n_ctx // 256  # the longest context (a multiple of 256 cells) at which the target fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory.estimate(model, n_ctx=mid * 256, level=target).needed_bytes <= ram_bytes:
            lo = mid
        else:
            hi = mid - 1
    if 0 < lo * 256 < n_ctx:
        e = memory.estimate(model, n_ctx=lo * 256, level=target)
        tips.append(f"a shorter context fits: {target} at n_ctx {lo * 256} needs {_gib(e.needed_bytes)}")
    for kv in ("q8_0", "q4_0"):
        e = memory.estimate(model, n_ctx=n_ctx, level=target, kv_type=kv)
        if e.needed_bytes <= ram_bytes:
            tips.append(f"a {kv} KV cache fits: {target} at n_ctx {n_ctx} needs {_gib(e.needed_bytes)}")
            break
    e = est[target]
    fixed = e.needed_bytes - (e.weights_bytes - e.reclaimable_bytes)
    per_param = (e.weights_bytes - e.reclaimable_bytes) / max(model.n_params, 1)
    room = ram_bytes - fixed
    if room > 0:
        tips.append(
            f"a smaller model fits: about {room / per_param / 1e9:.2f}B parameters or fewer at {target} "
            f"(this one has {model.n_params / 1e9:.2f}B)"
        )
    else:
        tips.append(
            f"the KV cache and buffers alone need {_gib(fixed)} at n_ctx {n_ctx}: shorten the context"
        )
    return Pick(None, reason, task, n_ctx, ram_bytes, est, None, tips)


# -- reports ---------------------------------------------------------------------------------------------


def _report_rows(report: dict | None) -> dict[str, dict]:
    """The report's rows by level. The calibrated rows of `report --optimize` ("Q4_K_M opt", with a
    `variant`) are files llama-quantize does not make at that level: they do not stand for it."""
    if not report:
        return {}
    rows = {}
    for row in report.get("levels") or []:
        if isinstance(row, dict) and isinstance(row.get("level"), str) and not row.get("variant"):
            rows[row["level"].upper()] = row
    return rows


def load_report(path: str | os.PathLike) -> dict:
    """A report.json, or the folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PickError(f"{p}: no such report") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PickError(f"{p}: not a readable report.json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
        raise PickError(f"{p}: a report.json needs a 'levels' list")
    return data


def find_report(model_path: str | os.PathLike) -> dict | None:
    """The report in ggufkit's cache (cache.cache_dir("reports")) whose model_sha256 is this file's."""
    from .cache import cache_dir, sha256_file

    root = cache_dir("reports")
    candidates = [root / "report.json", *sorted(root.glob("*/report.json"))]
    if not any(c.is_file() for c in candidates):
        return None
    digest = sha256_file(model_path)
    for c in candidates:
        try:
            data = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if (
            isinstance(data, dict)
            and data.get("model_sha256") == digest
            and isinstance(data.get("levels"), list)
        ):
            return data
    return None
