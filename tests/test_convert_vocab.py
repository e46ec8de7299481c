"""conversion/vocab.py: every tokenizer.* KV as llama.cpp's convert_hf_to_gguf.py writes it.

The oracle is the reference converter itself (`--vocab-only`, from the llama-cpp-python sdist tree, run
once for all folders in one subprocess), read back with the tree's gguf-py GGUFReader.
"""

from __future__ import annotations

import ast
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ggufkit.conversion.vocab import (
    CHECK_TEXT,
    PRE_TOKENIZER_HASHES,
    n_vocab_real,
    read_sentencepiece,
    vocab_kvs,
)
from ggufkit.errors import ConvertError, GgufkitError
from tests.helpers.llama_programs import source_tree
from tests.helpers.vocab_folders import (
    LLAMA3_SPLIT,
    normalize_ours,
    read_tokenizer_kvs,
    smollm2_gguf_vocab,
    smollm2_tokenizer_json,
    tiny_llama_config,
    write_folder,
)

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

SP_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; the five boxing wizards jump quickly. 1234567890 "
    "Sphinx of black quartz, judge my vow. Über naïve café, résumé — 東京 と 大阪.\n"
) * 20


def _cfg(folder: Path, arch: str) -> SimpleNamespace:
    hparams = transformers.AutoConfig.from_pretrained(folder).to_dict()
    return SimpleNamespace(arch=arch, hparams=hparams)


def _train_sentencepiece(**extra) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT.splitlines()),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<custom>"],
        control_symbols=["<ctrl>"],
        minloglevel=2,
        **extra,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return _train_sentencepiece()


@pytest.fixture(scope="module")
def smol_vocab():
    from ggufkit.models import default_model_path

    return smollm2_gguf_vocab(default_model_path())


