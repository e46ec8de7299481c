"""gguf-py's SpecialVocab for a converted GGUF, and the KV list the tokenizer.* keys are collected in.

`SpecialVocab` mirrors gguf-py's `gguf.vocab.SpecialVocab` (`_load`, `_try_load_from_tokenizer_json`,
`_try_load_merges_txt`, `_try_load_from_config_json`, `add_to_gguf`): merges (tokenizer.json's model.merges or
merges.txt), the special token ids, add_bos/add_eos/add_sep (tokenizer_config.json and the tokenizer.json
post_processor, as the reference reads a TemplateProcessing), the normalizer flags and the chat template(s)
(tokenizer_config.json, chat_template.jinja + additional_chat_templates/, chat_template.json).

`KVs` keeps gguf-py's GGUFWriter semantics: KV order is the order of each key's first write; a later write of
the same key replaces the value in place; empty strings and empty arrays are never written. `read_json` /
`dict_json` read the tokenizer files (absent -> None, malformed -> ConvertError).
"""

from __future__ import annotations

import json
from pathlib import Path
from string import ascii_letters, digits

from ..errors import ConvertError
from ..gguf.types import GGUFValueType as T

# Special token kinds SpecialVocab looks for, and those the writer has an id key for (no cls).
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ID_KEYS = {"bos", "eos", "unk", "sep", "pad", "mask", "eot", "eom"}
_ADD_KEYS = {"bos", "eos", "sep"}
_ID_NAMES = {"unk": "unknown", "sep": "seperator", "pad": "padding"}  # the key names, spelling included

KV = tuple


class KVs:
    """Ordered KVs with GGUFWriter's semantics: a rewrite keeps the first position, empties are skipped."""

    def __init__(self):
        self.d: dict[str, tuple] = {}

    def put(self, key: str, vtype: T, value, sub: T | None = None) -> None:
        if vtype == T.STRING and not value:
            return
        if vtype == T.ARRAY and len(value) == 0:
            return
        self.d[key] = (key, vtype, value) if sub is None else (key, vtype, value, sub)

    def remove(self, key: str) -> None:
        self.d.pop(key, None)

    def list(self) -> list[KV]:
        return list(self.d.values())


# ---------------------------------------------------------------------------------------------- files


