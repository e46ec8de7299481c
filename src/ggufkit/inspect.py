"""`ggufkit inspect`: what a GGUF file holds, as a JSON-ready dict and as text.

Everything comes from the validated header, metadata and tensor table (ggufkit.gguf.reader); no tensor
data is read and nothing from the file is executed (the chat template is shown as text only). Text
output escapes control characters, so a hostile string cannot drive the terminal.

The level's name comes from general.file_type (a llama_ftype id). Without it, the level is guessed as
llama.cpp's model loader does: the ggml type held by the most tensors (ties: the first type to reach the
maximum, visiting tensors in name order) mapped to its "mostly" ftype, and reported as a guess.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from .gguf.reader import GGUFModel, open_gguf
from .gguf.types import GGUFValueType
from .quantize.levels import LEVELS

# llama_ftype ids (include/llama.h) of levels ggufkit cannot produce; the others are in levels.LEVELS.
OTHER_FTYPES = {
    19: "IQ2_XXS", 20: "IQ2_XS", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 31: "IQ1_M", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4",
    40: "Q1_0", 41: "Q2_0",
}  # fmt: skip
FTYPE_NAMES = {lv.ftype_id: name for name, lv in LEVELS.items()} | OTHER_FTYPES
FTYPE_GUESSED = 1024  # LLAMA_FTYPE_GUESSED: a writer's mark that the ftype was not specified

# The ftype llama.cpp's loader assumes for a dominant tensor type (llama-model-loader.cpp); others -> F32.
_FTYPE_OF_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M",
    "Q6_K": "Q6_K", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "NVFP4": "NVFP4", "Q1_0": "Q1_0", "Q2_0": "Q2_0",
}  # fmt: skip

ARRAY_SHOWN = 8  # arrays longer than this are summarised by length and their first items
ARRAY_HEAD = 5
STRING_SHOWN = 160  # longer strings are cut in the metadata listing (the chat template has its own section)
_TOKEN_ID_KEY = re.compile(r"tokenizer\.ggml\.(\w+)_token_id")


def _plain(v):
    """A value as JSON-ready Python (numpy -> lists/scalars; non-finite floats -> strings)."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _value_entry(kv) -> dict:
    entry = {"key": kv.key, "type": kv.type.name}
    value = kv.value
    if kv.type == GGUFValueType.ARRAY:
        entry["element_type"] = kv.sub_type.name
        entry["length"] = len(value)
        if len(value) > ARRAY_SHOWN:
            entry["first"] = _plain(value[:ARRAY_HEAD])
            return entry
    elif isinstance(value, str) and len(value) > STRING_SHOWN:
        entry["length"] = len(value)
        entry["first"] = value[:STRING_SHOWN]
        return entry
    entry["value"] = _plain(value)
    return entry


def _level(m: GGUFModel) -> dict:
    ftype = m.get("general.file_type")
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        base = ftype & ~FTYPE_GUESSED
        name = FTYPE_NAMES.get(base, f"unknown ftype {base}")
        if ftype & FTYPE_GUESSED:
            return {
                "name": name,
                "file_type": ftype,
                "guessed": True,
                "source": "general.file_type, marked as guessed by its writer",
            }
        return {"name": name, "file_type": ftype, "guessed": False, "source": "general.file_type"}
    counts: Counter = Counter()
    top, top_n = None, 0
    for t in sorted(m.tensors, key=lambda t: t.name):
        counts[t.ggml_type] += 1
        if counts[t.ggml_type] > top_n:
            top, top_n = t.ggml_type, counts[t.ggml_type]
    if top is None:
        return {
            "name": None,
            "file_type": None,
            "guessed": True,
            "source": "no general.file_type, no tensors",
        }
    return {
        "name": _FTYPE_OF_TYPE.get(top.name, "F32"),
        "file_type": None,
        "guessed": True,
        "source": f"guessed: no general.file_type; {top_n} of {len(m.tensors)} tensors are {top.name}",
    }


