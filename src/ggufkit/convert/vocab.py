"""The tokenizer.* KVs of a converted GGUF, as llama.cpp's convert_hf_to_gguf.py writes them.

Two vocabulary kinds, chosen per architecture as the reference does (conversion/llama.py, qwen.py, gemma.py):
- SentencePiece ("llama"): tokenizer.model is read here (a bounded protobuf reader: ModelProto field 1 is
  the repeated SentencePiece {1 piece, 2 score f32, 3 type}). Tokens, scores and types fill a table of
  config vocab_size entries ("[PADi]", -10000.0, UNUSED beyond the model); added_tokens.json and
  tokenizer_config.json's added_tokens_decoder overwrite entries with score -1000.0.
- byte-level BPE ("gpt2"): tokenizer.json loaded with the `tokenizers` library, as transformers'
  AutoTokenizer would build it (tokenizer_config's extra added/special tokens, LlamaTokenizerFast's
  rebuilt post-processor, the ByteLevel add_prefix_space override). tokenizer.ggml.pre is found as llama.cpp
  finds it: sha256 of str(ids) of a fixed check text, looked up in a table; an unknown hash is refused.
Then the "special vocabulary" part (gguf-py's SpecialVocab): merges, special token ids, add_bos/add_eos,
chat template, read from tokenizer.json's post_processor, tokenizer_config.json and config.json.

KV order is the order of each key's first write; a later write of the same key replaces the value in place
(gguf-py's GGUFWriter keeps a dict). Empty strings and empty arrays are never written.
"""

from __future__ import annotations

import json
import struct
from hashlib import sha256
from pathlib import Path
from string import ascii_letters, digits

import numpy as np

from ..errors import ConvertError
from ..gguf.types import GGUFValueType as T

__all__ = ["PRE_TOKENIZER_HASHES", "n_vocab_real", "read_sentencepiece", "vocab_kvs"]

# llama_token_type values (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The text llama.cpp hashes the token ids of (conversion/base.py get_vocab_base_pre, chktxt), byte-exact.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHECK_TEXT)) -> tokenizer.ggml.pre, for the families ggufkit converts (llama, mistral,
# qwen2/3, gemma3 with tokenizer.json). From the reference's get_vocab_base_pre; where it lists a hash twice
# the last entry wins there, and the names here are those winners.
PRE_TOKENIZER_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3 (llama arch)
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # llama arch
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # llama arch
}

# Special token kinds SpecialVocab looks for, and those the writer has an id key for (no cls).
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ID_KEYS = {"bos", "eos", "unk", "sep", "pad", "mask", "eot", "eom"}
_ADD_KEYS = {"bos", "eos", "sep"}
_ID_NAMES = {"unk": "unknown", "sep": "seperator", "pad": "padding"}  # the key names, spelling included

KV = tuple


class _KVs:
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