def read_json(path: Path):
    """A JSON file's content, None if absent; malformed JSON is refused by name."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def dict_json(path: Path) -> dict | None:
    data = read_json(path)
    if data is not None and not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _merges(path: Path, data: dict) -> list[str]:
    merges = (data.get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return merges
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        # the [a, b] form (transformers >= 4.45) may hold spaces; "a b" cannot, so a space becomes U+0120
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    raise ConvertError(f"{path}: unknown model.merges format")


def _merges_txt(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    out = []
    for line in lines:
        parts = line.strip().split(None, 3)
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
    return out


# ----------------------------------------------------------------------------------- special vocab


class SpecialVocab:
    """gguf-py SpecialVocab's findings: merges, ids and add_* flags (insertion-ordered), chat template."""

    def __init__(self, folder: Path, *, load_merges: bool, n_vocab: int | None, types=SPECIAL_TYPES):
        self.merges: list[str] = []
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.chat_template = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self.n_vocab = n_vocab
        self.types = tuple(types)
        self._from_tokenizer_files(folder, load_merges)
        self._from_config(folder)
        if load_merges and not self.merges and (folder / "merges.txt").is_file():
            self.merges = _merges_txt(folder / "merges.txt")

    def set_id(self, typ: str, tid) -> None:
        if not isinstance(tid, int):  # as the reference: a bool counts as an int
            return
        if tid < 0:
            raise ConvertError(f"special token {typ} has a negative id {tid}")
        if (self.n_vocab is None or tid < self.n_vocab) and typ not in self.ids:
            self.ids[typ] = tid

    def _from_tokenizer_files(self, folder: Path, load_merges: bool) -> None:
        tj_path = folder / "tokenizer.json"
        tj = dict_json(tj_path)
        added = []
        if tj is not None:
            if load_merges:
                self.merges = _merges(tj_path, tj)
            added = tj.get("added_tokens") or []
            if tj.get("normalizer"):
                self._normalizer(tj["normalizer"])
        tc = dict_json(folder / "tokenizer_config.json")
        if tj:
            self._post_processor(tj, tc)
        if not tc:
            return
        self._chat_template(folder, tc)
        for typ in self.types:
            flag = tc.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in self.add:
                self.add[typ] = flag
            entry = tc.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            # the first tokenizer.json added token with that text (never the base vocabulary)
            self.set_id(typ, next((a.get("id") for a in added if a.get("content") == entry), None))

    def _normalizer(self, norm: dict) -> None:
        kind = norm.get("type")
        if kind == "Lowercase":
            self.lowercase = True
        elif kind == "StripAccents":
            self.strip_accents = True
        elif kind == "BertNormalizer":
            self.lowercase = norm.get("lowercase", self.lowercase)
            self.strip_accents = norm.get("strip_accents", self.strip_accents)
        elif kind == "Sequence":
            for sub in norm.get("normalizers", []):
                self._normalizer(sub)

    def _post_processor(self, tj: dict, tc: dict | None) -> None:
        """add_bos/add_eos (and bos/eos/cls/sep/eot names in tc) from the post-processor, as SpecialVocab
        reads it: ByteLevel -> no BOS/EOS unless told; Roberta -> all three; a TemplateProcessing's first and
        last special tokens of `single` decide add_bos / add_eos (crudely, as the reference does)."""
        post = tj.get("post_processor")
        if not post:
            return
        cfg = tc or {}
        bos, cls, eos, sep = (cfg.get(f"{t}_token") for t in ("bos", "cls", "eos", "sep"))
        if not bos and cls and tc:
            tc["bos_token"] = bos = cls
        if not eos and sep and tc:
            tc["eos_token"] = eos = sep
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                if not cls and tc:
                    tc["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and tc:
                    tc["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                bos, cls, eos, sep = self._template(proc, tc, bos, cls, eos, sep)

    def _template(self, proc: dict, tc: dict | None, bos, cls, eos, sep):
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            if first:
                if not tc:
                    bos = first
                elif first not in (bos, cls):
                    if not bos:
                        tc["bos_token"] = bos = first
                    if not cls:
                        tc["cls_token"] = cls = first
                self.add["bos"] = first in (bos, cls)
            last = single[-1].get("SpecialToken", {}).get("id")
            if last:
                if not tc:
                    eos = last
                elif last != eos:
                    # the old EOS becomes EOT (or EOM), the trailing token the EOS
                    for extra in ("eot", "eom"):
                        if extra not in self.types:
                            self.types += (extra,)
                            tc[f"{extra}_token"] = eos
                            break
                    tc["eos_token"] = eos = last
                self.add["eos"] = last == eos
        if pair:
            start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
            stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
            pair = pair[start:stop]
            if pair:
                a = pair[0].get("Sequence", {}).get("id")
                b = pair[-1].get("Sequence", {}).get("id")
                middle = pair[1:-1]
                if a == "A" and b == "B" and middle:
                    add_sep = False
                    entry = middle[0].get("SpecialToken", {}).get("id")
                    if entry and entry in (sep, eos) and not last:
                        add_sep = True
                    if len(middle) == 2:
                        entry = middle[1].get("SpecialToken", {}).get("id")
                        if entry and entry in (sep, eos):
                            add_sep = True
                    self.add["sep"] = add_sep
                    if add_sep and not sep and tc:
                        tc["sep_token"] = eos
        return bos, cls, eos, sep

    def _chat_template(self, folder: Path, tc: dict) -> None:
        alt = None
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}]
                alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif (folder / "chat_template.json").is_file():
            ct = dict_json(folder / "chat_template.json")
            alt = ct.get("chat_template")
        template = tc.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            self.chat_template = template

    def _from_config(self, folder: Path) -> None:
        config = dict_json(folder / "config.json")
        if config is None:
            return
        text = config.get("text_config")
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(text, dict):
                tid = text.get(f"{typ}_token_id")
            self.set_id(typ, tid)

    def write(self, kvs: KVs) -> None:
        if self.merges:
            kvs.put("tokenizer.ggml.merges", T.ARRAY, self.merges, T.STRING)
        for typ, tid in self.ids.items():
            if typ in _ID_KEYS:
                kvs.put(f"tokenizer.ggml.{_ID_NAMES.get(typ, typ)}_token_id", T.UINT32, tid)
        for typ, flag in self.add.items():
            if typ in _ADD_KEYS:
                kvs.put(f"tokenizer.ggml.add_{typ}_token", T.BOOL, flag)
        self._write_template(kvs)
        if self.lowercase is not None:
            kvs.put("tokenizer.ggml.normalizer.lowercase", T.BOOL, self.lowercase)
        if self.strip_accents is not None:
            kvs.put("tokenizer.ggml.normalizer.strip_accents", T.BOOL, self.strip_accents)

    def _write_template(self, kvs: KVs) -> None:
        template = self.chat_template
        if template is None:
            return  # the reference removes the key here; nothing wrote it before
        if isinstance(template, list):
            default, names = None, []
            for choice in template:
                name = "".join(c if c in ascii_letters + digits else "_" for c in choice.get("name", ""))
                body = choice.get("template")
                if not name or body is None:
                    continue
                if name == "default":
                    default = body
                else:
                    # the reference collects the names in a set: its list order is arbitrary; ours is sorted
                    if name not in names:
                        names.append(name)
                    kvs.put(f"tokenizer.chat_template.{name}", T.STRING, body)
            if names:
                kvs.put("tokenizer.chat_templates", T.ARRAY, names, T.STRING)
            if default is None:
                return
            template = default
        kvs.put("tokenizer.chat_template", T.STRING, template)
