"""ggufkit convert against llama.cpp's own convert_hf_to_gguf.py (and llama-quantize), byte for byte.

- --type F32 / F16 / BF16 / Q8_0: the whole file's sha256 equals convert_hf_to_gguf.py --outtype's, for
  every architecture (llama with Llama 3 rope scaling, mistral, qwen2, qwen3, gemma3) on seeded synthetic
  checkpoints (tests/helpers/checkpoints.py: real SmolLM2 tokenizer, F32/F16/BF16, sharded or not);
- any other level: equal to convert_hf_to_gguf.py --outtype <checkpoint dtype> followed by llama-quantize
  (Q4_K_M, Q6_K; IQ4_XS with an imatrix made by llama-imatrix on the reference's converted file);
- a row length that is not a multiple of 32 (Q8_0 falls back to F16; K-quants to their fallbacks);
- bad inputs through the command line: one line on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ggufkit import convert
from ggufkit.cache import sha256_file
from ggufkit.cli import main
from ggufkit.errors import ConvertError
from ggufkit.gguf.reader import open_gguf

from .helpers.checkpoints import synthetic_checkpoint
from .helpers.convert_oracle import reference_convert
from .helpers.llama_programs import reference_quantized

# (arch, checkpoint dtype, options): every architecture, every dtype, sharded and unsharded.
CHECKPOINTS = [
    ("llama", "BF16", {"rope": "llama3"}),
    ("llama", "F16", {}),
    ("mistral", "F32", {"shards": 2}),
    ("qwen2", "BF16", {"shards": 2}),
    ("qwen3", "F16", {}),
    ("gemma3", "BF16", {}),
    ("gemma3", "F16", {"shards": 3}),
]


def _id(case) -> str:
    arch, dtype, opts = case
    return "-".join([arch, dtype, *(f"{k}{v}" for k, v in opts.items())])


def _same_file(ours: Path, ref: Path) -> None:
    if sha256_file(ours) == sha256_file(ref):
        return
    a, b = open_gguf(ours), open_gguf(ref)  # say where they differ first
    assert list(a.kv) == list(b.kv), "KV order differs"
    for k in a.kv:
        assert a.kv[k].raw == b.kv[k].raw, f"KV {k} differs"
    assert [(t.name, t.shape, t.ggml_type) for t in a.tensors] == [
        (t.name, t.shape, t.ggml_type) for t in b.tensors
    ], "tensor table differs"
    for t in a.tensors:
        assert bytes(t.data()) == bytes(b.tensor(t.name).data()), f"tensor {t.name} differs"
    raise AssertionError(f"{ours} and {ref} differ")


@pytest.mark.parametrize("case", CHECKPOINTS, ids=_id)
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0"])
def test_matches_convert_hf_to_gguf(case, qtype, tmp_path):
    arch, dtype, opts = case
    folder = synthetic_checkpoint(arch, dtype, **opts)
    out = tmp_path / "out.gguf"
    summary = convert(folder, out, type=qtype, threads=2)
    assert summary.file_size == out.stat().st_size
    _same_file(out, reference_convert(folder, qtype.lower()))


@pytest.mark.parametrize(
    "case,level",
    [
        (("llama", "BF16", {"rope": "llama3"}), "Q4_K_M"),
        (("mistral", "F32", {"shards": 2}), "Q6_K"),
        (("qwen2", "BF16", {"shards": 2}), "Q6_K"),
        (("qwen3", "F16", {}), "Q4_K_M"),
        (("gemma3", "F16", {"shards": 3}), "Q4_K_M"),
        (("gemma3", "BF16", {}), "Q6_K"),
    ],
    ids=lambda v: v if isinstance(v, str) else _id(v),
)
def test_levels_match_convert_then_llama_quantize(case, level, tmp_path):
    arch, dtype, opts = case
    folder = synthetic_checkpoint(arch, dtype, **opts)
    out = tmp_path / "out.gguf"
    convert(folder, out, type=level, threads=2)
    converted = reference_convert(folder, dtype.lower())  # --outtype <the checkpoint's dtype>
    _same_file(out, reference_quantized(converted, level))


def test_imatrix_level_matches_llama_quantize(tmp_path):
    from .test_quantize import make_imatrix

    folder = synthetic_checkpoint("qwen3", "F16")
    converted = reference_convert(folder, "f16")
    imx = make_imatrix(Path(converted))
    out = tmp_path / "out.gguf"
    convert(folder, out, type="IQ4_XS", imatrix=imx, threads=2)
    _same_file(out, reference_quantized(converted, "IQ4_XS", imatrix=imx))


# -- edited checkpoints ------------------------------------------------------------------------------------


def _edited(folder: Path, tmp_path: Path, *, tensors=None, config=None) -> Path:
    """A copy of an (F16/F32, unsharded) checkpoint folder under the same name, its tensors and config.json
    passed through the given functions."""
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "in" / folder.name
    shutil.copytree(folder, dst)
    if tensors is not None:
        data = tensors(load_file(dst / "model.safetensors"))
        save_file(data, dst / "model.safetensors")
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(cfg), indent=2) + "\n")
    return dst


def _narrow_ffn(t: dict) -> dict:
    """ffn width 80: ffn_down's rows (80) are not a multiple of 32 (nor of 256)."""
    out = {}
    for k, v in t.items():
        if "gate_proj" in k or "up_proj" in k:
            v = v[:80]
        elif "down_proj" in k:
            v = v[:, :80]
        out[k] = np.ascontiguousarray(v)
    return out