def _json(path: Path):
    """A JSON file's content, None if absent; malformed JSON is refused by name."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _dict_json(path: Path) -> dict | None:
    data = _json(path)
    if data is not None and not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------ SentencePiece protobuf

_SP_TYPES = {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE}
_MAX_SP_BYTES = 1 << 30


def _varint(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise ConvertError(f"{where}: truncated varint at byte {pos}")
        if shift >= 64:
            raise ConvertError(f"{where}: varint longer than 10 bytes at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _fields(buf: bytes, pos: int, end: int, where: str):
    """(field number, wire type, value, start) of each field in buf[pos:end]; value is an int for wire types
    0/1/5 and the (start, end) of the bytes for wire type 2. Every length is checked against `end`."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end, where)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ConvertError(f"{where}: field number 0 at byte {start}")
        if wire == 0:
            value, pos = _varint(buf, pos, end, where)
        elif wire == 1 or wire == 5:
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise ConvertError(f"{where}: truncated {n}-byte field {field} at byte {start}")
            value = buf[pos : pos + n]
            pos += n
        elif wire == 2:
            n, pos = _varint(buf, pos, end, where)
            if n > end - pos:
                raise ConvertError(f"{where}: field {field} length {n} runs past its end at byte {start}")
            value = (pos, pos + n)
            pos += n
        else:
            raise ConvertError(f"{where}: unsupported wire type {wire} (field {field}) at byte {start}")
        yield field, wire, value, start


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """The pieces of a SentencePiece tokenizer.model: (piece, score, type) per id.

    Only ModelProto.pieces (field 1) is read; other fields are skipped by their declared lengths. The score
    is the stored float32 (as a Python float, exact); a missing type is NORMAL, as in sentencepiece.
    """
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        if size > _MAX_SP_BYTES:
            raise ConvertError(f"{where}: {size} bytes, more than a SentencePiece model ({_MAX_SP_BYTES})")
        buf = path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{where}: cannot read ({e.strerror or e})") from None
    pieces: list[tuple[str, float, int]] = []
    seen: dict[str, int] = {}
    for field, wire, value, start in _fields(buf, 0, len(buf), where):
        if field != 1:
            continue
        if wire != 2:
            raise ConvertError(f"{where}: pieces field with wire type {wire} at byte {start}")
        piece, score, ptype = None, 0.0, NORMAL
        for f, w, v, s in _fields(buf, value[0], value[1], where):
            if f == 1 and w == 2:
                try:
                    piece = buf[v[0] : v[1]].decode("utf-8")
                except UnicodeDecodeError:
                    raise ConvertError(f"{where}: piece {len(pieces)} is not UTF-8 (byte {s})") from None
            elif f == 2 and w == 5:
                score = struct.unpack("<f", v)[0]
            elif f == 3 and w == 0:
                ptype = v
            elif f in (1, 2, 3):
                raise ConvertError(f"{where}: piece {len(pieces)} field {f} has wire type {w} at byte {s}")
        if piece is None:
            raise ConvertError(f"{where}: piece {len(pieces)} has no text (byte {start})")
        if ptype not in _SP_TYPES:
            raise ConvertError(f"{where}: piece {len(pieces)} {piece!r} has unknown type {ptype}")
        if piece in seen:
            raise ConvertError(f"{where}: piece {piece!r} twice (ids {seen[piece]} and {len(pieces)})")
        seen[piece] = len(pieces)
        pieces.append((piece, score, ptype))
    if not pieces:
        raise ConvertError(f"{where}: no pieces: not a SentencePiece model")
    return pieces


def _looks_special(text: str) -> bool:
    """Added tokens the reference makes CONTROL even when not flagged special (does_token_look_special)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _vocab_size(hparams: dict, *keys: str) -> int | None:
    for k in keys:
        if k in hparams:
            return hparams[k]
    return None


def _sentencepiece_table(folder: Path, hparams: dict) -> tuple[list[str], np.ndarray, list[int]]:
    pieces = read_sentencepiece(folder / "tokenizer.model")
    n = _vocab_size(hparams, "vocab_size_per_layer_input", "vocab_size") or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = np.full(n, -10000.0, dtype=np.float32)
    types = [UNUSED] * n
    for i, (piece, score, ptype) in enumerate(pieces[:n]):
        tokens[i] = piece
        scores[i] = score
        # sentencepiece's IsUnknown/IsControl/IsUnused/IsByte; USER_DEFINED pieces count as NORMAL
        types[i] = ptype if ptype in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    added = _dict_json(folder / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < n:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    config = _dict_json(folder / "tokenizer_config.json") or {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        tid, text = int(key), entry["content"]
        if not 0 <= tid < n:
            continue
        if entry.get("special") or _looks_special(text):
            types[tid] = CONTROL
        else:
            text = text.replace("▁", " ")
            types[tid] = USER_DEFINED
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types


# ------------------------------------------------------------------------------------ byte-level BPE


def _added_token(entry, *, special: bool | None = None):
    from tokenizers import AddedToken

    if isinstance(entry, str):
        return AddedToken(entry, special=bool(special))
    flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
    if special is not None:
        flags["special"] = special
    return AddedToken(entry["content"], **flags)


def _special_entries(config: dict, padding_token) -> list:
    """transformers' all_special_tokens_extended, from tokenizer_config.json (str or {content: ...})."""
    out = []
    for typ in _SPECIAL_TYPES:
        value = config.get(f"{typ}_token")
        if typ == "pad" and value is None:
            value = padding_token
        if value is not None:
            out.append(value)
    out += config.get("additional_special_tokens") or []
    seen, uniq = set(), []
    for v in out:
        text = v if isinstance(v, str) else v.get("content")
        if isinstance(text, str) and text not in seen:
            seen.add(text)
            uniq.append(v)
    return uniq