def _tokenizer(m: GGUFModel) -> dict | None:
    keys = [k for k in m.kv if k.startswith("tokenizer.")]
    if not keys:
        return None
    tokens = m.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else None
    merges = m.get("tokenizer.ggml.merges")
    out = {
        "model": m.get("tokenizer.ggml.model"),
        "pre": m.get("tokenizer.ggml.pre"),
        "vocab_size": None if tokens is None else len(tokens),
        "merges": len(merges) if isinstance(merges, list) else None,
        "special_tokens": {},
        "flags": {},
    }
    for key in keys:
        kv = m.kv[key]
        match = _TOKEN_ID_KEY.fullmatch(key)
        if match and kv.type != GGUFValueType.ARRAY and isinstance(kv.value, int):
            tid = int(kv.value)
            text = tokens[tid] if tokens is not None and 0 <= tid < len(tokens) else None
            out["special_tokens"][match.group(1)] = {"id": tid, "text": text}
        elif key.startswith("tokenizer.ggml.add_") and kv.type == GGUFValueType.BOOL:
            out["flags"][key.removeprefix("tokenizer.ggml.")] = kv.value
    return out


def inspect_gguf(path, *, tensors: bool = False) -> dict:
    """Describe a GGUF file (JSON-serialisable). `tensors=True` adds the per-tensor table."""
    with open_gguf(path) as m:
        arch = m.architecture
        hparams = {}
        if arch:
            prefix = arch + "."
            for key, kv in m.kv.items():
                if key.startswith(prefix):
                    e = _value_entry(kv)
                    hparams[key.removeprefix(prefix)] = e.get("value", {"length": e.get("length")})
        by_type: dict[str, dict] = {}
        for t in m.tensors:
            row = by_type.setdefault(
                t.ggml_type.name, {"type": t.ggml_type.name, "tensors": 0, "elements": 0, "bytes": 0}
            )
            row["tensors"] += 1
            row["elements"] += t.n_elements
            row["bytes"] += t.nbytes
        total_bytes = sum(r["bytes"] for r in by_type.values())
        total_elements = sum(r["elements"] for r in by_type.values())
        types = sorted(by_type.values(), key=lambda r: -r["bytes"])
        for r in types:
            r["share"] = r["bytes"] / total_bytes if total_bytes else 0.0
            r["bits_per_weight"] = 8 * r["bytes"] / r["elements"]
        template = m.get("tokenizer.chat_template")
        info = {
            "path": str(path),
            "file_size": m.file_size,
            "version": m.version,
            "alignment": m.alignment,
            "data_offset": m.data_offset,
            "kv_count": len(m.kv),
            "tensor_count": len(m.tensors),
            "architecture": arch,
            "name": m.get("general.name"),
            "level": _level(m),
            "weights": {
                "elements": total_elements,
                "bytes": total_bytes,
                "bits_per_weight": 8 * total_bytes / total_elements if total_elements else None,
            },
            "types": types,
            "hyperparameters": hparams,
            "tokenizer": _tokenizer(m),
            "chat_template": template if isinstance(template, str) else None,
            "metadata": [_value_entry(kv) for kv in m.kv.values()],
        }
        if tensors:
            info["tensors"] = [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "type": t.ggml_type.name,
                    "bytes": t.nbytes,
                    "bits_per_weight": 8 * t.nbytes / t.n_elements,
                    "offset": t.offset,
                }
                for t in m.tensors
            ]
    return info


# ---- text ---------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _clean(text: str, *, keep_newlines: bool = False) -> str:
    """Escape control characters and undecodable bytes (kept as lone surrogates) for a terminal."""
    if not keep_newlines:
        text = text.replace("\n", "\\n").replace("\t", "\\t")

    def esc(match):
        c = ord(match.group())
        return (
            f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}" if c > 0xFF else f"\\x{c:02x}"
        )

    return _CONTROL.sub(esc, text)


