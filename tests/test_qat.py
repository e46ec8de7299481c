"""ggufkit.qat.fake_quantize: the forward is llama.cpp's dequantize(quantize(x)) bit for bit (libggml run
in the test is the oracle), the backward is the straight-through identity, bad input is one clear error."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ggufkit.errors import QuantizeError  # noqa: E402
from ggufkit.qat import fake_quantize  # noqa: E402
from ggufkit.quants import dequantize, formats, get_format, quantize  # noqa: E402
from tests.helpers.libggml import ggml_dequantize, ggml_quantize  # noqa: E402
from tests.helpers.quant_data import assert_same_floats, hostile_cases, importance_rows  # noqa: E402

FORMATS = list(formats())  # every registered type; none is skipped below
IMPORTANCE_FORMATS = [n for n in FORMATS if get_format(n).uses_importance]
CASES = {
    k: v
    for k, v in hostile_cases(n_rows=4, n_per_row=512).items()
    if k
    in {
        "gaussian",
        "student_t_df1",
        "outlier_columns",
        "zero_blocks",
        "block_magnitudes",
        "ties",
        "huge_spikes",
    }
}
SRC = Path(__file__).resolve().parent.parent / "src" / "ggufkit"


def _fq(x: np.ndarray, qtype, importance=None) -> np.ndarray:
    out = fake_quantize(torch.from_numpy(x), qtype, importance=importance)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == x.shape
    return out.numpy()


def _ggml_round_trip(x: np.ndarray, qtype, importance=None) -> np.ndarray:
    return ggml_dequantize(ggml_quantize(x, qtype, importance), qtype, x.shape)


# ---------------------------------------------------------------- forward: llama.cpp's values


@pytest.mark.parametrize("qtype", FORMATS)
def test_forward_is_libggml_dequantize_of_quantize(qtype):
    for name, x in CASES.items():
        assert_same_floats(_fq(x, qtype), _ggml_round_trip(x, qtype), f"{qtype} {name}")


@pytest.mark.parametrize("qtype", IMPORTANCE_FORMATS)
def test_forward_with_importance_is_libggml(qtype):
    x = CASES["outlier_columns"]
    for name, imp in importance_rows(512).items():
        ref = _ggml_round_trip(x, qtype, imp)
        assert_same_floats(_fq(x, qtype, imp), ref, f"{qtype} importance {name}")
        assert_same_floats(_fq(x, qtype, torch.from_numpy(imp)), ref, f"{qtype} torch importance {name}")
    # importance changes the result of these types (else the checks above could not tell it was used)
    imp = importance_rows(512)["spiky"]
    assert not np.array_equal(_fq(x, qtype, imp), _fq(x, qtype))


@pytest.mark.parametrize("qtype", [n for n in FORMATS if n not in IMPORTANCE_FORMATS])
def test_importance_is_ignored_where_llama_cpp_ignores_it(qtype):
    x = CASES["gaussian"]
    imp = importance_rows(512)["spiky"]
    assert_same_floats(_fq(x, qtype, imp), _ggml_round_trip(x, qtype, imp), qtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "IQ4_XS", "F16"])
def test_rows_are_the_last_dimension_whatever_the_layout(qtype):
    rng = np.random.default_rng(3)
    x3 = rng.standard_normal((2, 3, 512)).astype(np.float32)
    ref = dequantize(quantize(x3.reshape(6, 512), qtype), qtype, (6, 512)).reshape(2, 3, 512)
    assert_same_floats(_fq(x3, qtype), ref, f"{qtype} 3-D")
    base = torch.from_numpy(np.ascontiguousarray(x3.reshape(6, 512).T))  # [512, 6]: its .T is not contiguous
    out = fake_quantize(base.T, qtype)
    assert not base.T.is_contiguous()
    assert_same_floats(out.numpy(), ref.reshape(6, 512), f"{qtype} transposed view")
    one = _fq(x3[0, 0], qtype)  # a single row, 1-D
    assert_same_floats(one, ref[0, 0], f"{qtype} 1-D")


def test_other_dtypes_round_the_float32_result():
    x = CASES["gaussian"]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        xt = torch.from_numpy(x).to(dtype)
        out = fake_quantize(xt, "Q4_K")
        assert out.dtype == dtype and out.device == xt.device
        want = _ggml_round_trip(xt.to(torch.float32).numpy(), "Q4_K")
        assert torch.equal(out, torch.from_numpy(want).to(dtype)), dtype


# ---------------------------------------------------------------- backward: straight-through


@pytest.mark.parametrize("qtype", FORMATS)
def test_gradient_is_straight_through_everywhere(qtype):
    """d/dx sum(fake_quantize(x) * w) == w for every element, also where Q4_0/Q5_0 or a searched scale
    clips (the module docstring says why there is no clipping mask); the importance gets no gradient."""
    rng = np.random.default_rng(4)
    x = torch.tensor(CASES["outlier_columns"], requires_grad=True)
    w = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    imp = torch.from_numpy(importance_rows(512)["imatrix_like"]).requires_grad_()
    y = fake_quantize(x, qtype, importance=imp)
    assert y.requires_grad
    (y * w).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert torch.equal(x.grad, w)
    assert imp.grad is None


def test_clipped_values_exist_and_still_get_the_gradient():
    """Q4_0 has one level less on the side opposite a block's signed max: a value there beyond 7·d is
    clipped to 7·d (ggml's quantize_row_q4_0_ref). Such a value is present here and its gradient is 1."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = -1.0, 0.99  # d = -1/-8 = 0.125: the largest positive value is 7·0.125 = 0.875
    ref = _ggml_round_trip(x, "Q4_0")
    assert ref[0, 1] == np.float32(0.875)  # clipped by llama.cpp, not rounded to a neighbour
    xt = torch.tensor(x, requires_grad=True)
    y = fake_quantize(xt, "Q4_0")
    assert_same_floats(y.detach().numpy(), ref, "Q4_0 clipped")
    y.sum().backward()
    assert torch.equal(xt.grad, torch.ones_like(xt))


def test_a_linear_layer_trains_through_it():
    """The matmul sees the quantized weight; the weight's gradient is the matmul's gradient at that weight."""
    rng = np.random.default_rng(5)
    W = torch.tensor(rng.standard_normal((16, 256)).astype(np.float32), requires_grad=True)
    X = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32))
    G = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    Wq = torch.from_numpy(_ggml_round_trip(W.detach().numpy(), "Q4_K"))
    y = X @ fake_quantize(W, "Q4_K").T
    assert torch.equal(y, X @ Wq.T)
    (y * G).sum().backward()
    torch.testing.assert_close(W.grad, G.T @ X, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: fake_quantize(torch.zeros(4, 512), "Q9_9"), ["unknown", "Q9_9"]),
        (lambda: fake_quantize(torch.zeros(4, 512), "Q8_K"), ["Q8_K", "not supported"]),
        (lambda: fake_quantize(torch.zeros(4, 100), "Q4_K"), ["Q4_K", "256", "(4, 100)"]),
        (lambda: fake_quantize(torch.zeros(3, 48), "Q8_0"), ["Q8_0", "32", "(3, 48)"]),
        (lambda: fake_quantize(torch.zeros(4, 0), "Q8_0"), ["Q8_0", "(4, 0)"]),
        (lambda: fake_quantize(torch.tensor(1.0), "F16"), ["F16", "()"]),
        (lambda: fake_quantize(torch.zeros(4, 32, dtype=torch.int32), "Q8_0"), ["Q8_0", "torch.int32"]),
        (lambda: fake_quantize(np.zeros((4, 32), np.float32), "Q8_0"), ["Q8_0", "ndarray"]),
        (
            lambda: fake_quantize(torch.zeros(4, 64), "Q4_0", importance=np.ones(32)),
            ["Q4_0", "(64,)", "(32,)"],
        ),
    ],
)
def test_bad_input_is_one_clear_error(call, words):
    with pytest.raises(QuantizeError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


# ---------------------------------------------------------------- torch stays inside ggufkit.qat


def test_no_module_outside_qat_imports_torch():
    importers = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            if any(n.split(".")[0] == "torch" for n in names) and not rel.startswith("qat/"):
                importers.append((rel, node.lineno))
    assert not importers, importers


def test_the_rest_of_ggufkit_runs_without_torch():
    """The quantize, convert and CLI modules load in a process without torch in sys.modules."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json, ggufkit, ggufkit.quants, ggufkit.quantize.job, ggufkit.cli\n"
            "import ggufkit.conversion.job\n"
            "ggufkit.quantize_file, ggufkit.convert\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# ---------------------------------------------------------------- prepare: the level's plan, through convert


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q_proj / k_proj rows into ggml's rope layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "arch, dtype, tied, level, with_imatrix",
    [
        ("llama", "F32", False, "Q4_K_M", False),
        ("qwen2", "BF16", True, "IQ4_XS", False),
        ("qwen3", "F32", False, "IQ4_XS", True),
        ("gemma3", "BF16", True, "Q4_K_M", False),
        ("gemma3", "F32", True, "Q4_0", True),
    ],
)
def test_convert_writes_the_weights_training_saw(tmp_path, arch, dtype, tied, level, with_imatrix):
    """prepare -> one SGD step -> finish -> save_pretrained -> ggufkit convert at the level: every quantized
    tensor of the file is one prepare fake-quantized, with the type prepare used, and libggml's dequantize
    of its bytes equals (bit for bit, rows permuted for llama q/k) the weight the last forward saw; for a
    BF16 model the forward saw them rounded to bfloat16 (the Linear runs in the model's dtype)."""
    import shutil

    import transformers

    from ggufkit.conversion.job import convert
    from ggufkit.gguf.reader import open_gguf
    from ggufkit.qat import finish, prepare
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint(arch, dtype, tied=tied)
    imatrix = None
    if with_imatrix:  # llama-imatrix's file for the checkpoint (converted to F32 for it)
        from tests.test_quantize import make_imatrix

        convert(folder, tmp_path / f"{folder.name}-F32.gguf", type="F32")
        imatrix = make_imatrix(tmp_path / f"{folder.name}-F32.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    prepared = prepare(model, level, imatrix=imatrix)
    assert len({p.qtype for p in prepared}) >= 2  # the level's mixture, not one type
    weighted = [p for p in prepared if p.importance is not None]
    assert bool(weighted) == with_imatrix
    for p in weighted:  # the vectors change these weights (so the comparison below sees which were used)
        w = model.get_submodule(p.hf_name.rpartition(".")[0]).parametrizations.weight.original
        assert not torch.equal(
            fake_quantize(w.detach(), p.qtype), fake_quantize(w.detach(), p.qtype, p.importance)
        )
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 10.0 * p.grad
    if tied:  # llama.cpp multiplies the output with token_embd: the forward's lm_head is the same fake quant
        emb, out_w = model.get_input_embeddings(), model.get_output_embeddings().weight
        assert torch.equal(out_w, emb.weight)
        assert not torch.equal(out_w, emb.parametrizations.weight.original)
    seen, latent = {}, {}
    for p in prepared:
        module = model.get_submodule(p.hf_name.rpartition(".")[0])
        seen[p.hf_name] = module.weight.detach().to(torch.float32).numpy().copy()
        latent[p.hf_name] = module.parametrizations.weight.original.detach().to(torch.float32).numpy().copy()
    finish(model)
    out = tmp_path / "trained"
    model.save_pretrained(out)
    for f in folder.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    dst = tmp_path / f"trained-{level}.gguf"
    convert(out, dst, type=level, imatrix=imatrix)

    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    with open_gguf(dst) as gg:
        quantized = {t.name for t in gg.tensors if t.ggml_type.name != "F32"}
        assert quantized == {p.gguf_name for p in prepared}
        changed = 0
        for p in prepared:
            t = gg.tensor(p.gguf_name)
            assert t.ggml_type.name == p.qtype, p
            got = ggml_dequantize(np.asarray(t.data()), t.ggml_type, tuple(reversed(t.shape)))
            if arch == "llama" and p.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = n_head if "q_proj" in p.hf_name else n_kv
                seen[p.hf_name] = _permute_like_llama_cpp(seen[p.hf_name], heads)
                latent[p.hf_name] = _permute_like_llama_cpp(latent[p.hf_name], heads)
            # the file holds llama.cpp's quantization of the latent weight the training kept
            ref = _ggml_round_trip(np.ascontiguousarray(latent[p.hf_name]), p.qtype, p.importance)
            assert_same_floats(got, ref, f"{p.gguf_name} {p.qtype} latent")
            # the forward ran in the model's dtype: it saw the file's values rounded to it (exact in F32)
            rounded = torch.from_numpy(got).to(model.dtype).to(torch.float32).numpy()
            assert_same_floats(rounded, np.ascontiguousarray(seen[p.hf_name]), f"{p.gguf_name} {p.qtype}")
            if model.dtype == torch.float32:
                assert np.array_equal(got.view(np.uint32), rounded.view(np.uint32))
            changed += not np.array_equal(seen[p.hf_name], latent[p.hf_name])
        assert changed == len(prepared)  # the forward saw quantized weights, not the latent ones


def test_prepare_follows_convert_plan_with_fallbacks(tmp_path):
    """A model whose ffn width (96) is no multiple of 256: prepare's types are convert's dry-run types of the
    saved model, ffn_down's row-length fallback included; a second prepare and an unknown level refused."""
    import shutil

    import transformers

    from ggufkit.conversion.job import convert
    from ggufkit.qat import finish, prepare
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint("qwen3", "F32", tied=False)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg.intermediate_size = 96
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    prepared = prepare(model, "Q4_K_M")
    with pytest.raises(QuantizeError, match="already prepared"):
        prepare(model, "Q4_K_M")
    finish(model)
    with pytest.raises(QuantizeError):
        prepare(model, "Q4_K_Z")
    model.save_pretrained(tmp_path / "m")
    for f in folder.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path / "m" / f.name)
    summary = convert(tmp_path / "m", type="Q4_K_M", dry_run=True)
    assert {p.gguf_name: p.qtype for p in prepared} == {
        n: t for n, t in summary.tensor_types.items() if t != "F32"
    }
    assert summary.fallbacks and set(summary.fallbacks) <= {p.gguf_name for p in prepared}


# ---------------------------------------------------------------- prepare: llama.cpp's logits on the file

LOGIT_CTX, LOGIT_CHUNKS = 128, 8  # ggufkit eval's windows: each scores its second half (8 x 63 = 504 tokens)
LOGIT_ARCHS = {"llama": False, "qwen2": True, "qwen3": False, "gemma3": True}  # arch -> tied output


def _llama_cpp_window_logits(path, inputs: np.ndarray) -> np.ndarray:
    """llama.cpp's logits [windows, ctx, vocab], each window a fresh sequence (as tests/test_engine.py)."""
    from tests.helpers.llama_programs import llama_cpp_logits

    return llama_cpp_logits(path, inputs)


def _torch_logits(model, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs.astype(np.int64))).logits.to(torch.float32).numpy()


def _eval_stats(logits: np.ndarray, base: np.ndarray, targets: np.ndarray):
    """ggufkit eval's statistics (llama-perplexity's: mean KLD, same-top, PPL) of `logits` against `base`,
    both [windows, ctx, vocab], on the scored half of each window."""
    from ggufkit.evaluation import EvalResult
    from ggufkit.evaluation.base_cache import base_records
    from ggufkit.evaluation.stats import Sums, against_base, kld_stats

    first, sums = LOGIT_CTX // 2, Sums()
    for w, tgt in enumerate(targets):  # position first+k predicts token first+k+1
        against_base(logits[w, first:-1], tgt, base_records(base[w, first:-1], tgt), sums)
    res = EvalResult("model", "text", "torch", LOGIT_CTX, len(targets), int(targets.size), 0.0, 0.0)
    kld_stats(res, sums)
    return res


class _LogitSetup(NamedTuple):
    folder: Path
    model: object
    inputs: np.ndarray
    targets: np.ndarray
    base_llama_cpp: np.ndarray  # llama.cpp on the F32 conversion
    base_torch: np.ndarray  # the model as loaded (full precision)


@pytest.fixture(scope="module")
def logit_setup(tmp_path_factory):
    """arch -> the seeded F32 checkpoint, its transformers model, ggufkit eval's token windows of the default
    text, and both engines' full-precision logits on them (which must agree before anything is quantized)."""
    import shutil

    import transformers

    from ggufkit.conversion.job import convert
    from ggufkit.engine.tokenizer import load_tokenizer
    from ggufkit.evaluation import chunk_inputs, default_text, make_chunks
    from ggufkit.gguf.reader import open_gguf
    from tests.helpers.checkpoints import synthetic_checkpoint

    made: dict[str, _LogitSetup] = {}

    def get(arch: str) -> _LogitSetup:
        if arch in made:
            return made[arch]
        folder = synthetic_checkpoint(arch, "F32", tied=LOGIT_ARCHS[arch])
        if arch == "gemma3":  # layer_types as llama.cpp runs them (see test_prepare_warns_of_gemma3_layers)
            src, folder = folder, tmp_path_factory.mktemp("gemma3") / folder.name
            shutil.copytree(src, folder)
            cfg = json.loads((folder / "config.json").read_text())
            cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
            (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        f32 = tmp_path_factory.mktemp("f32") / f"{arch}-F32.gguf"
        convert(folder, f32, type="F32")
        with open_gguf(f32) as g:
            tok = load_tokenizer(g)
        chunks = make_chunks(tok.encode(default_text()), ctx=LOGIT_CTX, chunks=LOGIT_CHUNKS)
        inputs = chunk_inputs(chunks, tok.bos_id if tok.add_bos else None)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        made[arch] = s = _LogitSetup(
            folder,
            model,
            inputs,
            chunks[:, LOGIT_CTX // 2 + 1 :],
            _llama_cpp_window_logits(f32, inputs),
            _torch_logits(model, inputs),
        )
        # full precision: the two engines run the same model (measured: KLD <= 3e-8, same top >= 99.8 %)
        same = _eval_stats(s.base_torch, s.base_llama_cpp, s.targets)
        assert same.kld_mean < 1e-6 and same.same_top >= 99.0, (arch, same.kld_mean, same.same_top)
        return s

    return get


@pytest.mark.parametrize("level", ["Q4_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", list(LOGIT_ARCHS))
def test_llama_cpp_on_the_converted_file_is_the_prepared_forward(tmp_path, logit_setup, arch, level):
    """convert at the level, llama.cpp's logits on the file, and the prepared torch model's on the same
    windows: the same quantization damage by ggufkit eval's statistics, and each other's nearest neighbour.

    The synthetic models are untrained (PPL ~ the 49152-token vocabulary), so the top token is decided by
    small margins; llama.cpp rounds the activations to 8 bits before every quantized matmul and torch does
    not, which flips the top at 2-6 % of the positions (measured below: same top 94-98 %), never the
    rounding of a weight."""
    from ggufkit.conversion.job import convert
    from ggufkit.qat import finish, prepare

    s = logit_setup(arch)
    dst = tmp_path / f"{arch}-{level}.gguf"
    convert(s.folder, dst, type=level)
    q_llama_cpp = _llama_cpp_window_logits(dst, s.inputs)
    prepare(s.model, level)
    try:
        q_torch = _torch_logits(s.model, s.inputs)
    finally:
        finish(s.model)

    # 1. the damage, each engine against its own full-precision run. The bars are tests/test_evaluate.py's
    # (ggufkit eval's engine against llama-perplexity): mean KLD within 5 %, PPL within 0.5 %; same top
    # within 2.5 points, not its 0.5 (2040 tokens of a trained model) nor test_optimize's 1.0 (508 tokens of
    # a synthetic model, both engines rounding activations): here one engine does not round, and the two
    # same-top counts differ by the net of the 2-6 % flips above (measured 2026-12-04: up to 1.6 points).
    lc, pt = (
        _eval_stats(q_llama_cpp, s.base_llama_cpp, s.targets),
        _eval_stats(q_torch, s.base_torch, s.targets),
    )
    print(
        f"{arch} {level}: llama.cpp KLD {lc.kld_mean:.3e} same top {lc.same_top:.2f} PPL {lc.ppl:.1f}; "
        f"prepared torch KLD {pt.kld_mean:.3e} same top {pt.same_top:.2f} PPL {pt.ppl:.1f}"
    )
    assert lc.kld_mean > 1e-4 and lc.same_top < 80  # the level does damage (an unprepared model: KLD 0)
    assert pt.kld_mean == pytest.approx(lc.kld_mean, rel=0.05)
    assert pt.ppl == pytest.approx(lc.ppl, rel=0.005)
    assert abs(pt.same_top - lc.same_top) <= 2.5

    # 2. llama.cpp's logits on the file as the reference: the prepared model is within a twentieth of the
    # distance of the unprepared one (the 5 % KLD bar above), and shares its top far more often (measured:
    # prepared KLD 0.3-1.3 % of unprepared, same top 94-98 % against 51-70 %).
    near = _eval_stats(q_torch, q_llama_cpp, s.targets)
    far = _eval_stats(s.base_torch, q_llama_cpp, s.targets)
    print(
        f"  vs llama.cpp: prepared KLD {near.kld_mean:.3e} same top {near.same_top:.2f}; "
        f"unprepared KLD {far.kld_mean:.3e} same top {far.same_top:.2f}"
    )
    # What this cannot see: the Q6_K output left at full precision moves the ratio only to 1-3 % (measured);
    # the round trip above checks that tensor (a tied lm_head included) bit for bit instead.
    assert near.kld_mean <= 0.05 * far.kld_mean
    assert near.same_top >= 90.0 and far.same_top <= near.same_top - 20.0


def test_prepare_warns_of_gemma3_layers_llama_cpp_runs_otherwise(caplog):
    """The seeded Gemma 3 says layer 1 is global ("full_attention"); the GGUF does not carry layer_types and
    llama.cpp makes only every 6th layer global, so its layer 1 is local (rope base 10000, not 1e6).
    Measured 2026-12-04 on the F32 conversion: llama.cpp against the torch model KLD 1.1e-3, same top 72 %
    (7e-9 and 99.8 % with layer_types as llama.cpp runs them). prepare says so; a matching model is quiet."""
    import transformers

    from ggufkit.qat import finish, prepare
    from ggufkit.qat.prepare import llama_cpp_layer_types
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint("gemma3", "F32")
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert llama_cpp_layer_types(model) == ["sliding_attention", "sliding_attention"]
    with caplog.at_level("WARNING", logger="ggufkit.qat.prepare"):
        prepare(model, "Q4_0")
    finish(model)
    assert [r.getMessage() for r in caplog.records if "layer_types" in r.getMessage()] != []
    assert "1 full_attention" in caplog.text and "sliding_attention" in caplog.text
    caplog.clear()
    cfg.layer_types = ["sliding_attention", "sliding_attention"]
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="ggufkit.qat.prepare"):
        prepare(model, "Q4_0")
    assert not caplog.records
    # the other architectures have no layer pattern for llama.cpp to impose
    qwen = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(synthetic_checkpoint("qwen3", "F32")), dtype=torch.float32
    )
    assert llama_cpp_layer_types(qwen) is None