def _narrow_config(c: dict) -> dict:
    return {**c, "intermediate_size": 80}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_row_length_fallbacks(qtype, tmp_path):
    folder = _edited(
        synthetic_checkpoint("qwen3", "F16"), tmp_path, tensors=_narrow_ffn, config=_narrow_config
    )
    out = tmp_path / "out.gguf"
    summary = convert(folder, out, type=qtype, threads=2)
    # ffn_down's rows (80) fit neither Q8_0's 32 nor a K-quant's 256: F16 in both files
    assert summary.tensor_types["blk.0.ffn_down.weight"] == "F16"
    if qtype == "Q8_0":
        assert "blk.0.ffn_down.weight" in summary.fallbacks
    if qtype == "Q8_0":
        ref = reference_convert(folder, "q8_0")
    else:
        ref = reference_quantized(reference_convert(folder, "f16"), qtype)
    _same_file(out, ref)


def test_dry_run_writes_nothing_and_plans_the_reference_types(tmp_path):
    folder = synthetic_checkpoint("llama", "BF16", rope="llama3")
    out = tmp_path / "out.gguf"
    summary = convert(folder, out, type="Q8_0", dry_run=True)
    assert not out.exists() and summary.dst is None
    ref = open_gguf(reference_convert(folder, "q8_0"))
    assert summary.tensor_types == {t.name: t.ggml_type.name for t in ref.tensors}
    assert list(summary.tensor_types)[0] == "rope_freqs.weight"


def test_default_output_beside_the_folder(tmp_path):
    folder = tmp_path / "in" / "Qwen2-Tiny-F16"
    shutil.copytree(synthetic_checkpoint("qwen2", "F16"), folder)
    assert main([ "convert", str(folder), "--type", "q8_0", "--threads", "1"]) == 0  # fmt: skip
    out = tmp_path / "in" / "Qwen2-Tiny-F16-Q8_0.gguf"
    assert out.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in synthetic_checkpoint("qwen2", "F16").iterdir()
    )


# -- bad inputs ------------------------------------------------------------------------------------------


def _add_tensor(t):
    return {**t, "model.layers.0.self_attn.rotary_proj.weight": np.zeros((4, 4), np.float16)}


def _drop_tensor(t):
    return {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}


def _nan_tensor(t):
    t = dict(t)
    w = t["model.layers.1.self_attn.v_proj.weight"].copy()
    w[3, 5] = np.nan
    t["model.layers.1.self_attn.v_proj.weight"] = w
    return t


def _inf_norm(t):
    t = dict(t)
    w = t["model.norm.weight"].copy()
    w[0] = np.inf
    t["model.norm.weight"] = w
    return t


BAD = {
    "extra tensor": ({"tensors": _add_tensor}, "rotary_proj"),
    "missing tensor": ({"tensors": _drop_tensor}, "blk.1.ffn_up.weight"),
    "shape against config": ({"config": lambda c: {**c, "intermediate_size": 768}}, "768"),
    "nan weight": ({"tensors": _nan_tensor}, "model.layers.1.self_attn.v_proj.weight"),
    "inf norm": ({"tensors": _inf_norm}, "model.norm.weight"),
}


@pytest.mark.parametrize("what", list(BAD))
@pytest.mark.parametrize("qtype", ["F16", "Q4_K_M"])
def test_bad_checkpoint_refused(what, qtype, tmp_path, capsys):
    edits, needle = BAD[what]
    folder = _edited(synthetic_checkpoint("qwen3", "F16"), tmp_path, **edits)
    out = tmp_path / "out.gguf"
    rc = main(["convert", str(folder), str(out), "--type", qtype, "--threads", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("ggufkit convert: error:"), err
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "something was written"


def test_output_over_an_input_file_refused(tmp_path, capsys):
    folder = _edited(synthetic_checkpoint("qwen2", "F32"), tmp_path)
    before = sha256_file(folder / "model.safetensors")
    for target in ("model.safetensors", "config.json"):
        rc = main(["convert", str(folder), str(folder / target)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "overwrite" in err, err
    assert sha256_file(folder / "model.safetensors") == before
    assert not any(p.name.startswith(".") for p in folder.iterdir())


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--type", "Q9_X"], "Q9_X"),
        (["--type", "F16", "--imatrix", "x.imatrix"], "imatrix"),
        (["--threads", "0"], "threads"),
    ],
)
def test_bad_options_refused(args, needle, tmp_path, capsys):
    folder = synthetic_checkpoint("qwen2", "F16")
    out = tmp_path / "out.gguf"
    rc = main(["convert", str(folder), str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_not_a_folder(tmp_path):
    with pytest.raises(ConvertError, match="not a folder"):
        convert(tmp_path / "nope", tmp_path / "out.gguf")