def _show(v) -> str:
    if isinstance(v, str):
        return "'" + _clean(v) + "'"
    if isinstance(v, float):
        return f"{v:.9g}"
    return _clean(str(v))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _entry_text(e: dict) -> str:
    if "value" in e:
        return (
            _show(e["value"])
            if not isinstance(e["value"], list)
            else "[" + ", ".join(map(_show, e["value"])) + "]"
        )
    if e["type"] == "ARRAY":
        return f"[{e['length']} items: " + ", ".join(map(_show, e["first"])) + ", ...]"
    return f"{_show(e['first'])}... ({e['length']} chars)"


def format_inspect(info: dict) -> str:
    """The text report of `ggufkit inspect` for a dict from inspect_gguf."""
    lines = []
    add = lines.append
    lv = info["level"]
    w = info["weights"]
    add(f"file:         {_clean(info['path'])} ({_human(info['file_size'])})")
    add(
        f"format:       GGUF v{info['version']}, alignment {info['alignment']}, data at byte "
        f"{info['data_offset']}, {info['kv_count']} KVs, {info['tensor_count']} tensors"
    )
    add(
        f"architecture: {_clean(str(info['architecture']))}"
        + (f"  ({_show(info['name'])})" if info["name"] else "")
    )
    add(f"level:        {lv['name']}  ({_clean(lv['source'])})")
    bpw = f"{w['bits_per_weight']:.4f}" if w["bits_per_weight"] is not None else "n/a"
    add(f"weights:      {w['elements']:,} in {_human(w['bytes'])}, {bpw} bits per weight")
    add("")
    add("size by type:")
    add(f"  {'type':<8} {'tensors':>7} {'weights':>14} {'bytes':>12} {'share':>7} {'bpw':>7}")
    for r in info["types"]:
        add(
            f"  {r['type']:<8} {r['tensors']:>7} {r['elements']:>14,} {_human(r['bytes']):>12} "
            f"{100 * r['share']:>6.2f}% {r['bits_per_weight']:>7.4f}"
        )
    if info["hyperparameters"]:
        add("")
        add(f"hyper-parameters ({_clean(info['architecture'])}):")
        width = max(len(k) for k in info["hyperparameters"])
        for k, v in info["hyperparameters"].items():
            shown = f"[{v['length']} items]" if isinstance(v, dict) else _show(v)
            add(f"  {_clean(k):<{width}}  {shown}")
    tok = info["tokenizer"]
    if tok:
        add("")
        parts = [f"model {_show(tok['model'])}"]
        if tok["pre"] is not None:
            parts.append(f"pre {_show(tok['pre'])}")
        parts.append(f"{tok['vocab_size']} tokens")
        if tok["merges"] is not None:
            parts.append(f"{tok['merges']} merges")
        add("tokenizer:    " + ", ".join(parts))
        for name, st in tok["special_tokens"].items():
            text = _show(st["text"]) if st["text"] is not None else "(out of range)"
            add(f"  {_clean(name) + ' token':<16} {st['id']:>7}  {text}")
        for name, flag in tok["flags"].items():
            add(f"  {_clean(name):<16} {flag}")
    if info["chat_template"] is not None:
        add("")
        add(f"chat template ({len(info['chat_template'])} chars; shown, never run):")
        for line in _clean(info["chat_template"], keep_newlines=True).split("\n"):
            add("  | " + line.replace("\t", "    "))
    add("")
    add(f"metadata ({len(info['metadata'])} keys):")
    width = max([len(e["key"]) for e in info["metadata"]] + [0])
    for e in info["metadata"]:
        typ = e["type"] if e["type"] != "ARRAY" else f"{e['element_type']}[]"
        add(f"  {_clean(e['key']):<{width}}  {typ:<9} {_entry_text(e)}")
    if "tensors" in info:
        add("")
        add(f"tensors ({len(info['tensors'])}):")
        width = max([len(t["name"]) for t in info["tensors"]] + [4])
        add(f"  {'name':<{width}}  {'shape':<22} {'type':<8} {'bytes':>12} {'bpw':>7}")
        for t in info["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            add(
                f"  {_clean(t['name']):<{width}}  {shape:<22} {t['type']:<8} {t['bytes']:>12,} "
                f"{t['bits_per_weight']:>7.4f}"
            )
    return "\n".join(lines)
