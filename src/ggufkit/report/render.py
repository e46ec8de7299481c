"""The report's writers: the ladder as a table (text and Markdown), report.md, report.png (size vs KLD and
same-top agreement), report.html (the table and the picture in one file) and report.json, written whole
or not at all."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..cache import atomic_write, cache_dir
from .measure import CONTEXTS
from .records import write_json


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _ram_text(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


HEADERS = [
    "level",
    "size MiB",
    "bpw",
    "PPL",
    "ΔPPL",
    "mean KLD",
    "same top",
    "tok/s",
    *[f"RAM {c // 1024}K" for c in CONTEXTS],
]


def _pm(value: float, err: float | None, digits: int, unit: str = "") -> str:
    """value ± its uncertainty (llama-perplexity's, as report.json holds it), so a step can be told from
    noise; the value alone where there is no uncertainty."""
    if err is None:
        return f"{value:.{digits}f}{unit}"
    return f"{value:.{digits}f} ± {err:.{digits}f}{unit}"


def _cells(r: dict) -> list[str]:
    ppl = "" if r["ppl"] is None else _pm(r["ppl"], r.get("ppl_err"), 3)
    name = r["level"] + (" (base)" if r.get("base") else "")
    delta = "—" if r.get("base") else f"{r['ppl_delta_pct']:+.2f}%"
    kld = "—" if r.get("base") else _pm(r["kld_mean"], r.get("kld_err"), 4)
    top = "—" if r.get("base") else _pm(r["same_top"], r.get("same_top_err"), 1, "%")
    return [
        name,
        _mib(r["size_bytes"]),
        f"{r['bpw']:.2f}",
        ppl,
        delta,
        kld,
        top,
        f"{r['tok_s']:.1f}",
        *[_ram_text(r["ram_by_ctx"][str(c)]) for c in CONTEXTS],
    ]


def format_table(data: dict) -> str:
    """The ladder as a Markdown table (also what the CLI prints)."""
    rows = [HEADERS, *[_cells(r) for r in data["levels"]]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    lines = [fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *[fmt(r) for r in rows[1:]]])


def _summary_lines(data: dict) -> list[str]:
    m, o, b = data["machine"], data["options"], data["base"]
    base = b["type"] + (f", dequantized from {b['dequantized_from']}" if b["dequantized_from"] else "")
    src = data.get("source") or {}
    if src.get("kind") == "hf":
        model = (
            f"{data['model_name']} (Hugging Face checkpoint folder, {src['dtype']}; converted to GGUF sha256 "
            f"{data['model_sha256'][:12]})"
        )
    else:
        model = f"{data['model_name']} (sha256 {data['model_sha256'][:12]})"
    return [
        f"Model: {model}; base {base}.",
        f"Text: {o['text']}, ctx {o['ctx']}, {o['chunks']} chunks; quality engine {o['engine']}, "
        f"{o['threads']} thread(s); took {data.get('seconds', 0):.0f} s.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; load average {m['load_average_1min']} at "
        f"the start; {data['created']}.",
    ]


def render_markdown(data: dict) -> str:
    rec = data["recommendation"]
    parts = [
        f"# ggufkit report: {data['model_name']}",
        "",
        *_summary_lines(data),
        "",
        format_table(data),
        "",
        "PPL: perplexity on the text; ΔPPL against the base; mean KLD: KL divergence of the level's "
        "next-token distribution from the base's (nats/token); same top: how often both pick the same "
        "most likely token; ± is one standard uncertainty of the mean over the scored tokens, as "
        "llama-perplexity gives it; RAM: what llama.cpp needs at that context (f16 KV cache).",
        "",
        "## Recommendation",
        "",
        f"**{rec['level'] or 'nothing fits'}** — {rec['reason']}",
    ]
    parts += [f"- {s}" for s in rec["suggestions"]]
    parts += [
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in data["notes"]],
        "",
        "![size vs quality](report.png)",
        "",
    ]
    return "\n".join(parts)


def render_png(data: dict) -> bytes:
    buf = io.BytesIO()
    size_quality_figure(data).savefig(buf, format="png")
    return buf.getvalue()


def size_quality_figure(data: dict):
    """report.png's matplotlib Figure: size vs mean KLD (log) and vs same-top agreement, one labelled point
    per level; the calibrated rows, if any, as series of their own with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = sorted(
        (r for r in data["levels"] if not r.get("base") and not r.get("variant")),
        key=lambda r: r["size_bytes"],
    )
    base = next((r for r in data["levels"] if r.get("base")), None)
    fig = Figure(figsize=(11, 4.5), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    size = [r["size_bytes"] / (1 << 20) for r in rows]
    kld = [max(r["kld_mean"], 1e-6) for r in rows]
    top = [r["same_top"] for r in rows]
    labels: dict[tuple, list[str]] = {}  # levels that land on the same point share one label
    for r, x, k, t in zip(rows, size, kld, top):
        labels.setdefault((round(x, 3), round(k, 9), round(t, 6)), []).append(r["level"])
    for ax, ys, title in ((ax1, kld, "mean KL divergence vs base (log)"), (ax2, top, "same top token (%)")):
        ax.plot(size, ys, "o-", color="tab:blue")
        for i, ((x, k, t), names) in enumerate(labels.items()):
            y = k if ax is ax1 else t
            off = (4, 5) if i % 2 == 0 else (4, -11)  # alternate above/below: neighbours do not overlap
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=off, fontsize=8)
        ax.set_xlabel("file size (MiB)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    _plot_variants(data, ax1, ax2)
    ax1.set_yscale("log")
    if base is not None:
        ax2.axhline(100.0, color="gray", ls="--", lw=1)
        ax2.annotate(
            f"base {base['level']} ({base['size_bytes'] / (1 << 20):.0f} MiB)",
            (min(size), 100.0),
            textcoords="offset points",
            xytext=(0, -12),
            fontsize=8,
            color="gray",
        )
    fig.suptitle(
        f"{data['model_name']}: size vs quality ({data['options']['text']}, {data['options']['chunks']}"
        f"x{data['options']['ctx']} tokens)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# the calibrated rows (report/optimized.py) as their own series: (variant, legend label, style, colour)
VARIANT_STYLES = (
    ("imatrix", "llama.cpp + imatrix", "s--", "tab:orange"),
    ("opt", "ggufkit optimized", "^-", "tab:green"),
)


def _plot_variants(data: dict, ax1, ax2) -> None:
    """The "LEVEL imatrix" and "LEVEL opt" rows, each a series with its own marker, and a legend; nothing
    when the report has none."""
    series = [
        (
            label,
            style,
            colour,
            sorted((r for r in data["levels"] if r.get("variant") == v), key=lambda r: r["size_bytes"]),
        )
        for v, label, style, colour in VARIANT_STYLES
    ]
    if not any(rows for *_, rows in series):
        return
    for ax, key in ((ax1, "kld_mean"), (ax2, "same_top")):
        ax.lines[0].set_label("llama.cpp levels")
        for label, style, colour, rows in series:
            if rows:
                ys = [max(r[key], 1e-6) if key == "kld_mean" else r[key] for r in rows]
                ax.plot([r["size_bytes"] / (1 << 20) for r in rows], ys, style, color=colour, label=label)
        ax.legend(fontsize=8)


def render_html(data: dict, png: bytes) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in data["levels"])
    rec = data["recommendation"]
    notes = "".join(f"<li>{e(n)}</li>" for n in data["notes"])
    summary = "".join(f"<p>{e(s)}</p>" for s in _summary_lines(data))
    img = base64.b64encode(png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>ggufkit report: {e(data['model_name'])}</title><style>"
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>"
        f"<h1>ggufkit report: {e(data['model_name'])}</h1>{summary}"
        f"<table><tr>{head}</tr>{body}</table>"
        f"<h2>Recommendation</h2><p><b>{e(rec['level'] or 'nothing fits')}</b> — {e(rec['reason'])}</p>"
        f"<h2>Notes</h2><ul>{notes}</ul>"
        f"<img alt='size vs quality' src='data:image/png;base64,{img}'></body></html>\n"
    )


def write_outputs(data: dict, out: Path) -> dict[str, Path]:
    """report.png, .md, .html and .json into `out`, and a copy of report.json where `ggufkit pick` finds it
    (cache_dir("reports")/<model sha256>); returns kind -> written path."""
    png = render_png(data)
    files = {
        "png": out / "report.png",
        "md": out / "report.md",
        "html": out / "report.html",
        "json": out / "report.json",
    }
    atomic_write(files["png"], png)
    atomic_write(files["md"], render_markdown(data).encode())
    atomic_write(files["html"], render_html(data, png).encode())
    write_json(files["json"], data)  # last: its presence means the set is complete
    pick_copy = cache_dir("reports", data["model_sha256"]) / "report.json"
    if pick_copy.resolve() != files["json"].resolve():
        write_json(pick_copy, data)
        files["json_for_pick"] = pick_copy
    return files
