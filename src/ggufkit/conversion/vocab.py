"""The tokenizer.* KVs of a converted GGUF, as llama.cpp's convert_hf_to_gguf.py writes them.

`vocab_kvs` is the architectures' `set_vocab` (conversion/llama.py, qwen.py, gemma.py), choosing one of two
vocabulary kinds:
- SentencePiece ("llama") when tokenizer.model exists: sentencepiece.py (`_set_vocab_sentencepiece`).
- byte-level BPE ("gpt2"), here (`_set_vocab_gpt2`, `get_vocab_base`, `get_vocab_base_pre` in
  conversion/base.py): tokenizer.json loaded with the `tokenizers` library, as transformers 4.57's
  AutoTokenizer would build it (tokenizer_config's extra added/special tokens, LlamaTokenizerFast's
  rebuilt post-processor, the ByteLevel add_prefix_space override). tokenizer.ggml.pre is found as llama.cpp
  finds it: sha256 of str(ids) of a fixed check text, looked up in a table; an unknown hash is refused.
Either path ends with the "special vocabulary" part (gguf-py's SpecialVocab): special_vocab.py.
`n_vocab_real` is the token-embedding row count Gemma 3's conversion keeps.

KV order is the order of each key's first write; a later write of the same key replaces the value in place
(gguf-py's GGUFWriter keeps a dict). Empty strings and empty arrays are never written.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from ..errors import ConvertError
from ..gguf.types import GGUFValueType as T
from .sentencepiece import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    hparam_vocab_size,
    looks_special,
    read_sentencepiece,
    sentencepiece_kvs,
)
from .special_vocab import KV, SPECIAL_TYPES, KVs, SpecialVocab, dict_json

__all__ = [
    "BYTE",
    "CHECK_TEXT",
    "CONTROL",
    "KV",
    "NORMAL",
    "PRE_TOKENIZER_HASHES",
    "UNKNOWN",
    "UNUSED",
    "USER_DEFINED",
    "n_vocab_real",
    "pre_tokenizer_name",
    "read_sentencepiece",
    "vocab_kvs",
]

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
    for typ in SPECIAL_TYPES:
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
    data = dict_json(path)
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
            f"{', '.join(sorted(set(PRE_TOKENIZER_HASHES.values())))}. If llama.cpp's "
            "convert_hf_to_gguf.py knows this hash, add it to ggufkit.conversion.vocab.PRE_TOKENIZER_HASHES; "
            "otherwise the tokenizer "
            "files differ from the published model's: use the original tokenizer.json"
        )
    return name


def _bpe_table(folder: Path, hparams: dict, config: dict) -> tuple[list[str], list[int], str]:
    tok, _ = _load_hf_tokenizer(folder, config)
    vocab = tok.get_vocab(with_added_tokens=True)
    n = hparam_vocab_size(hparams, "vocab_size")
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
        if (info is not None and info.special) or looks_special(text):
            types.append(CONTROL)
        else:
            text = text.replace("▁", " ")
            types.append(USER_DEFINED)
        tokens.append(text)
    return tokens, types, name


# --------------------------------------------------------------------------------------------- paths


def _gpt2(kvs: KVs, folder: Path, hparams: dict, config: dict) -> None:
    if not (folder / "tokenizer.json").is_file():
        raise ConvertError(f"{folder}: no tokenizer.json or tokenizer.model: cannot build the vocabulary")
    tokens, types, pre = _bpe_table(folder, hparams, config)
    kvs.put("tokenizer.ggml.model", T.STRING, "gpt2")
    kvs.put("tokenizer.ggml.pre", T.STRING, pre)
    kvs.put("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)
    kvs.put("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32)
    SpecialVocab(folder, load_merges=True, n_vocab=None).write(kvs)


def _refuse_llama_hf(folder: Path) -> None:
    """A byte-fallback BPE tokenizer.json with a Sequence decoder and no tokenizer.model: the reference
    builds a SentencePiece-style "llama" vocabulary from it through transformers (LlamaHfVocab)."""
    tj = dict_json(folder / "tokenizer.json") or {}
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
    kvs = KVs()
    tc = dict_json(folder / "tokenizer_config.json") or {}
    has_sp = (folder / "tokenizer.model").is_file()
    if arch == "llama":
        if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise ConvertError(f"{folder}: tekken.json without tokenizer.json is not supported")
        if tc.get("add_prefix_space") is not None:
            kvs.put("tokenizer.ggml.add_space_prefix", T.BOOL, bool(tc["add_prefix_space"]))
        if tc.get("tokenizer_class") == "HybridDNATokenizer":
            raise ConvertError(f"{folder}: HybridDNATokenizer is not supported")
        if has_sp:
            sentencepiece_kvs(kvs, folder, hparams)
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
            extra = SpecialVocab(folder, load_merges=False, n_vocab=None, types=fim)
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                extra.set_id(typ, tid)
            extra.write(kvs)
        if hparams.get("vocab_size", 32000) == 49152:
            # meant for granite; hits SmolLM/SmolLM2 too (49152 tokens), as in the reference
            kvs.put("tokenizer.ggml.add_bos_token", T.BOOL, False)
    elif arch in ("qwen2", "qwen3"):
        if has_sp:
            sentencepiece_kvs(kvs, folder, hparams)
        else:
            _gpt2(kvs, folder, hparams, tc)
    elif arch == "gemma3":
        if has_sp:
            sentencepiece_kvs(kvs, folder, hparams)
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
    if (folder / "tokenizer.model").is_file():  # read (1 s for Gemma 3's) only when config.json has no size
        n = hparam_vocab_size(cfg.hparams, "vocab_size_per_layer_input", "vocab_size")
        return n or len(read_sentencepiece(folder / "tokenizer.model"))
    path = folder / "tokenizer.json"
    tj = dict_json(path)
    if tj is None:
        raise ConvertError(f"{folder}: no tokenizer.json or tokenizer.model")
    try:
        return len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    except (KeyError, TypeError):
        raise ConvertError(f"{path}: no model.vocab or added_tokens") from None
