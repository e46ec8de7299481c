"""The report's notes: where this model departs from the textbook, computed from the plans, the files and
the measurements (fallback tensors, levels with identical tensors, noise below the base, the steepest step,
a ladder that is not monotonic, contexts beyond the trained one, what tok/s means here)."""

from __future__ import annotations

from .measure import CONTEXTS


def _bpw_of_type(name: str) -> float:
    from ..gguf.types import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return 8.0 * size / block


def _bulk_type(row: dict) -> str:
    """The type most of a level's fallen-back tensors ended up in, else the level's own block type."""
    fb = row.get("fallbacks") or {}
    if fb:  # keys read "Q4_K -> Q5_0"
        return max(fb, key=fb.get).split(" -> ")[1]
    return row.get("default_type") or row["level"]


def notes_for(rows: list[dict], quant: dict[str, dict], info, opts: dict) -> list[str]:
    notes = []
    for lv, q in quant.items():
        if q["n_fallback"]:
            what = ", ".join(f"{n} x {k}" for k, n in sorted(q["fallbacks"].items(), key=lambda kv: -kv[1]))
            rows_text = " or ".join(map(str, q.get("fallback_rows") or [])) or "their"
            notes.append(
                f"{lv}: {q['n_fallback']} of {q['n_quantized']} quantized tensors fell back to another type "
                f"({what}): rows of {rows_text} weights are not a multiple of the block they were meant for. "
                f"The file averages {q['bpw']:.2f} bits per weight, against "
                f"{_bpw_of_type(q['default_type']):.2f} for {q['default_type']} blocks alone."
            )
    groups: dict[str, list[str]] = {}
    for lv, q in quant.items():
        groups.setdefault(q["tensor_sha256"], []).append(lv)
    for levels in groups.values():
        if len(levels) > 1:
            same = quant[levels[0]]["file_sha256"] == quant[levels[1]]["file_sha256"]
            notes.append(
                f"{' and '.join(levels)} produce identical tensors (tensor sha256 "
                f"{quant[levels[0]]['tensor_sha256'][:12]}); "
                + ("the files are identical too." if same else "the files differ only in general.file_type.")
            )
    for r in rows:
        if r.get("base") or r.get("ppl") is None:
            continue
        diff = r["ppl"] - r["base_ppl"]
        err = r["ppl"] * (r.get("ln_ppl_ratio_err") or 0.0)
        if diff < 0:
            notes.append(
                f"{r['level']}: PPL {r['ppl']:.3f} is below the base's {r['base_ppl']:.3f} "
                f"({diff:+.3f}, ±{err:.3f}): noise of a short text, not a better model; its KLD "
                f"({r['kld_mean']:.4f}) still measures the damage."
            )
    q_rows = sorted((r for r in rows if not r.get("base") and r.get("kld_mean")), key=lambda r: -r["bpw"])
    if len(q_rows) >= 2:
        jumps = [
            (b["kld_mean"] / a["kld_mean"], a, b) for a, b in zip(q_rows, q_rows[1:]) if a["kld_mean"] > 0
        ]
        if jumps:
            ratio, a, b = max(jumps, key=lambda j: j[0])
            notes.append(
                f"The steepest step down the ladder is {a['level']} -> {b['level']}: mean KLD x{ratio:.1f} "
                f"({a['kld_mean']:.4f} -> {b['kld_mean']:.4f}), same top token {a['same_top']:.1f}% -> "
                f"{b['same_top']:.1f}%, for {100 * (1 - b['size_bytes'] / a['size_bytes']):.0f}% less file."
            )
    by_size = sorted(
        (r for r in rows if not r.get("base") and r.get("kld_mean") is not None),
        key=lambda r: -r["size_bytes"],
    )
    for a, b in zip(by_size, by_size[1:]):
        if b["kld_mean"] < a["kld_mean"] and b["size_bytes"] < a["size_bytes"]:
            ta, tb = _bulk_type(a), _bulk_type(b)
            why = f"; most of {b['level']}'s tensors are {tb} here, {a['level']}'s {ta}" if ta != tb else ""
            notes.append(
                f"{b['level']} measured closer to the base than the larger {a['level']} (KLD "
                f"{b['kld_mean']:.4f} ± {b.get('kld_err') or 0:.4f} vs {a['kld_mean']:.4f} ± "
                f"{a.get('kld_err') or 0:.4f}){why}: the ladder is not monotonic on this model."
            )
    if info.n_ctx_train:
        over = [c for c in CONTEXTS if c > info.n_ctx_train]
        if over:
            notes.append(
                f"The model was trained with a {info.n_ctx_train}-token context; the RAM column at "
                f"{', '.join(map(str, over))} shows what llama.cpp would allocate, not a context it handles "
                f"well."
            )
    speed = next((r for r in rows if r.get("tok_s_kind")), None)
    if speed is not None:
        used = sorted({r["threads"] for r in rows if r.get("threads")})
        notes.append(f"tok/s: {speed['tok_s_kind']}, {'/'.join(map(str, used))} thread(s).")
    return notes
