"""The `general.*` KVs convert_hf_to_gguf.py writes before the architecture's: type, sampling, authorship.

Where each value comes from (gguf-py `metadata.py: Metadata.load` and `set_gguf_meta_model`, and
`ModelBase.prepare_metadata`), first source that gives a value wins:
1. the README.md model card's YAML front matter (only when line 1 is exactly `---`), read as the
   reference reads it (`- no` quoted against YAML's Norway problem, tabs as two spaces, `yaml.safe_load`);
2. config.json's `_name_or_path`, when it looks like a Hugging Face id (at most one `/`);
3. the folder's own name;
then general.name falls back to the folder name, and size_label to the parameter count rounded as
llama.cpp rounds it. generation_config.json gives the general.sampling.* keys (an unreadable one is ignored,
as in the reference). The id heuristics (`_id_components`) split a name like `SmolLM2-135M-Instruct` into
basename / size label / finetune / version; their quirks are kept on purpose: the names land in the file.

Values the reference would crash on (a YAML number where it wants a string) are written as strings;
an unreadable model card front matter is a ConvertError.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from ggufkit.errors import ConvertError
from ggufkit.gguf.types import GGUFValueType as V

KV = tuple  # (key, GGUFValueType, value) or (key, ARRAY, list, sub_type)

# general.sampling.* key, generation_config.json key(s) (first present wins), value type
_SAMPLING = (
    ("sequence", ("sequence",), V.STRING),
    ("top_k", ("top_k",), V.INT32),
    ("top_p", ("top_p",), V.FLOAT32),
    ("min_p", ("min_p",), V.FLOAT32),
    ("xtc_probability", ("xtc_probability",), V.FLOAT32),
    ("xtc_threshold", ("xtc_threshold",), V.FLOAT32),
    ("temp", ("temperature",), V.FLOAT32),
    ("penalty_last_n", ("penalty_last_n",), V.INT32),
    ("penalty_repeat", ("penalty_repeat", "repetition_penalty"), V.FLOAT32),
    ("mirostat", ("mirostat",), V.INT32),
    ("mirostat_tau", ("mirostat_tau",), V.FLOAT32),
    ("mirostat_eta", ("mirostat_eta",), V.FLOAT32),
)

# Written in this order after general.name (attribute, GGUF key).
_AUTHORSHIP = (
    ("author", "general.author"),
    ("version", "general.version"),
    ("organization", "general.organization"),
    ("finetune", "general.finetune"),
    ("basename", "general.basename"),
    ("description", "general.description"),
    ("quantized_by", "general.quantized_by"),
    ("size_label", "general.size_label"),
    ("license", "general.license"),
    ("license_name", "general.license.name"),
    ("license_link", "general.license.link"),
    ("url", "general.url"),
    ("doi", "general.doi"),
    ("uuid", "general.uuid"),
    ("repo_url", "general.repo_url"),
    ("source_url", "general.source.url"),
    ("source_doi", "general.source.doi"),
    ("source_uuid", "general.source.uuid"),
    ("source_repo_url", "general.source.repo_url"),
)
_ENTRY_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")

# Model card key -> attribute, applied in this order, each only while the attribute is still unset.
_CARD_FIELDS = (
    ("name", "name"), ("author", "author"), ("version", "version"), ("organization", "organization"),
    ("description", "description"), ("finetune", "finetune"), ("basename", "basename"),
    ("size_label", "size_label"), ("url", "source_url"), ("doi", "source_doi"), ("uuid", "source_uuid"),
    ("repo_url", "source_repo_url"),
    ("model_name", "name"), ("model_author", "author"), ("model_version", "version"),
    ("model_organization", "organization"), ("model_description", "description"),
    ("model_finetune", "finetune"), ("model_basename", "basename"), ("model_size_label", "size_label"),
    ("model_url", "source_url"), ("model_doi", "source_doi"), ("model_uuid", "source_uuid"),
    ("model_repo_url", "source_repo_url"),
    ("model_name", "name"), ("model_creator", "author"), ("model_type", "basename"),
)  # fmt: skip


def general_kvs(folder, cfg=None, *, total_params: int) -> list[KV]:
    """general.type, general.sampling.*, general.name ... general.languages, in the reference's order.

    `total_params` is the element count of every tensor the GGUF will hold (rope_freqs and norms included).
    `folder` should be the path as the user gave it: its last component names the model if nothing else does.
    """
    folder = Path(folder)
    meta = _Meta()
    card = load_model_card(folder)
    raw = cfg.raw if cfg is not None else _read_json(folder / "config.json")
    _apply_card(meta, card, total_params)
    name_or_path = raw.get("_name_or_path") if isinstance(raw, dict) else None
    if isinstance(name_or_path, str) and name_or_path.count("/") <= 1:
        _apply_id(meta, name_or_path, total_params)
    _apply_id(meta, folder.name, total_params)
    if meta.name is None:
        meta.name = folder.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = size_label(total_params)

    kvs: list[KV] = [("general.type", V.STRING, "model")]
    gen = _generation_config(folder)
    for key, sources, vtype in _SAMPLING:
        value = next((gen[s] for s in sources if s in gen), None)
        if vtype == V.STRING:
            _add_string(kvs, f"general.sampling.{key}", value)
        elif value is not None:
            kvs.append(_typed(f"general.sampling.{key}", vtype, value, "generation_config.json"))
    _add_string(kvs, "general.name", meta.name)
    for attr, key in _AUTHORSHIP:
        value = getattr(meta, attr)
        if attr == "license" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        _add_string(kvs, key, value)
    for attr, prefix in (("base_models", "general.base_model"), ("datasets", "general.dataset")):
        entries = getattr(meta, attr)
        if entries is None:
            continue
        kvs.append((f"{prefix}.count", V.UINT32, len(entries)))
        for i, entry in enumerate(entries):
            for field in _ENTRY_FIELDS:
                if field in entry:
                    _add_string(kvs, f"{prefix}.{i}.{field}", entry[field])
    for attr, key in (("tags", "general.tags"), ("languages", "general.languages")):
        values = getattr(meta, attr)
        if values:  # an empty list is not written
            kvs.append(_array(key, values))
    return kvs


class _Meta:
    """The values gathered so far; None = not yet known (the next source may fill it)."""

    def __init__(self):
        for attr in ("name", "base_models", "datasets", "tags", "languages", *(a for a, _ in _AUTHORSHIP)):
            setattr(self, attr, None)


# ---- sources ---------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _generation_config(folder: Path) -> dict:
    gen = _read_json(folder / "generation_config.json")
    return gen if isinstance(gen, dict) else {}


def load_model_card(folder: Path) -> dict:
    """README.md's YAML front matter as a dict ({} without one). ConvertError if it is not readable YAML."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return {}
    import yaml  # PyYAML: only needed when there is a model card

    try:
        with open(path, encoding="utf-8") as f:  # text mode: \r\n read as \n, as the reference reads it
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read the model card: {e}") from None
    if not lines or lines[0] != "---":
        return {}
    front = []
    for line in lines[1:]:
        if line == "---":
            break
        front.append(line)
    text = "\n".join(front) + "\n"
    text = text.replace("- no\n", '- "no"\n').replace("\t", "  ")  # the reference's two fix-ups, kept
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise ConvertError(
            f"{path}: the model card's YAML front matter does not parse: {str(e)[:200]}"
        ) from None
    return data if isinstance(data, dict) else {}


