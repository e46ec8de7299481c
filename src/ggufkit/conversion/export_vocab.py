"""A GGUF's tokenizer.* metadata back to Hugging Face tokenizer files (for export.py).

- byte-level BPE (tokenizer.ggml.model "gpt2") -> tokenizer.json: the `tokenizers` pipeline ggufkit's engine
  builds from the GGUF (vocab, merges, llama.cpp's pre-tokenizer regexes for tokenizer.ggml.pre), so it
  gives llama.cpp's ids; convert_hf_to_gguf.py recognises the result by its hash of token ids.
- SentencePiece (tokenizer.ggml.model "llama") -> tokenizer.model, a ModelProto written here, plus the
  matching tokenizer.json (the engine's score-ranked BPE, which is what fast tokenizers load; converting
  tokenizer.model to a fast tokenizer needs protobuf, which ggufkit does not require).
- tokenizer_config.json: added tokens (control -> special, user-defined -> not special), bos/eos/unk/pad,
  add_bos_token / add_eos_token, add_prefix_space, the chat template.

The ModelProto (sentencepiece_model.proto), only the fields a loader needs:
    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece (string), 2 score (float), 3 type (enum: llama.cpp's token types are the same
                    numbers: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6); a
                    user-defined piece gets its "▁" back (the converter turned it into " " in the GGUF)
    TrainerSpec     3 model_type (BPE = 2: merges by score, as llama.cpp's SPM tokenizer), 4 vocab_size,
                    35 byte_fallback, 40..43 unk/bos/eos/pad id, 45..48 their pieces
    NormalizerSpec  1 name ("identity": no NFKC map), 3 add_dummy_prefix (tokenizer.ggml.add_space_prefix),
                    4 remove_extra_whitespaces (false), 5 escape_whitespaces (true: " " -> "▁")
"""

from __future__ import annotations

import json
import struct

import numpy as np

from ..errors import GgufkitError
from ..gguf.reader import GGUFModel

__all__ = ["sentencepiece_model", "tokenizer_files"]

# llama_token_type values (tokenizer.ggml.token_type), as in engine/tokenizer.py
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPECIAL_KEYS = (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("sep", "seperator"))


def _error(msg: str) -> GgufkitError:
    from .export import ExportError

    return ExportError(msg)


def _special_names(model: GGUFModel, tokens: list[str]) -> dict[str, tuple[int, str]]:
    """bos/eos/unk/pad/sep -> (id, text) from tokenizer.ggml.<typ>_token_id."""
    out = {}
    for typ, key in _SPECIAL_KEYS:
        tid = model.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and 0 <= int(tid) < len(tokens):
            out[typ] = (int(tid), tokens[int(tid)])
    return out


def _added_tokens(tokens: list[str], types) -> list[tuple[int, str, bool]]:
    """(id, content, special) for the tokens HF keeps as added tokens: control and user-defined ones."""
    if types is None:
        return []
    types = np.asarray(types)
    picked = np.flatnonzero((types == CONTROL) | (types == USER_DEFINED))
    return [(int(i), tokens[i], bool(types[i] == CONTROL)) for i in picked]


def _tokenizer_json(model, tokens, types, names, *, add_bos: bool, add_eos: bool, byte_level: bool) -> str:
    from tokenizers import AddedToken, processors

    from ..engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model).tokenizer  # vocab, merges / scores, pre-tokenizer or normalizer, decoder
    specials = [
        AddedToken(t, special=True, normalized=False) for _, t, s in _added_tokens(tokens, types) if s
    ]
    if specials:
        tok.add_special_tokens(specials)
    single, pair, used = "$A:0", "$A:0 $B:1", {}
    if add_bos and "bos" in names:
        bos_id, bos = names["bos"]
        single, pair, used[bos] = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1", bos_id
    if add_eos and "eos" in names:
        eos_id, eos = names["eos"]
        single, pair, used[eos] = f"{single} {eos}:0", f"{pair} {eos}:1", eos_id
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if used:  # as Llama 3's tokenizer.json: BOS/EOS from the post-processor (what convert reads back)
        steps.append(
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(used.items()))
        )
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    return tok.to_str(pretty=True)


