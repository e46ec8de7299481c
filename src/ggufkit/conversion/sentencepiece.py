"""The SentencePiece ("llama") vocabulary of a converted GGUF, from tokenizer.model.

`read_sentencepiece` is a bounded protobuf reader standing in for the sentencepiece library's
SentencePieceProcessor as the reference uses it: ModelProto field 1 is the repeated SentencePiece
{1 piece, 2 score f32, 3 type}. The table mirrors convert_hf_to_gguf.py's `_create_vocab_sentencepiece`
(conversion/base.py): config vocab_size entries ("[PADi]", -10000.0, UNUSED beyond the model);
added_tokens.json and tokenizer_config.json's added_tokens_decoder overwrite entries with score -1000.0.
`sentencepiece_kvs` is `_set_vocab_sentencepiece`: the tokenizer.ggml.* arrays, then gguf-py's SpecialVocab
without merges. Also here: the llama_token_type values and `looks_special` (the reference's
`does_token_look_special`), which the BPE path shares.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import ConvertError
from ..gguf.types import GGUFValueType as T
from .special_vocab import KVs, SpecialVocab, dict_json

# llama_token_type values (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

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


def looks_special(text: str) -> bool:
    """Added tokens the reference makes CONTROL even when not flagged special (does_token_look_special)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def hparam_vocab_size(hparams: dict, *keys: str) -> int | None:
    for k in keys:
        if k in hparams:
            return hparams[k]
    return None


def _sentencepiece_table(folder: Path, hparams: dict) -> tuple[list[str], np.ndarray, list[int]]:
    pieces = read_sentencepiece(folder / "tokenizer.model")
    n = hparam_vocab_size(hparams, "vocab_size_per_layer_input", "vocab_size") or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = np.full(n, -10000.0, dtype=np.float32)
    types = [UNUSED] * n
    for i, (piece, score, ptype) in enumerate(pieces[:n]):
        tokens[i] = piece
        scores[i] = score
        # sentencepiece's IsUnknown/IsControl/IsUnused/IsByte; USER_DEFINED pieces count as NORMAL
        types[i] = ptype if ptype in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    added = dict_json(folder / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < n:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    config = dict_json(folder / "tokenizer_config.json") or {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        tid, text = int(key), entry["content"]
        if not 0 <= tid < n:
            continue
        if entry.get("special") or looks_special(text):
            types[tid] = CONTROL
        else:
            text = text.replace("▁", " ")
            types[tid] = USER_DEFINED
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types


def sentencepiece_kvs(kvs: KVs, folder: Path, hparams: dict) -> None:
    """`_set_vocab_sentencepiece`: the "llama" tokenizer.ggml.* KVs, then SpecialVocab without merges."""
    tokens, scores, types = _sentencepiece_table(folder, hparams)
    kvs.put("tokenizer.ggml.model", T.STRING, "llama")
    kvs.put("tokenizer.ggml.pre", T.STRING, "default")
    kvs.put("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)
    kvs.put("tokenizer.ggml.scores", T.ARRAY, scores, T.FLOAT32)
    kvs.put("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32)
    SpecialVocab(folder, load_merges=False, n_vocab=len(tokens)).write(kvs)