def _apply_card(meta: _Meta, card: dict, total_params: int) -> None:
    for card_key, attr in _CARD_FIELDS:
        if card_key in card and getattr(meta, attr) is None:
            setattr(meta, attr, card[card_key])
    if any(k in card for k in ("base_model", "base_models", "base_model_sources")):
        value = card.get("base_model", card.get("base_models", card.get("base_model_sources")))
        meta.base_models = _sources(value, total_params)
    if any(k in card for k in ("datasets", "dataset", "dataset_sources")):
        value = card.get("datasets", card.get("dataset", card.get("dataset_sources")))
        meta.datasets = _sources(value, total_params)
    for key in ("license", "license_name", "license_link"):
        if key in card and getattr(meta, key) is None:
            setattr(meta, key, card[key])
    for card_key, attr in (("tags", "tags"), ("pipeline_tag", "tags"), ("languages", "languages"),
                           ("language", "languages")):  # fmt: skip
        value = card.get(card_key)
        if value is None:
            continue
        current = getattr(meta, attr) or []
        if isinstance(value, str):
            current.append(value)
        elif isinstance(value, list):
            current.extend(value)
        setattr(meta, attr, current)


_HF_URL = re.compile(r"https?://huggingface.co/([^/]+/[^/]+)$")


def _sources(value, total_params: int) -> list[dict]:
    """base_model / datasets entries: HF ids and URLs parsed into name/organization/version/repo_url."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    out = []
    for item in items:
        entry: dict = {}
        if isinstance(item, str):
            if item.startswith(("http://", "https://", "ssh://")):
                entry["repo_url"] = item
                match = _HF_URL.match(item) if "huggingface.co" in item else None
                if match:
                    name, org, _, _, version, _ = _id_components(match.group(1), total_params)
                    _entry_names(entry, name, org, version)
            else:
                name, org, _, _, version, _ = _id_components(item, total_params)
                _entry_names(entry, name, org, version)
                if org is not None and name is not None:
                    entry["repo_url"] = f"https://huggingface.co/{org}/{name}"
        elif isinstance(item, dict):
            entry = item
        out.append(entry)
    return out


def _entry_names(entry: dict, name, org, version) -> None:
    if name is not None:
        entry["name"] = id_to_title(name)
    if org is not None:
        entry["organization"] = id_to_title(org)
    if version is not None:
        entry["version"] = version


def _apply_id(meta: _Meta, model_id: str, total_params: int) -> None:
    name, org, basename, finetune, version, label = _id_components(model_id, total_params)
    for attr, value in (
        ("name", None if name is None else id_to_title(name)),
        ("organization", None if org is None else id_to_title(org)),
        ("basename", basename),
        ("finetune", finetune),
        ("version", version),
        ("size_label", label),
    ):
        if getattr(meta, attr) is None and value is not None:
            setattr(meta, attr, value)


# ---- the id heuristics ---------------------------------------------------------------------------------

_VERSION = re.compile(r"(v|iter)?\d+([.]\d+)*", re.IGNORECASE)
_QUANT_TYPE = re.compile(r"i?q\d(_\w)*|b?fp?(16|32)", re.IGNORECASE)
_SIZE = re.compile(r"(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)", re.IGNORECASE)
_FINETUNE = re.compile(r"chat|instruct|vision|lora", re.IGNORECASE)


def id_to_title(s: str) -> str:
    """'smollm2-135m-instruct' -> 'Smollm2 135m Instruct': lower-case words title-cased, except versions and
    words starting with a digit; words with any capital kept as they are."""
    words = s.strip().replace("-", " ").split()
    return " ".join(
        w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w) else w for w in words
    )


def _id_components(model_id: str, total_params: int = 0):
    """(full name, organization, basename, finetune, version, size label) of an HF-style id `[org/]name`."""
    if " " in model_id:  # a sentence, not an id
        return model_id, None, None, None, None, None
    org, full = model_id.split("/", 1) if "/" in model_id else (None, model_id)
    if org is not None and org.startswith("."):  # './x' or '../x': a path, not an org
        org = None
    parts = [p for p in full.split("-") if p]
    kinds: list[set] = [set() for _ in parts]
    for i, part in enumerate(parts):
        if _VERSION.fullmatch(part):
            kinds[i].add("version")
        elif _QUANT_TYPE.fullmatch(part):
            kinds[i].add("type")
            parts[i] = part.upper()
        elif i > 0 and _SIZE.fullmatch(part):
            part = part.replace("_", ".")
            if part[-1].isdecimal():  # bloom-7b1 -> 7.1b
                part = part[:-2] + "." + part[-1] + part[-2]
            if len(part) > 1 and part[-2].isdecimal() and part[-1] in "kmbt":
                part = part[:-1] + part[-1].upper()
            if total_params != 0:
                try:
                    label_params = float(part[:-1]) * pow(1000, " KMBT".find(part[-1]))
                except ValueError:
                    label_params = None
                # A size far from the real one is a context length (e.g. '32k'): a finetune, lower-cased.
                if label_params is not None and (
                    (total_params < 0 and label_params < abs(total_params) // 8)
                    or (total_params > 0 and abs(label_params - total_params) > 7 * total_params // 8)
                ):
                    kinds[i].add("finetune")
                    part = part[:-1] + part[-1].lower()
            if not kinds[i]:
                kinds[i].add("size_label")
            parts[i] = part
        elif i > 0 and _FINETUNE.fullmatch(part):
            kinds[i].add("type" if total_params < 0 and part.lower() == "lora" else "finetune")

    # word sizes ('small', 'xl') are dropped when a numeric size is present
    if any(c.isdecimal() for p, k in zip(parts, kinds) if "size_label" in k for c in p):
        for p, k in zip(parts, kinds):
            if "size_label" in k and all(c.isalpha() for c in p):
                k.discard("size_label")
    at_start = True
    for p, k in zip(parts, kinds):
        if at_start and ((not k and p[0].isalpha()) or "version" in k):
            k.add("basename")
        else:
            at_start = False
            if not k:
                k.add("finetune")
    for k in reversed(kinds):  # a trailing version is not part of the basename
        if "basename" in k and len(k) > 1:
            k.discard("basename")
        else:
            break

    basename = "-".join(p for p, k in zip(parts, kinds) if "basename" in k) or None
    label = "-".join(dict.fromkeys(p for p, k in zip(parts, kinds) if "size_label" in k)) or None
    finetune = "-".join(p for p, k in zip(parts, kinds) if "finetune" in k) or None
    version = "-".join(p for p, k in zip(parts, kinds) if "version" in k and "basename" not in k) or None
    if label is None and finetune is None and version is None:
        basename = None
    return full, org, basename, finetune, version, label


def size_label(total_params: int) -> str:
    """llama.cpp's parameter-count label: at least two significant digits, e.g. 134_515_008 -> '135M'."""
    n = abs(total_params)
    if n > 1e12:
        x, suffix = n * 1e-12, "T"
    elif n > 1e9:
        x, suffix = n * 1e-9, "B"
    elif n > 1e6:
        x, suffix = n * 1e-6, "M"
    else:
        x, suffix = n * 1e-3, "K"
    digits = max(2 - len(str(round(x)).lstrip("0")), 0)
    return f"{x:.{digits}f}{suffix}"


# ---- typed values --------------------------------------------------------------------------------------


def _add_string(kvs: list, key: str, value) -> None:
    if not value:  # gguf-py's add_string skips None, "" (and any other falsy value)
        return
    kvs.append((key, V.STRING, value if isinstance(value, str) else str(value)))


def _typed(key: str, vtype: V, value, source: str) -> KV:
    bad = ConvertError(f"{source}: {str(value)[:60]!r} cannot be written as {key} ({vtype.name})")
    if not isinstance(value, (int, float)) or (vtype == V.INT32 and isinstance(value, float)):
        raise bad
    try:
        struct.pack("<i" if vtype == V.INT32 else "<f", value)
    except (OverflowError, struct.error):
        raise bad from None
    return (key, vtype, int(value) if vtype == V.INT32 else float(value))


def _array(key: str, values: list) -> KV:
    # gguf-py types an array by its first element; model cards hold strings (others are written as text)
    return (key, V.ARRAY, [v if isinstance(v, str) else str(v) for v in values], V.STRING)
