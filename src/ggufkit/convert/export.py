"""A GGUF back to a Hugging Face folder: the inverse of convert_hf_to_gguf.py, for the architectures it reads.

    export(gguf_path, hf_dir, dtype="f32") -> ExportSummary

What is written, and what it undoes (convert_hf_to_gguf.py's steps, read backwards):
- model.safetensors: every tensor dequantized to float32 (ggufkit.quants), renamed to the HF name and put
  back in HF layout: numpy shape = ggml shape reversed; llama's q/k rows de-interleaved (the converter's
  `permute` pairs row i of each head half with row d/2+i; `_unpermute` puts them back); gemma3's RMS-norm
  weights minus 1 (the converter adds 1); rope_freqs.weight dropped (the converter generates it from
  rope_scaling). Then cast to the asked dtype (f32 / f16 / bf16, round to nearest even).
- config.json from the <arch>.* keys, generation_config.json from the token ids and general.sampling.*.
- the tokenizer: tokenizer.json for byte-level BPE ("gpt2") vocabularies, rebuilt on the `tokenizers`
  library from the same pieces ggufkit's engine tokenizer uses (so it gives llama.cpp's ids), or
  tokenizer.model for SentencePiece ("llama") vocabularies, a ModelProto written here (pieces with piece,
  score, type); and tokenizer_config.json with the chat template, special tokens and add_bos/add_eos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GgufkitError
from ..gguf.reader import GGUFModel

__all__ = ["ExportError", "ExportSummary", "export", "tokenizer_files"]

# llama_token_type values (tokenizer.ggml.token_type), as in engine/tokenizer.py
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class ExportError(GgufkitError):
    """A GGUF cannot be exported to a Hugging Face folder (architecture, tokenizer, output path)."""


@dataclass
class ExportSummary:
    path: Path
    architecture: str
    dtype: str
    n_tensors: int
    files: list[str]


# ---------------------------------------------------------------------------------------------- tokenizer


def _special_names(model: GGUFModel, tokens: list[str]) -> dict[str, str]:
    """bos/eos/unk/pad/... token strings from tokenizer.ggml.<typ>_token_id."""
    out = {}
    for typ, key in (
        ("bos", "bos"),
        ("eos", "eos"),
        ("unk", "unknown"),
        ("pad", "padding"),
        ("sep", "seperator"),
    ):
        tid = model.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and 0 <= int(tid) < len(tokens):
            out[typ] = tokens[int(tid)]
    return out


def _added_tokens(tokens: list[str], types) -> list[tuple[int, str, bool]]:
    """(id, content, special) for the tokens HF keeps as added tokens: control and user-defined ones."""
    if types is None:
        return []
    types = np.asarray(types)
    picked = np.flatnonzero((types == CONTROL) | (types == USER_DEFINED))
    return [(int(i), tokens[i], bool(types[i] == CONTROL)) for i in picked]


def _bpe_tokenizer_json(model: GGUFModel, tokens: list[str], add_bos: bool, names: dict[str, str]) -> str:
    from tokenizers import AddedToken, processors

    from ..engine.tokenizer import load_tokenizer

    tok = load_tokenizer(
        model
    ).tokenizer  # vocab, merges and llama.cpp's pre-tokenizer for tokenizer.ggml.pre
    added = _added_tokens(tokens, model.get("tokenizer.ggml.token_type"))
    specials = [AddedToken(t, special=True, normalized=False) for _, t, s in added if s]
    if specials:
        tok.add_special_tokens(specials)
    if add_bos and "bos" in names:
        # as Llama 3's tokenizer.json: BOS from the post-processor (what convert's SpecialVocab reads back)
        bos = names["bos"]
        bos_id = tokens.index(bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str(pretty=True)


def tokenizer_files(model: GGUFModel) -> dict[str, bytes]:
    """The tokenizer files of an HF folder for `model`'s tokenizer.* metadata: tokenizer.json (byte-level
    BPE) or tokenizer.model (SentencePiece), and tokenizer_config.json."""
    kind = model.get("tokenizer.ggml.model")
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(f"{model.path}: no tokenizer.ggml.tokens in the metadata")
    tokens = list(tokens)
    types = model.get("tokenizer.ggml.token_type")
    names = _special_names(model, tokens)
    files: dict[str, bytes] = {}
    if kind == "gpt2":
        add_bos = bool(model.get("tokenizer.ggml.add_bos_token", False))
        files["tokenizer.json"] = _bpe_tokenizer_json(model, tokens, add_bos, names).encode()
        tokenizer_class = "PreTrainedTokenizerFast"
    elif kind == "llama":
        add_bos = bool(model.get("tokenizer.ggml.add_bos_token", True))
        files["tokenizer.model"] = sentencepiece_model(model, tokens, types)
        tokenizer_class = "GemmaTokenizer" if model.architecture == "gemma3" else "LlamaTokenizer"
    else:
        raise ExportError(
            f"{model.path}: tokenizer model {kind!r} cannot be exported (supported: gpt2, llama)"
        )

    config: dict = {}
    if model.get("tokenizer.ggml.add_space_prefix") is not None and kind == "gpt2":
        config["add_prefix_space"] = bool(model.get("tokenizer.ggml.add_space_prefix"))
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = bool(model.get("tokenizer.ggml.add_eos_token", False))
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
    for typ, text in names.items():
        config[f"{typ}_token"] = text
    template = model.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    config["clean_up_tokenization_spaces"] = False
    ctx = model.get(f"{model.architecture}.context_length")
    if ctx:
        config["model_max_length"] = int(ctx)
    config["tokenizer_class"] = tokenizer_class
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def sentencepiece_model(model: GGUFModel, tokens: list[str], types) -> bytes:
    raise ExportError(f"{model.path}: SentencePiece export is not implemented yet")


def export(*args, **kwargs):  # filled in below the tokenizer work
    raise ExportError("export is not implemented yet")