def _smol_config(vocab, **extra) -> dict:
    tc = {
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",  # tied to eos, as SmolLM2-Instruct ships it
        "chat_template": vocab["chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
    }
    tc.update(extra)
    return tc


def _folders(root: Path, vocab, sp_model: bytes) -> dict[str, tuple[Path, str]]:
    """name -> (folder, arch) of every folder compared with the reference."""
    tj = smollm2_tokenizer_json(vocab)
    llama_ids = {"bos_token_id": 1, "eos_token_id": 2}
    out = {}
    out["smollm2"] = (
        write_folder(
            root / "SmolLM2-Tiny",
            {
                "tokenizer.json": tj,
                "tokenizer_config.json": _smol_config(vocab),
                "config.json": tiny_llama_config(49152, **llama_ids),
            },
        ),
        "llama",
    )
    tc = _smol_config(vocab)
    del tc["chat_template"], tc["add_prefix_space"]
    out["smollm2_pairs_jinja"] = (
        write_folder(
            root / "SmolLM2-Pairs",
            {
                "tokenizer.json": smollm2_tokenizer_json(vocab, pair_merges=True),
                "tokenizer_config.json": tc,
                "chat_template.jinja": vocab["chat_template"],
                "config.json": tiny_llama_config(49152, bos_token_id=1, eos_token_id=2, pad_token_id=2),
            },
        ),
        "llama",
    )
    qwen_cfg = tiny_llama_config(49216, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    qwen_cfg.update(bos_token_id=0, eos_token_id=0)
    out["qwen2_no_tokenizer_config"] = (
        write_folder(root / "Qwen2-Bare", {"tokenizer.json": tj, "config.json": qwen_cfg}),
        "qwen2",
    )
    out["qwen2_padded"] = (
        write_folder(
            root / "Qwen2-Tiny",
            {
                "tokenizer.json": tj,
                "tokenizer_config.json": _smol_config(vocab, add_bos_token=False, chat_template=None),
                "chat_template.json": {"chat_template": "{{ messages[0]['content'] }}"},
                "config.json": qwen_cfg,
            },
        ),
        "qwen2",
    )
    sp_pieces = read_sentencepiece_bytes(root, sp_model)
    n_sp = len(sp_pieces)
    out["llama_sentencepiece"] = (
        write_folder(
            root / "TinyLlama-Tiny",
            {
                "tokenizer.model": sp_model,
                "added_tokens.json": {"<extra_a>": n_sp, "<extra_far>": n_sp + 100},
                "tokenizer_config.json": {
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "added_tokens_decoder": {
                        "0": {"content": "<unk>", "special": True},
                        "1": {"content": "<s>", "special": True},
                        "2": {"content": "</s>", "special": True},
                        str(n_sp + 1): {"content": "▁user▁word", "special": False},
                        str(n_sp + 2): {"content": "<|tool|>", "special": False},
                    },
                    "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                },
                "config.json": tiny_llama_config(n_sp + 8, bos_token_id=1, eos_token_id=2),
            },
        ),
        "llama",
    )
    gemma_cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": n_sp + 4,
        "bos_token_id": 1,
        "eos_token_id": [2, 5],
        "pad_token_id": 0,
    }
    out["gemma3_sentencepiece"] = (
        write_folder(
            root / "Gemma3-Tiny",
            {
                "tokenizer.model": sp_model,
                "tokenizer_config.json": {
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "pad_token": "<unk>",
                    "added_tokens_decoder": {str(n_sp): {"content": "<image_soft_token>", "special": True}},
                },
                "chat_template.jinja": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                "config.json": gemma_cfg,
            },
        ),
        "gemma3",
    )
    return out


def read_sentencepiece_bytes(root: Path, data: bytes):
    path = root / "probe.model"
    path.write_bytes(data)
    return read_sentencepiece(path)


_RUNNER = r"""
import json, os, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))
results = {}
for name, folder, out in jobs:
    sys.argv = [script, folder, "--outfile", out, "--vocab-only"]
    try:
        runpy.run_path(script, run_name="__main__")
        results[name] = None
    except BaseException as e:
        results[name] = f"{type(e).__name__}: {e}"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smol_vocab, sp_model):
    """name -> (folder, arch, reference tokenizer KVs or the reference's error text)."""
    tree = source_tree()
    root = tmp_path_factory.mktemp("vocab")
    folders = _folders(root, smol_vocab, sp_model)
    llama3 = _llama3_folder(root / "Llama3-Tiny")
    jobs = [(n, str(f), str(root / f"{n}.gguf")) for n, (f, _) in folders.items()]
    jobs.append(("llama3_small", str(llama3), str(root / "llama3_small.gguf")))
    bare = write_folder(
        root / "SmolLM2-Bare",
        {"tokenizer.json": smollm2_tokenizer_json(smol_vocab), "config.json": tiny_llama_config(49152)},
    )
    jobs.append(("llama_no_tokenizer_config", str(bare), str(root / "bare.gguf")))
    cmd = [sys.executable, "-c", _RUNNER, str(tree / "convert_hf_to_gguf.py"), json.dumps(jobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for name, (folder, arch) in folders.items():
        assert errors[name] is None, f"{name}: {errors[name]}"
        out[name] = (folder, arch, read_tokenizer_kvs(tree, root / f"{name}.gguf"))
    out["llama3_small"] = (llama3, "llama", errors["llama3_small"])
    out["llama_no_tokenizer_config"] = (bare, "llama", errors["llama_no_tokenizer_config"])
    return out


def _llama3_folder(folder: Path) -> Path:
    """A Llama-3-style tokenizer.json (its split regex, ignore_merges, BOS template) on a tiny vocab."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SP_TEXT.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)],
    )
    return write_folder(
        folder,
        {
            "tokenizer.json": tok.to_str(),
            "tokenizer_config.json": {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            "config.json": tiny_llama_config(512, bos_token_id=0, eos_token_id=1),
        },
    )


# ------------------------------------------------------------------------------------- the reference


CASES = [
    "smollm2",
    "smollm2_pairs_jinja",
    "qwen2_no_tokenizer_config",
    "qwen2_padded",
    "llama_sentencepiece",
    "gemma3_sentencepiece",
]


@pytest.mark.parametrize("name", CASES)
def test_same_kvs_as_reference(reference, name):
    folder, arch, ref = reference[name]
    ours = normalize_ours(vocab_kvs(folder, _cfg(folder, arch)))
    assert [k[0] for k in ours] == [k[0] for k in ref]
    for a, b in zip(ours, ref):
        assert a[1] == b[1], a[0]
        assert a[2] == b[2], a[0]


def test_cases_cover_the_paths(reference):
    kv = {n: {k[0]: k[2] for k in reference[n][2]} for n in CASES}
    assert kv["smollm2"]["tokenizer.ggml.pre"] == "smollm"
    assert kv["smollm2"]["tokenizer.ggml.add_bos_token"] is False  # the vocab_size 49152 quirk
    assert "tokenizer.chat_template" not in kv["qwen2_no_tokenizer_config"]
    assert kv["smollm2_pairs_jinja"]["tokenizer.ggml.padding_token_id"] == 2  # tied to eos
    types = kv["qwen2_padded"]["tokenizer.ggml.token_type"][1]
    assert types[-1] == 5 and kv["qwen2_padded"]["tokenizer.ggml.tokens"][1][-1] == "[PAD49215]"
    # <unk> is CONTROL here: added_tokens_decoder marks it special
    assert set(kv["llama_sentencepiece"]["tokenizer.ggml.token_type"][1]) == {1, 3, 4, 5, 6}
    assert kv["gemma3_sentencepiece"]["tokenizer.ggml.add_space_prefix"] is False


def test_unknown_pre_tokenizer_refused(reference):
    folder, arch, ref_error = reference["llama3_small"]
    assert ref_error is not None and "NotImplementedError" in ref_error  # the reference refuses it too
    with pytest.raises(ConvertError, match="pre-tokenizer not recognised"):
        vocab_kvs(folder, _cfg(folder, arch))


def test_llama_bpe_without_tokenizer_config_refused(reference):
    """transformers then picks LlamaTokenizerFast with its "<s>" defaults, which this vocabulary lacks:
    the reference fails; ggufkit says what to add."""
    folder, arch, ref_error = reference["llama_no_tokenizer_config"]
    assert ref_error is not None
    with pytest.raises(ConvertError, match="tokenizer_config.json"):
        vocab_kvs(folder, _cfg(folder, arch))


def test_n_vocab_real(reference):
    folder, arch, _ = reference["gemma3_sentencepiece"]
    cfg = _cfg(folder, "gemma3")
    assert n_vocab_real(folder, cfg) == cfg.hparams["vocab_size"]
    folder, _, _ = reference["smollm2"]
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert n_vocab_real(folder, cfg) == len(tj["model"]["vocab"]) + len(tj["added_tokens"])


# ----------------------------------------------------------------------------------- the hash table


def _reference_pre_table() -> tuple[str, dict[str, str]]:
    tree = source_tree()
    src = (tree / "conversion" / "base.py").read_text(encoding="utf-8")
    funcs = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
    func = next(n for n in funcs if n.name == "get_vocab_base_pre")
    chktxt = None
    table: dict[str, str] = {}
    for node in func.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chktxt":
            chktxt = node.value.value
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            right = node.test.comparators[0]
            if getattr(node.test.left, "id", None) == "chkhsh" and isinstance(right, ast.Constant):
                table[right.value] = node.body[-1].value.value  # later ifs win, as in the chain
    return chktxt, table


def test_check_text_and_table_match_reference():
    chktxt, table = _reference_pre_table()
    assert CHECK_TEXT == chktxt
    for digest, name in PRE_TOKENIZER_HASHES.items():
        assert table[digest] == name, digest
    names = set(PRE_TOKENIZER_HASHES.values())
    assert {"llama-bpe", "smollm", "qwen2", "tekken", "gpt-2"} <= names


# ------------------------------------------------------------------------------ SentencePiece reader


def test_sentencepiece_reader_matches_library(tmp_path, sp_model):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = read_sentencepiece(path)
    assert len(pieces) == sp.vocab_size()
    for i, (piece, score, ptype) in enumerate(pieces):
        assert piece == sp.IdToPiece(i)
        assert score == sp.GetScore(i)
        assert (ptype == 2) == sp.IsUnknown(i) and (ptype == 3) == sp.IsControl(i)
        assert (ptype == 6) == sp.IsByte(i) and (ptype == 5) == sp.IsUnused(i)


def test_sentencepiece_mutation_corpus(tmp_path, sp_model):
    """Truncations and byte flips: either a clean parse or ConvertError, never another exception."""
    rng = random.Random(1313)
    path = tmp_path / "tokenizer.model"
    refused = 0
    cuts = [1, 2, 3, 7, len(sp_model) // 3, len(sp_model) - 1]
    mutants = [sp_model[:n] for n in cuts]
    for _ in range(300):
        data = bytearray(sp_model)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 400))] = rng.randrange(256)
        mutants.append(bytes(data))
    mutants += [b"", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b", b"\x0a\x05\x0a\x01"]
    for data in mutants:
        path.write_bytes(data)
        try:
            pieces = read_sentencepiece(path)
        except ConvertError as e:
            assert isinstance(e, GgufkitError) and "tokenizer.model" in str(e)
            refused += 1
        else:
            assert pieces and all(isinstance(p, str) for p, _, _ in pieces)
    assert refused >= 20


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "no pieces"),
        (b"\x0a\x10\x0a\x01a", "runs past"),
        (b"\x0a\x03\x0a\x01", "runs past"),
        (b"\x0a\x03\x0a\x01\xff", "not UTF-8"),
        (b"\x0a\x05\x0a\x01a\x18\x09", "unknown type"),
        (b"\x0a\x03\x0a\x01a\x0a\x03\x0a\x01a", "twice"),
        (b"\x0b\x00", "wire type 3"),
        (b"\x0a\x80", "truncated varint"),
    ],
)
def test_sentencepiece_malformed(tmp_path, data, why):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    with pytest.raises(ConvertError, match=why):
        read_sentencepiece(path)


# ------------------------------------------------------------------------------------------ refusals


def test_refusals(tmp_path, smol_vocab):
    cfg = SimpleNamespace(arch="llama", hparams={"vocab_size": 49152})
    empty = write_folder(tmp_path / "empty", {"config.json": tiny_llama_config(49152)})
    with pytest.raises(ConvertError, match="no tokenizer.json or tokenizer.model"):
        vocab_kvs(empty, cfg)
    with pytest.raises(ConvertError, match="architecture"):
        vocab_kvs(empty, SimpleNamespace(arch="phi3", hparams={}))
    bad = write_folder(tmp_path / "bad", {"tokenizer.json": "{not json"})
    with pytest.raises(ConvertError, match="not valid JSON"):
        vocab_kvs(bad, cfg)
    tj = smollm2_tokenizer_json(smol_vocab)
    tj["model"]["byte_fallback"] = True
    tj["decoder"] = {"type": "Sequence", "decoders": []}
    hf = write_folder(tmp_path / "hf", {"tokenizer.json": tj})
    with pytest.raises(ConvertError, match="tokenizer.model"):
        vocab_kvs(hf, cfg)
    small = write_folder(tmp_path / "small", {"tokenizer.json": smollm2_tokenizer_json(smol_vocab)})
    with pytest.raises(ConvertError, match="vocab_size"):
        vocab_kvs(small, SimpleNamespace(arch="qwen2", hparams={"vocab_size": 1000}))