def tokenizer_files(model: GGUFModel) -> dict[str, bytes]:
    """The tokenizer files of an HF folder for `model`'s tokenizer.* metadata (file name -> bytes)."""
    kind = model.get("tokenizer.ggml.model")
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise _error(f"{model.path}: no tokenizer.ggml.tokens in the metadata")
    tokens = list(tokens)
    types = model.get("tokenizer.ggml.token_type")
    names = _special_names(model, tokens)
    files: dict[str, bytes] = {}
    add_eos = bool(model.get("tokenizer.ggml.add_eos_token", False))
    if kind == "gpt2":
        add_bos = bool(model.get("tokenizer.ggml.add_bos_token", False))
        tokenizer_class = "PreTrainedTokenizerFast"
    elif kind == "llama":
        add_bos = bool(model.get("tokenizer.ggml.add_bos_token", True))
        files["tokenizer.model"] = sentencepiece_model(model)
        tokenizer_class = "GemmaTokenizer" if model.architecture == "gemma3" else "LlamaTokenizer"
    else:
        raise _error(f"{model.path}: tokenizer model {kind!r} cannot be exported (supported: gpt2, llama)")
    tj = _tokenizer_json(
        model, tokens, types, names, add_bos=add_bos, add_eos=add_eos, byte_level=kind == "gpt2"
    )
    files["tokenizer.json"] = tj.encode()

    config: dict = {}
    if model.get("tokenizer.ggml.add_space_prefix") is not None and kind == "gpt2":
        config["add_prefix_space"] = bool(model.get("tokenizer.ggml.add_space_prefix"))
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    config["added_tokens_decoder"] = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for i, t, s in _added_tokens(tokens, types)
    }
    for typ, (_, text) in names.items():
        config[f"{typ}_token"] = text
    template = model.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    config["clean_up_tokenization_spaces"] = False
    ctx = model.get(f"{model.architecture}.context_length")
    if ctx:
        config["model_max_length"] = int(ctx)
    if kind == "llama":
        config["spaces_between_special_tokens"] = False
        config["legacy"] = False
    config["tokenizer_class"] = tokenizer_class
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return files


# ------------------------------------------------------------------------------- SentencePiece ModelProto


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 fields are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(no: int, value: int) -> bytes:
    return _varint(no << 3) + _varint(int(value))


def _field_bytes(no: int, data: bytes) -> bytes:
    return _varint(no << 3 | 2) + _varint(len(data)) + data


def _field_float(no: int, value: float) -> bytes:
    return _varint(no << 3 | 5) + struct.pack("<f", value)


def sentencepiece_model(model: GGUFModel) -> bytes:
    """tokenizer.model (a serialized sentencepiece ModelProto) for a "llama" (SentencePiece) vocabulary."""
    tokens = list(model.get("tokenizer.ggml.tokens"))
    scores = model.get("tokenizer.ggml.scores")
    if scores is None:
        raise _error(f"{model.path}: SentencePiece vocabulary without tokenizer.ggml.scores")
    scores = np.asarray(scores, dtype=np.float32)
    types = model.get("tokenizer.ggml.token_type")
    types = np.full(len(tokens), NORMAL) if types is None else np.asarray(types)
    out = bytearray()
    for piece, score, typ in zip(tokens, scores.tolist(), types.tolist()):
        if typ == USER_DEFINED:  # the converter wrote "▁" as " " for these; sentencepiece matches "▁"
            piece = piece.replace(" ", "\u2581")
        body = _field_bytes(1, piece.encode("utf-8", "surrogatepass")) + _field_float(2, score)
        if typ != NORMAL:  # NORMAL is the proto's default
            body += _field_varint(3, typ)
        out += _field_bytes(1, body)

    trainer = _field_varint(3, 2) + _field_varint(4, len(tokens))
    trainer += _field_varint(35, bool((types == BYTE).any()))
    for no, key, default in ((40, "unknown", 0), (41, "bos", 1), (42, "eos", 2), (43, "padding", -1)):
        tid = model.get(f"tokenizer.ggml.{key}_token_id")
        tid = default if tid is None else int(tid)
        trainer += _field_varint(no, tid)
        if 0 <= tid < len(tokens):
            trainer += _field_bytes(no + 5, tokens[tid].encode())
    out += _field_bytes(2, trainer)

    add_prefix = bool(model.get("tokenizer.ggml.add_space_prefix", True))
    normalizer = _field_bytes(1, b"identity") + _field_varint(3, add_prefix)
    normalizer += _field_varint(4, False) + _field_varint(5, True)
    out += _field_bytes(3, normalizer)
    return bytes(out)
