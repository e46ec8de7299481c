"""The GGUF tokenizer rebuilt on `tokenizers` gives llama.cpp's token ids (llama-cpp-python's tokenizer).

- gpt2-style BPE: SmolLM2's own vocabulary (pre-tokenizer "smollm") on the whole default text and on
  strings that stress the pre-tokenizer regexes (digits, contractions, whitespace runs, non-ASCII,
  special-token text that must NOT be parsed as special).
- llama SentencePiece: a small vocabulary trained here with `tokenizers` (scores = -merge rank, byte
  fallback pieces <0x00>..<0xFF>), written as a vocab-only GGUF with gguf-py and loaded by llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggufkit.engine.tokenizer import load_tokenizer
from ggufkit.evaluation import default_text
from ggufkit.gguf.reader import open_gguf
from tests.helpers.gguf_build import write_gguf

TRICKY = [
    "Hello world",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\n  indented",
    "numbers 1 12 123 1234 12345 3.14159 1e-10 0x1F",
    "contractions: I'm, you're, it's, we'll, they'd, I've, DON'T, He'S",
    "unicode: héllo wörld naïve café 日本語 😀 Ωμέγα русский",
    "special text <|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: pass",
    "punctuation!!! ??? ... --- *** ((( ))) [[]] {{}} @#$%^&*",
    "mixed123abc ABC123 a1b2c3",
]


def _llama(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _ref(llm, text: str) -> list[int]:
    # llama-perplexity: common_tokenize(ctx, text, add_special=true, parse_special=false)
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def test_gpt2_bpe_default_text(smollm2_path):
    ours = load_tokenizer(open_gguf(smollm2_path))
    assert ours.kind == "gpt2"
    text = default_text()
    ids = ours.encode(text)
    assert ids.dtype == np.int32
    ref = np.asarray(_ref(_llama(smollm2_path), text), dtype=np.int32)
    assert len(ids) > 100_000
    np.testing.assert_array_equal(ids, ref)


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_bpe_tricky(smollm2_path, text):
    ours = load_tokenizer(open_gguf(smollm2_path))
    assert list(ours.encode(text)) == _ref(_llama(smollm2_path), text)


# -- SentencePiece ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    """A vocab-only llama GGUF with a SentencePiece-style vocabulary of ~1500 pieces."""
    from tokenizers import SentencePieceBPETokenizer

    corpus = default_text()[:400_000]
    trainer_tok = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer_tok.train_from_iterator(
        [corpus], vocab_size=1500, min_frequency=2, show_progress=False, special_tokens=[]
    )
    vocab = trainer_tok.get_vocab()
    pieces = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    # Alphabet first in the trainer's ids, merges after: score = -(merge rank); single characters lowest.
    singles = [p for p in pieces if len(p) == 1]
    merged = [p for p in pieces if len(p) > 1]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    types = [2, 3, 3] + [6] * 256
    for rank, p in enumerate(merged):
        tokens.append(p)
        scores.append(-float(rank))
        types.append(1)
    for i, p in enumerate(singles):
        tokens.append(p)
        scores.append(-float(len(merged) + i))
        types.append(1)

    path = tmp_path_factory.mktemp("spm") / "spm-vocab.gguf"
    kvs = {
        "block_count": 1,
        "context_length": 512,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "head_count": 4,
        "head_count_kv": 4,
        "layer_norm_rms_eps": 1e-5,
        "tokenizer_model": "llama",
        "token_list": tokens,
        "token_scores": scores,
        "token_types": types,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
    }
    return write_gguf(path, "llama", kvs)


def test_spm_default_text(spm_gguf):
    ours = load_tokenizer(open_gguf(spm_gguf))
    assert ours.kind == "llama" and ours.add_bos
    llm = _llama(spm_gguf)
    text = default_text()[400_000:460_000]  # text the vocabulary was not trained on
    ids = ours.encode(text)
    np.testing.assert_array_equal(ids, np.asarray(_ref(llm, text), dtype=np.int32))


@pytest.mark.parametrize("text", TRICKY)
def test_spm_tricky(spm_gguf, text):
    ours = load_tokenizer(open_gguf(spm_gguf))
    assert list(ours.encode(text)) == _ref(_llama(spm_gguf), text)


# -- Gemma 3: SentencePiece with 262144 pieces, no space prefix, user-defined whitespace runs -----------
GEMMA_TRICKY = [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",  # control tokens: text, not parsed
    "a  b   c    d\n\n\nx" + "\n" * 35 + "y" + " " * 40 + "z",  # user-defined runs, longer than any
    "\t\t\t\tindent\t \t \n \n  \n",
    "[multimodal] <mask> <unk> <pad> <bos> <eos>",
    "\u00a0nbsp \u3000ideographic space ▁ literal ▁▁ pieces",
    "x" * 64 + " " + "ab" * 40,
    "emoji 🧑‍🤝‍🧑 🏳️‍🌈 and rare CJK 𠀀𪚥 bytes",
    "line\r\nendings\rcarriage",
]


@pytest.fixture(scope="module")
def gemma3_tokenizers(gemma3_path):
    with open_gguf(gemma3_path) as g:
        ours = load_tokenizer(g)
    return ours, _llama(gemma3_path)


def test_gemma3_default_text(gemma3_tokenizers):
    ours, llm = gemma3_tokenizers
    assert ours.kind == "llama" and ours.add_bos and ours.n_vocab == 262144
    text = default_text()
    ids = ours.encode(text)
    assert len(ids) > 100_000
    np.testing.assert_array_equal(ids, np.asarray(_ref(llm, text), dtype=np.int32))


@pytest.mark.parametrize("text", TRICKY + GEMMA_TRICKY)
def test_gemma3_tricky(gemma3_tokenizers, text):
    ours, llm = gemma3_tokenizers
    assert list(ours.encode(text)) == _ref(llm, text)
