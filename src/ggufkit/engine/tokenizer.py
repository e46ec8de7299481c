"""The tokenizer a GGUF carries in its metadata, rebuilt on the `tokenizers` library to give llama.cpp's ids.

Two kinds, chosen by tokenizer.ggml.model (as llama-vocab.cpp does):
- "gpt2": byte-level BPE. tokenizer.ggml.tokens + tokenizer.ggml.merges; the text is split first by the
  pre-tokenizer regexes that llama.cpp associates with tokenizer.ggml.pre (llama-vocab.cpp,
  llm_tokenizer_bpe), applied one after another, each keeping its matches as separate pieces; then
  each piece is byte-level encoded and merged by rank.
- "llama": SentencePiece (llm_tokenizer_spm). Spaces become "▁", a space is prepended when
  add_space_prefix (default true), pieces merge by the score of the merged piece, and characters with no
  piece fall back to <0xXX> byte tokens. The `tokenizers` BPE model reproduces this when its merges are
  every (left, right) pair whose concatenation is a piece, ranked by that piece's score.
Text is tokenized as llama-perplexity does (common_tokenize with add_special=true, parse_special=false):
control tokens written in the text are NOT recognised, user-defined tokens are, and BOS is prepended when
tokenizer.ggml.add_bos_token says so (default: false for gpt2, true for llama).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import EvalError
from ..gguf.reader import GGUFModel

# llama_token_type values (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes applied in order, ignore_merges), after llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (_DEFAULT, False),
    **{n: ((_LLAMA3,), True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")},
    **{n: ((_LLAMA3,), False) for n in ("dbrx", "smaug-bpe")},
    **{n: ((_QWEN2,), False) for n in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
    **{
        n: ((r"\p{N}", _GPT2), False)
        for n in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b")
    },
    **{n: ((_GPT2,), False) for n in ("gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion", "exaone4")},
}

# pre-types for which llama.cpp adds BOS unless tokenizer.ggml.add_bos_token says otherwise.
_ADD_BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"}


@dataclass
class GGUFTokenizer:
    """Text -> token ids as llama.cpp tokenizes it for llama-perplexity."""

    tokenizer: Tokenizer
    add_bos: bool
    bos_id: int | None
    n_vocab: int
    kind: str

    def encode(self, text: str, *, add_bos: bool | None = None) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _vocab(tokens: list[str]) -> dict[str, int]:
    # Duplicate strings: llama.cpp's token_to_id keeps the last id, as a dict comprehension does.
    return {t: i for i, t in enumerate(tokens)}


def _user_defined(tokenizer: Tokenizer, tokens: list[str], types) -> None:
    if types is None:
        return
    ud = [tokens[i] for i in np.flatnonzero(np.asarray(types) == USER_DEFINED)]
    if ud:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ud])


def _gpt2(model: GGUFModel, tokens: list[str]) -> Tokenizer:
    pre = model.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise EvalError(
            f"{model.path}: tokenizer pre-type {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = model.get("tokenizer.ggml.merges")
    if merges is None:
        raise EvalError(f"{model.path}: gpt2 tokenizer without tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """Every (left, right) split of a piece into two pieces, ordered by the piece's score (higher first)."""
    vocab = _vocab(tokens)
    ranked = []
    for piece, pid in vocab.items():
        if types is not None and types[pid] in (CONTROL, BYTE, UNUSED, UNKNOWN):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[pid]), pid, vocab[left], left, right))
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    return [(r[3], r[4]) for r in ranked]


def _spm(model: GGUFModel, tokens: list[str]) -> Tokenizer:
    scores = model.get("tokenizer.ggml.scores")
    if scores is None:
        raise EvalError(f"{model.path}: llama (SentencePiece) tokenizer without tokenizer.ggml.scores")
    types = model.get("tokenizer.ggml.token_type")
    types = None if types is None else np.asarray(types)
    unk = model.get("tokenizer.ggml.unknown_token_id", 0)
    bpe = models.BPE(
        vocab=_vocab(tokens),
        merges=_spm_merges(tokens, scores, types),
        unk_token=tokens[unk],
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", "▁")]
    if model.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend(" "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def load_tokenizer(model: GGUFModel) -> GGUFTokenizer:
    """The tokenizer described by `model`'s tokenizer.ggml.* metadata."""
    kind = model.get("tokenizer.ggml.model")
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise EvalError(f"{model.path}: no tokenizer.ggml.tokens in the metadata")
    tokens = list(tokens)
    if kind == "gpt2":
        tok = _gpt2(model, tokens)
        add_bos_default = (model.get("tokenizer.ggml.pre") or "default") in _ADD_BOS_PRE
    elif kind == "llama":
        tok, add_bos_default = _spm(model, tokens), True
    else:
        raise EvalError(f"{model.path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    _user_defined(tok, tokens, model.get("tokenizer.ggml.token_type"))
    add_bos = bool(model.get("tokenizer.ggml.add_bos_token", add_bos_default))
    bos = model.get("tokenizer.ggml.bos_token_id")
    return GGUFTokenizer(tok, add_bos, None if bos is None else int(bos), len(tokens), kind)
