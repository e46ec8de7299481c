"""quantize.plan: the per-tensor type plan equals llama.cpp's, tensor by tensor, in llama.cpp's order.

The reference is the real llama-quantize of llama-cpp-python 0.3.36: `--dry-run` (it runs the same type
selection and prints every tensor's destination type in output order; milliseconds per call) for every
level, architecture, shape and option, and real quantizations (cached) for the order and types of the
files it writes. Architecture variants are "sparse" GGUFs written here: real metadata and tensor table,
zero-length data extended as a sparse file, which is all llama-quantize reads for its plan.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ggufkit.errors import QuantizeError
from ggufkit.gguf.reader import open_gguf
from ggufkit.quantize.imatrix import load_for_quantize
from ggufkit.quantize.levels import LEVELS, level
from ggufkit.quantize.plan import (
    SUPPORTED_ARCHS,
    Hparams,
    TensorKind,
    TensorSpec,
    plan_for_gguf,
    plan_quantization,
)
from tests.helpers.gguf_build import write_gguf, write_sparse_gguf
from tests.helpers.llama_programs import (
    llama_fallbacks,
    llama_quantize_dry_run,
    llama_quantize_refusal,
    reference_quantized,
    tool,
)

ALL_LEVELS = list(LEVELS)  # the 19 of issue 3 plus Q2_K_S


# -- sparse model files ----------------------------------------------------------------------------------


def model_tensors(
    arch: str,
    *,
    n_embd=256,
    n_layer=12,
    n_head=8,
    n_head_kv=2,
    n_ff=512,
    n_vocab=512,
    head_dim=32,
    tied=None,
    n_expert=0,
    wtype=T.F16,
    qkv_fused=False,
):
    """The tensor table llama.cpp's converter writes for a dense model of this architecture."""
    tied = arch.startswith("gemma") if tied is None else tied
    ts = [("token_embd.weight", (n_embd, n_vocab), wtype), ("output_norm.weight", (n_embd,), T.F32)]
    if not tied:
        ts.append(("output.weight", (n_embd, n_vocab), wtype))
    if arch in ("llama", "mistral3"):
        ts.append(("rope_freqs.weight", (head_dim // 2,), T.F32))
    q, kv = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [
            (p + "attn_norm.weight", (n_embd,), T.F32),
            (p + "ffn_norm.weight", (n_embd,), T.F32),
            (p + "attn_output.weight", (q, n_embd), wtype),
        ]
        if qkv_fused:
            ts.append((p + "attn_qkv.weight", (n_embd, q + 2 * kv), wtype))
        else:
            ts += [
                (p + "attn_q.weight", (n_embd, q), wtype),
                (p + "attn_k.weight", (n_embd, kv), wtype),
                (p + "attn_v.weight", (n_embd, kv), wtype),
            ]
        if n_expert:
            ts += [
                (p + "ffn_gate_inp.weight", (n_embd, n_expert), T.F32),
                (p + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert), wtype),
                (p + "ffn_up_exps.weight", (n_embd, n_ff, n_expert), wtype),
                (p + "ffn_down_exps.weight", (n_ff, n_embd, n_expert), wtype),
            ]
        else:
            ts += [
                (p + "ffn_gate.weight", (n_embd, n_ff), wtype),
                (p + "ffn_up.weight", (n_embd, n_ff), wtype),
                (p + "ffn_down.weight", (n_ff, n_embd), wtype),
            ]
        if arch == "qwen2":
            ts += [
                (p + "attn_q.bias", (q,), T.F32),
                (p + "attn_k.bias", (kv,), T.F32),
                (p + "attn_v.bias", (kv,), T.F32),
            ]
        if arch in ("qwen3", "gemma3"):
            ts += [
                (p + "attn_q_norm.weight", (head_dim,), T.F32),
                (p + "attn_k_norm.weight", (head_dim,), T.F32),
            ]
        if arch in ("gemma2", "gemma3"):
            ts += [
                (p + "post_attention_norm.weight", (n_embd,), T.F32),
                (p + "post_ffw_norm.weight", (n_embd,), T.F32),
            ]
    return ts


def model_kvs(
    arch: str, *, n_embd=256, n_layer=12, n_head=8, n_head_kv=2, n_ff=512, n_expert=0, kv_array=False, **_
):
    kvs = {
        f"{arch}.context_length": (V.UINT32, 4096),
        f"{arch}.embedding_length": (V.UINT32, n_embd),
        f"{arch}.block_count": (V.UINT32, n_layer),
        f"{arch}.feed_forward_length": (V.UINT32, n_ff),
        f"{arch}.attention.head_count": (V.UINT32, n_head),
        f"{arch}.attention.head_count_kv": (
            (V.ARRAY, [n_head_kv] * n_layer, V.UINT32) if kv_array else (V.UINT32, n_head_kv)
        ),
        f"{arch}.attention.layer_norm_rms_epsilon": (V.FLOAT32, 1e-6),
        "general.file_type": (V.UINT32, 1),
    }
    if n_expert:
        kvs[f"{arch}.expert_count"] = (V.UINT32, n_expert)
        kvs[f"{arch}.expert_used_count"] = (V.UINT32, 2)
    return kvs


@pytest.fixture(scope="session")
def sparse_model(tmp_path_factory):
    """sparse_model(arch, **shape) -> path of a sparse GGUF (made once per parameter set)."""
    made = {}
    root = tmp_path_factory.mktemp("sparse")

    def make(arch: str = "llama", **params):
        key = (arch, tuple(sorted(params.items())))
        if key not in made:
            path = root / f"{arch}-{len(made)}.gguf"
            tparams = {k: v for k, v in params.items() if k != "kv_array"}
            write_sparse_gguf(path, arch, model_tensors(arch, **tparams), model_kvs(arch, **params))
            made[key] = path
        return made[key]

    return make


# -- comparison against llama-quantize --dry-run ---------------------------------------------------------


def our_plan(src, level_name, *, imatrix=None, include_weights=(), exclude_weights=(), **opts):
    vectors = None
    if imatrix is not None:
        vectors, _ = load_for_quantize(imatrix, include=include_weights, exclude=exclude_weights)
    with open_gguf(src) as model:
        return plan_for_gguf(model, level_name, imatrix=vectors, **opts)


def assert_plan_matches_llama(src, level_name, **opts):
    """Our plan == llama-quantize --dry-run: same tensors in the same order, same destination types, same
    total size (as llama prints it, MiB with 2 decimals) and the same number of fallbacks."""
    ref = llama_quantize_dry_run(src, level_name, **opts)
    plan = our_plan(src, level_name, **opts)
    theirs = [(name, dst.name) for name, _, _, dst in ref.tensors]
    ours = [(t.name, t.dst_type.name) for t in plan.tensors]
    assert theirs, ref.log[-2000:]
    diff = [(a, b, t.reason) for a, b, t in zip(theirs, ours, plan.tensors) if a != b]
    assert len(ours) == len(theirs) and not diff, f"{level_name} {opts}: (llama, ours, reason) {diff[:8]}"
    assert [tuple(t.shape) for t in plan.tensors] == [
        ne[: len(t.shape)] for t, (_, ne, _, _) in zip(plan.tensors, ref.tensors)
    ]
    assert f"{plan.total_bytes / 1024 / 1024:.2f}" == ref.quant_size_mib
    assert f"{plan.bits_per_weight:.2f}" == ref.quant_bpw
    assert plan.n_fallback == ref.n_fallback
    return plan, ref


def assert_fallbacks_match_llama(src, level_name, **opts):
    """Each tensor's (wanted, used) fallback pair is the one llama-quantize reports for it, and its kind
    follows: FALLBACK, or COPY when the fallback lands on the source type; no other tensor is FALLBACK."""
    ref = llama_quantize_dry_run(src, level_name, **opts)
    plan = our_plan(src, level_name, **opts)
    theirs = llama_fallbacks(ref.log)
    assert len(theirs) == ref.n_fallback, ref.log[-2000:]  # every warning was read
    assert {t.name: t.fallback for t in plan.tensors if t.fallback is not None} == theirs
    for t in plan.tensors:
        if t.fallback is None:
            assert t.kind is not TensorKind.FALLBACK and not t.fallback_note, t
            continue
        assert t.dst_type == t.fallback[1], t
        assert t.kind is (TensorKind.COPY if t.fallback[1] == t.src_type else TensorKind.FALLBACK), t
        assert t.fallback_note in t.reason, t  # the text shown is made from the pair
    assert plan.fallbacks() == [t for t in plan.tensors if t.kind is TensorKind.FALLBACK]
    return plan, theirs


@pytest.mark.parametrize("level_name", ALL_LEVELS)
def test_fallback_pairs_and_kinds_smollm2(smollm2_f16, level_name):
    """SmolLM2's 576-wide rows (576 % 256 = 64): its K-quant and IQ4_XS tensors fall back, each to the
    type llama.cpp picks for it."""
    plan, theirs = assert_fallbacks_match_llama(smollm2_f16, level_name)
    if LEVELS[level_name].default_type.name.endswith("_K") or level_name == "IQ4_XS":
        assert theirs and all(t.kind is TensorKind.FALLBACK for t in plan.fallbacks())
    if level_name == "Q4_K_M":  # tied: the output rule itself sends token_embd to Q8_0 (576 % 256)
        embd = next(t for t in plan.tensors if t.name == "token_embd.weight")
        assert embd.dst_type == T.Q8_0 and embd.kind is TensorKind.MIX and embd.fallback is None
        assert "token_embd.weight" not in theirs


def test_fallback_to_the_source_type(sparse_model):
    """ffn_down rows of 200 fit neither 256 nor 32: F16, the source type, so the tensor is copied (kind
    COPY) while its fallback is still counted, by llama.cpp as by the plan."""
    plan, theirs = assert_fallbacks_match_llama(sparse_model("llama", **SHAPES["f16-fallback"]), "Q4_K_M")
    down = [t for t in plan.tensors if "ffn_down" in t.name]
    assert down and all(t.kind is TensorKind.COPY and t.fallback[1] == T.F16 for t in down)
    assert plan.n_fallback == len(theirs) >= len(down)


@pytest.mark.parametrize("option", ["output-q4_k-leave", "one-attn_v", "pure", "embd-q8_0"])
def test_fallback_pairs_with_options(smollm2_f16, option):
    for level_name in ("Q4_K_M", "Q3_K_M", "Q5_0", "Q6_K"):
        assert_fallbacks_match_llama(smollm2_f16, level_name, **OPTIONS[option])


@pytest.mark.parametrize("level_name", ALL_LEVELS)
def test_every_level_smollm2(smollm2_f16, level_name):
    """SmolLM2-135M (576 wide, 30 layers, GQA 3, tied): most K-quant tensors fall back."""
    assert_plan_matches_llama(smollm2_f16, level_name)


@pytest.mark.parametrize("level_name", ALL_LEVELS)
def test_every_level_synthetic(synthetic_f16, level_name):
    """The synthetic llama (256 wide, 4 layers, GQA 4, untied): the K-quant mixes without fallbacks."""
    assert_plan_matches_llama(synthetic_f16, level_name)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_every_level_every_arch(sparse_model, arch):
    src = sparse_model(arch)
    for level_name in ALL_LEVELS:
        assert_plan_matches_llama(src, level_name)


SHAPES = {
    "gqa2": dict(n_head=8, n_head_kv=4),
    "mha": dict(n_head=8, n_head_kv=8),
    "tied-llama": dict(tied=True),
    "untied-gemma3": dict(arch="gemma3", tied=False),
    "kv-array": dict(kv_array=True),
    "fallbacks-320": dict(n_embd=320, n_head=10, head_dim=32, n_ff=640),  # 320 % 256 = 64: K-quants fall back
    "f16-fallback": dict(n_embd=256, n_ff=200),  # ffn_down rows of 200: not even a 32-block -> F16
    "smollm2-like": dict(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536, tied=True),
    "1-layer": dict(n_layer=1),
    "2-layers": dict(n_layer=2),
    "17-layers": dict(n_layer=17),
    "llama-70b": dict(n_layer=80, n_head=8, n_head_kv=1, n_ff=256),
    "llama-65b": dict(n_layer=80, n_head=8, n_head_kv=8, n_ff=256),  # no GQA: not LLM_TYPE_70B
    "qwen2-70b": dict(arch="qwen2", n_layer=80, n_head=8, n_head_kv=8, n_ff=256),
    "qwen3-80": dict(arch="qwen3", n_layer=80, n_head=8, n_head_kv=1, n_ff=256),
    "fused-qkv": dict(
        qkv_fused=True
    ),  # attn_qkv is attn_v-like: the attn_v rules, not llama.cpp's qkv branch
    "moe-8": dict(n_expert=8, n_layer=4),
    "moe-4": dict(n_expert=4, n_layer=4),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_hparams(sparse_model, shape):
    params = dict(SHAPES[shape])
    src = sparse_model(params.pop("arch", "llama"), **params)
    for level_name in ALL_LEVELS:
        assert_plan_matches_llama(src, level_name)


def test_70b_rule_is_exercised(sparse_model):
    """The 70B bump really changes attn_v (so the shape test above compares something)."""
    plan = our_plan(sparse_model("llama", **{k: v for k, v in SHAPES["llama-70b"].items()}), "Q3_K_M")
    types = {t.dst_type for t in plan.tensors if "attn_v" in t.name}
    assert types == {T.Q5_K}


# -- options --------------------------------------------------------------------------------------------

OPTIONS = {
    "pure": dict(pure=True),
    "leave-output": dict(leave_output_tensor=True),
    "output-q8_0": dict(output_tensor_type="q8_0"),
    "output-f16": dict(output_tensor_type="f16"),
    "output-q4_k-leave": dict(output_tensor_type="q4_K", leave_output_tensor=True),
    "embd-q8_0": dict(token_embedding_type="q8_0"),
    "embd-f32-output-q5_0": dict(token_embedding_type="f32", output_tensor_type="q5_0"),
    "attn_v-q8_0": dict(tensor_types=["attn_v=q8_0"]),
    "one-attn_v": dict(tensor_types=[r"blk\.0\.attn_v=q8_0"]),  # shifts the more-bits counter of the others
    "first-match": dict(tensor_types=["ffn_(up|gate)=q5_1", "ffn=q4_0", "ATTN_Q=Q8_0"]),
    "token_embd-pattern": dict(tensor_types=["token_embd=q4_0", "output=q5_1"]),
    "pure-and-pattern": dict(pure=True, tensor_types=["down=q8_0"]),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("model", ["smollm2", "synthetic", "gemma3"])
def test_options(option, model, smollm2_f16, synthetic_f16, sparse_model):
    src = {"smollm2": smollm2_f16, "synthetic": synthetic_f16, "gemma3": sparse_model("gemma3")}[model]
    opts = OPTIONS[option]
    # (SmolLM2 is tied: --output-tensor-type q4_K reaches token_embd through the output rule, so the row
    # fallback still applies: Q5_0. An untied 576-wide output.weight would get no fallback: see below.)
    for level_name in ("Q4_K_M", "Q3_K_M", "Q5_0", "Q6_K", "F16"):
        assert_plan_matches_llama(src, level_name, **opts)


def test_option_kinds_and_reasons(synthetic_f16):
    plan = our_plan(synthetic_f16, "Q4_K_M", tensor_types=["attn_q=q8_0"], token_embedding_type="q8_0")
    by = {t.name: t for t in plan.tensors}
    assert (
        by["blk.0.attn_q.weight"].kind is TensorKind.OVERRIDE
        and "--tensor-type attn_q=q8_0" in by["blk.0.attn_q.weight"].reason
    )
    assert by["token_embd.weight"].kind is TensorKind.OVERRIDE
    assert (
        by["blk.3.ffn_down.weight"].kind is TensorKind.MIX
        and "more-bits layer 3" in by["blk.3.ffn_down.weight"].reason
    )
    assert by["blk.0.ffn_norm.weight"].kind is TensorKind.COPY and not by["blk.0.ffn_norm.weight"].quantize
    assert by["blk.0.ffn_up.weight"].kind is TensorKind.DEFAULT and by["blk.0.ffn_up.weight"].quantize
    assert all(t.fallback is None for t in plan.tensors) and plan.n_fallback == 0


def test_unusable_override(smollm2_f16, tmp_path):
    """An explicit token/output type whose block does not divide the rows gets no fallback: llama-quantize
    fails on it (its --dry-run does not notice); ggufkit refuses up front, naming the tensor."""
    with pytest.raises(QuantizeError, match="token_embd"):
        our_plan(smollm2_f16, "Q8_0", token_embedding_type="q6_K")
    with pytest.raises(QuantizeError, match="output"):
        plan_quantization(
            [TensorSpec("output.weight", (576, 100), T.F16)],
            Hparams("llama", 1, 8, 8),
            "Q8_0",
            output_tensor_type="iq4_xs",
        )
    out = tmp_path / "x.gguf"
    assert "token_embd.weight" in llama_quantize_refusal(
        "--token-embedding-type", "q6_K", str(smollm2_f16), str(out), "Q8_0", "1"
    )


# -- imatrix-dependent choices ---------------------------------------------------------------------------


def write_imatrix_for(path, model_path, *, fmt="gguf", seed=0):
    """A small imatrix for every 2-D blk weight of a model (positive random values, count 10)."""
    rng = np.random.default_rng(seed)
    with open_gguf(model_path) as m:
        names = [(t.name, t.shape) for t in m.tensors if t.name.startswith("blk.") and len(t.shape) >= 2]
    if fmt == "gguf":
        kvs = {
            "general.type": (V.STRING, "imatrix"),
            "imatrix.datasets": (V.ARRAY, ["test.txt"]),
            "imatrix.chunk_count": (V.UINT32, 2),
            "imatrix.chunk_size": (V.UINT32, 512),
        }
        tensors = {}
        for name, shape in names:
            n_mat = shape[2] if len(shape) > 2 else 1
            tensors[name + ".in_sum2"] = rng.uniform(0.5, 20, (n_mat, shape[0])).astype(np.float32)
            tensors[name + ".counts"] = np.full((n_mat, 1), 10.0, dtype=np.float32)
        write_gguf(path, "llama", kvs, tensors)
    else:
        with open(path, "wb") as f:
            f.write(np.int32(len(names)).tobytes())
            for name, shape in names:
                n = shape[0] * (shape[2] if len(shape) > 2 else 1)
                f.write(
                    np.int32(len(name)).tobytes()
                    + name.encode()
                    + np.int32(3).tobytes()
                    + np.int32(n).tobytes()
                )
                f.write(rng.uniform(0.5, 20, n).astype("<f4").tobytes())
    return path


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
@pytest.mark.parametrize("model", ["smollm2", "synthetic", "qwen3"])
def test_imatrix_dependent_choices(fmt, model, smollm2_f16, synthetic_f16, sparse_model, tmp_path):
    """With any imatrix: Q4_0/Q5_0 give the first eighth of ffn_down Q4_1/Q5_1; IQ4_NL/XS stop bumping it to
    Q5_K; Q2_K_S gets its imatrix-only tensors."""
    src = {"smollm2": smollm2_f16, "synthetic": synthetic_f16, "qwen3": sparse_model("qwen3", n_layer=16)}[
        model
    ]
    im = write_imatrix_for(tmp_path / f"im.{fmt}", src, fmt=fmt)
    for level_name in ("Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS", "Q2_K_S", "Q4_K_M"):
        plan, _ = assert_plan_matches_llama(src, level_name, imatrix=im)
        assert plan.has_imatrix
        assert any(t.use_importance for t in plan.tensors)
    # filtering everything away = no imatrix at all, for llama.cpp as for us
    plan, _ = assert_plan_matches_llama(src, "Q5_0", imatrix=im, include_weights=["no-such-tensor"])
    assert not plan.has_imatrix
    assert_plan_matches_llama(src, "IQ4_XS", imatrix=im, exclude_weights=["ffn_down"])


def test_imatrix_changes_the_plan(sparse_model, tmp_path):
    """The imatrix-dependent rules are really exercised by the test above."""
    src = sparse_model("qwen3", n_layer=16)
    im = write_imatrix_for(tmp_path / "im.gguf", src)
    vectors, _ = load_for_quantize(im)
    with open_gguf(src) as m:
        a, b = plan_for_gguf(m, "Q5_0"), plan_for_gguf(m, "Q5_0", imatrix=vectors)
    changed = [t.name for t, u in zip(a.tensors, b.tensors) if t.dst_type != u.dst_type]
    assert changed == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]


def test_q2_k_s_requires_an_imatrix(synthetic_f16, tmp_path):
    """Q2_K_S without an imatrix: llama-quantize refuses (a dry run only warns); so does the plan check."""
    plan = our_plan(synthetic_f16, "Q2_K_S")
    assert plan.missing_imatrix()
    with pytest.raises(QuantizeError, match="importance matrix"):
        plan.check_imatrix_requirement()
    assert "will require an imatrix" in llama_quantize_dry_run(synthetic_f16, "Q2_K_S").log
    refused = llama_quantize_refusal(str(synthetic_f16), str(tmp_path / "x.gguf"), "Q2_K_S")
    assert "requires an imatrix" in refused
    im = write_imatrix_for(tmp_path / "im.gguf", synthetic_f16)
    our_plan(synthetic_f16, "Q2_K_S", imatrix=im).check_imatrix_requirement()


# -- real files: order and types of what llama-quantize writes --------------------------------------------


@pytest.mark.parametrize(
    "model,level_name,opts",
    [
        ("smollm2", "Q4_K_M", {}),
        ("smollm2", "Q8_0", {}),
        ("synthetic", "Q3_K_M", {}),
        ("synthetic", "Q5_K_S", dict(pure=True)),
        ("synthetic", "Q4_0", dict(tensor_types=["attn_v=q8_0"], output_tensor_type="q8_0")),
    ],
)
def test_plan_equals_written_file(model, level_name, opts, smollm2_f16, synthetic_f16):
    src = {"smollm2": smollm2_f16, "synthetic": synthetic_f16}[model]
    out = reference_quantized(src, level_name, **opts)
    plan = our_plan(src, level_name, **opts)
    with open_gguf(out) as q:
        written = [(t.name, tuple(t.shape), t.ggml_type, t.nbytes) for t in q.tensors]
        assert q.get("general.file_type") == level(level_name).ftype_id
    assert written == [(t.name, t.shape, t.dst_type, t.nbytes) for t in plan.tensors]


# -- API ------------------------------------------------------------------------------------------------


def test_level_names():
    assert level("q4_k_m") is LEVELS["Q4_K_M"]
    assert level("Q4_K") is LEVELS["Q4_K_M"] and level("q3_k") is LEVELS["Q3_K_M"]
    assert level("Q5_K").name == "Q5_K_M" and level("15").name == "Q4_K_M"
    assert level("bf16").default_type == T.BF16 and level("BF16").ftype_id == 32
    with pytest.raises(QuantizeError, match="Q4_K_M"):
        level("Q4_K_X")
    with pytest.raises(QuantizeError, match="unknown quantization type"):
        level("\u00b2")  # a digit to str.isdigit, not to int(): once a ValueError escaped


def test_level_ftypes_are_llamas():
    """ftype ids as llama-quantize prints them in its usage table."""
    run = subprocess.run([str(tool("llama-quantize")), "--help"], capture_output=True, text=True)
    table = {}
    for line in run.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit() and parts[1] == "or":
            table.setdefault(parts[2], int(parts[0]))
    for name, lv in LEVELS.items():
        assert table[name] == lv.ftype_id, name


def test_unsupported_architecture(sparse_model, tmp_path):
    path = tmp_path / "m.gguf"
    write_sparse_gguf(path, "bert", [("token_embd.weight", (256, 512), T.F16)], {})
    with open_gguf(path) as m, pytest.raises(QuantizeError, match="bert.*llama"):
        plan_for_gguf(m, "Q4_K_M")


def test_plan_quantization_direct():
    """The pure API: order (layer number, then bytes), 1-D kept, size and bits per weight."""
    specs = [
        TensorSpec("blk.10.attn_v.weight", (256, 64), T.F32),
        TensorSpec("blk.2.attn_v.weight", (256, 64), T.F32),
        TensorSpec("output.weight", (256, 1000), T.F32),
        TensorSpec("blk.2.attn_norm.weight", (256,), T.F32),
        TensorSpec("token_embd.weight", (256, 1000), T.F32),
    ]
    plan = plan_quantization(specs, Hparams("llama", n_layer=11, n_head=8, n_head_kv=2), "Q8_0")
    assert [t.name for t in plan.tensors] == [
        "output.weight",
        "token_embd.weight",
        "blk.2.attn_norm.weight",
        "blk.2.attn_v.weight",
        "blk.10.attn_v.weight",
    ]
    assert [t.dst_type for t in plan.tensors] == [T.Q8_0, T.Q8_0, T.F32, T.Q8_0, T.Q8_0]
    assert plan.total_bytes == (2 * 1000 + 2 * 64) * 256 // 32 * 34 + 256 * 4
    assert plan.n_elements == 2 * 256000 + 256 + 2 * 256 * 64
    assert plan.bits_per_weight == pytest.approx(8 * plan.total_bytes / plan.n_elements)
    with pytest.raises(QuantizeError, match="q9_9"):
        plan_quantization(specs, Hparams("llama", 11, 8, 2), "Q8_0", tensor_types=["attn=q9_9"])


@pytest.mark.parametrize("level_name", ["Q4_1", "Q4_K_M", "Q8_0", "Q6_K", "F16"])
def test_quantized_source(smollm2_path, level_name):
    """SmolLM2 as shipped (a Q4_1 mix): tensors already of the planned type are copied, not requantized."""
    plan, _ = assert_plan_matches_llama(smollm2_path, level_name)
    copies = [t for t in plan.tensors if not t.quantize]
    assert all(t.dst_type == t.src_type and t.kind is TensorKind.COPY for t in copies)
    if level_name == "Q4_1":
        assert any(t.src_type == T.Q4_1 and t.reason.startswith("copy: already Q4_1") for t in copies)