def _content(v) -> str:
    return v if isinstance(v, str) else v["content"]


def _load_hf_tokenizer(folder: Path, config: dict):
    """tokenizer.json as transformers 4.57's AutoTokenizer builds it: the `tokenizers` object plus the
    tokens and special flags tokenizer_config.json adds, and the class-specific post-processor."""
    from tokenizers import Tokenizer, processors

    path = folder / "tokenizer.json"
    data = _dict_json(path)
    pre = data.get("pre_tokenizer")
    # PreTrainedTokenizerFast rebuilds a pre-tokenizer whose add_prefix_space differs from the config's
    if isinstance(pre, dict) and "add_prefix_space" in pre:
        want = config.get("add_prefix_space", False)
        if pre["add_prefix_space"] != want:
            pre["add_prefix_space"] = want
    try:
        tok = Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the tokenizers library reports a bad file with its own exception types
        raise ConvertError(f"{path}: the tokenizers library cannot load it ({e})") from None
    have = {repr(t) for t in tok.get_added_tokens_decoder().values()}
    to_add = []
    for key in sorted((config.get("added_tokens_decoder") or {}), key=int):
        t = _added_token(config["added_tokens_decoder"][key])
        if repr(t) not in have:
            to_add.append(t)
    names = {t.content for t in tok.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    padding = (data.get("padding") or {}).get("pad_token")
    specials = _special_entries(config, padding)
    special_names = {_content(v) for v in specials}
    for v in specials:
        if not isinstance(v, str) or v not in names:
            to_add.append(_added_token(v, special=True))
    if to_add:
        for t in to_add:
            t.special = t.special or t.content in special_names
        tok.add_tokens(to_add)
    cls = config.get("tokenizer_class")
    if cls in ("LlamaTokenizerFast", "LlamaTokenizer"):
        # LlamaTokenizerFast.update_post_processor: "<bos> $A <eos>" from add_bos_token / add_eos_token
        add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
        bos = config.get("bos_token")
        eos = config.get("eos_token")
        bos = None if bos is None else _content(bos)
        eos = None if eos is None else _content(eos)
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise ConvertError(f"{folder}: add_bos_token/add_eos_token set without a bos/eos token")
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = [(bos, tok.token_to_id(bos))] if add_bos else []
        special += [(eos, tok.token_to_id(eos))] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok, data


_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEANUPS += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def pre_tokenizer_name(tok, path: Path) -> str:
    """tokenizer.ggml.pre for a `tokenizers` Tokenizer: the table name of sha256(str(ids of CHECK_TEXT))."""
    ids = tok.encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    name = PRE_TOKENIZER_HASHES.get(digest)
    if name is None:
        raise ConvertError(
            f"{path}: BPE pre-tokenizer not recognised (check-text hash {digest}); ggufkit knows "
            f"{', '.join(sorted(set(PRE_TOKENIZER_HASHES.values())))}. If llama.cpp's convert_hf_to_gguf.py "
            "knows this hash, add it to ggufkit.convert.vocab.PRE_TOKENIZER_HASHES; otherwise the tokenizer "
            "files differ from the published model's: use the original tokenizer.json"
        )
    return name


def _bpe_table(folder: Path, hparams: dict, config: dict) -> tuple[list[str], list[int], str]:
    tok, _ = _load_hf_tokenizer(folder, config)
    vocab = tok.get_vocab(with_added_tokens=True)
    n = _vocab_size(hparams, "vocab_size")
    if n is None:
        n = len(vocab)
    if vocab and max(vocab.values()) >= n:
        raise ConvertError(
            f"{folder}: tokenizer has token id {max(vocab.values())}, config.json vocab_size is {n}"
        )
    name = pre_tokenizer_name(tok, folder / "tokenizer.json")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    added_names = {t.content for t in added.values()}
    cleanup = bool(config.get("clean_up_tokenization_spaces", False))
    tokens, types = [], []
    for i in range(n):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if text not in added_names:
            tokens.append(text)
            types.append(NORMAL)
            continue
        info = added.get(i)
        if info is not None and not info.normalized:
            # the reference round-trips a non-normalized added token through the tokenizer
            text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if cleanup:
                for a, b in _CLEANUPS:
                    text = text.replace(a, b)
        if (info is not None and info.special) or _looks_special(text):
            types.append(CONTROL)
        else:
            text = text.replace("▁", " ")
            types.append(USER_DEFINED)
        tokens.append(text)
    return tokens, types, name


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


class _Special:
    """gguf-py SpecialVocab's findings: merges, ids and add_* flags (insertion-ordered), chat template."""

    def __init__(self, folder: Path, *, load_merges: bool, n_vocab: int | None, types=_SPECIAL_TYPES):
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
        tj = _dict_json(tj_path)
        added = []
        if tj is not None:
            if load_merges:
                self.merges = _merges(tj_path, tj)
            added = tj.get("added_tokens") or []
            if tj.get("normalizer"):
                self._normalizer(tj["normalizer"])
        tc = _dict_json(folder / "tokenizer_config.json")
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
            ct = _dict_json(folder / "chat_template.json")
            alt = ct.get("chat_template")
        template = tc.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            self.chat_template = template

    def _from_config(self, folder: Path) -> None:
        config = _dict_json(folder / "config.json")
        if config is None:
            return
        text = config.get("text_config")
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(text, dict):
                tid = text.get(f"{typ}_token_id")
            self.set_id(typ, tid)

    def write(self, kvs: _KVs) -> None:
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

    def _write_template(self, kvs: _KVs) -> None:
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


# --------------------------------------------------------------------------------------------- paths


def _sentencepiece(kvs: _KVs, folder: Path, hparams: dict) -> None:
    tokens, scores, types = _sentencepiece_table(folder, hparams)
    kvs.put("tokenizer.ggml.model", T.STRING, "llama")
    kvs.put("tokenizer.ggml.pre", T.STRING, "default")
    kvs.put("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)
    kvs.put("tokenizer.ggml.scores", T.ARRAY, scores, T.FLOAT32)
    kvs.put("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32)
    _Special(folder, load_merges=False, n_vocab=len(tokens)).write(kvs)


def _gpt2(kvs: _KVs, folder: Path, hparams: dict, config: dict) -> None:
    if not (folder / "tokenizer.json").is_file():
        raise ConvertError(f"{folder}: no tokenizer.json or tokenizer.model: cannot build the vocabulary")
    tokens, types, pre = _bpe_table(folder, hparams, config)
    kvs.put("tokenizer.ggml.model", T.STRING, "gpt2")
    kvs.put("tokenizer.ggml.pre", T.STRING, pre)
    kvs.put("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)
    kvs.put("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32)
    _Special(folder, load_merges=True, n_vocab=None).write(kvs)


def _refuse_llama_hf(folder: Path) -> None:
    """A byte-fallback BPE tokenizer.json with a Sequence decoder and no tokenizer.model: the reference
    builds a SentencePiece-style "llama" vocabulary from it through transformers (LlamaHfVocab)."""
    tj = _dict_json(folder / "tokenizer.json") or {}
    model = tj.get("model") or {}
    decoder = tj.get("decoder")
    if model.get("type") != "BPE":
        return
    if model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        return  # Llama 3 style: the GPT-2 path
    if model.get("byte_fallback", False) and isinstance(decoder, dict) and decoder.get("type") == "Sequence":
        raise ConvertError(
            f"{folder}: byte-fallback BPE tokenizer.json without tokenizer.model is not supported; "
            "add the model's tokenizer.model (SentencePiece) to the folder"
        )


def vocab_kvs(folder, cfg) -> list[KV]:
    """Every tokenizer.* KV of the converted GGUF, in the reference converter's order."""
    folder = Path(folder)
    hparams, arch = cfg.hparams, cfg.arch
    kvs = _KVs()
    tc = _dict_json(folder / "tokenizer_config.json") or {}
    has_sp = (folder / "tokenizer.model").is_file()
    if arch == "llama":
        if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise ConvertError(f"{folder}: tekken.json without tokenizer.json is not supported")
        if tc.get("add_prefix_space") is not None:
            kvs.put("tokenizer.ggml.add_space_prefix", T.BOOL, bool(tc["add_prefix_space"]))
        if tc.get("tokenizer_class") == "HybridDNATokenizer":
            raise ConvertError(f"{folder}: HybridDNATokenizer is not supported")
        if has_sp:
            _sentencepiece(kvs, folder, hparams)
        else:
            _refuse_llama_hf(folder)
            if not (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer.json").is_file():
                # transformers would then pick LlamaTokenizerFast and its "<s>"/"</s>"/"<unk>" defaults
                raise ConvertError(
                    f"{folder}: a BPE tokenizer.json without tokenizer_config.json; add the model's "
                    "tokenizer_config.json (it names the tokenizer class and the special tokens)"
                )
            _gpt2(kvs, folder, hparams, tc)
        if hparams.get("vocab_size", 32000) == 32016:
            # CodeLlama: a second SpecialVocab pass for the infill tokens (only eot has a key)
            fim = ("prefix", "suffix", "middle", "eot")
            extra = _Special(folder, load_merges=False, n_vocab=None, types=fim)
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                extra.set_id(typ, tid)
            extra.write(kvs)
        if hparams.get("vocab_size", 32000) == 49152:
            # meant for granite; hits SmolLM/SmolLM2 too (49152 tokens), as in the reference
            kvs.put("tokenizer.ggml.add_bos_token", T.BOOL, False)
    elif arch in ("qwen2", "qwen3"):
        if has_sp:
            _sentencepiece(kvs, folder, hparams)
        else:
            _gpt2(kvs, folder, hparams, tc)
    elif arch == "gemma3":
        if has_sp:
            _sentencepiece(kvs, folder, hparams)
            kvs.put("tokenizer.ggml.add_space_prefix", T.BOOL, False)
        else:
            _gpt2(kvs, folder, hparams, tc)
    else:
        raise ConvertError(f"no vocabulary rules for architecture {arch!r} (llama, qwen2, qwen3, gemma3)")
    return kvs.list()


def n_vocab_real(folder, cfg) -> int:
    """Rows of gemma3's token embedding the reference keeps: the SentencePiece table's length (config
    vocab_size), else tokenizer.json's vocab plus its added tokens (counted even when they overlap)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        pieces = read_sentencepiece(folder / "tokenizer.model")
        return _vocab_size(cfg.hparams, "vocab_size_per_layer_input", "vocab_size") or len(pieces)
    path = folder / "tokenizer.json"
    tj = _dict_json(path)
    if tj is None:
        raise ConvertError(f"{folder}: no tokenizer.json or tokenizer.model")
    try:
        return len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    except (KeyError, TypeError):
        raise ConvertError(f"{path}: no model.vocab or added_tokens") from None
