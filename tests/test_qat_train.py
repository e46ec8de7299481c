"""ggufkit.qat.train and `ggufkit qat`: self-distillation through the level's types on a tiny seeded
checkpoint; the loss goes down on a repeated text, an interrupted run resumes to the uninterrupted result
bit for bit, and the output folder converts at the level into a GGUF holding the weights training saw."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ggufkit.cli import main  # noqa: E402
from tests.helpers.checkpoints import synthetic_checkpoint  # noqa: E402
from tests.helpers.libggml import ggml_dequantize  # noqa: E402
from tests.helpers.quant_data import assert_same_floats  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun. " * 12
# Q2_K: the level whose rounding moves a tiny random model's (nearly uniform) distribution the most
SETTINGS = dict(level="Q2_K", steps=8, lr=1e-4, ctx=16, save_every=3, threads=1, seed=7)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run, and one stopped after step 4 (checkpointed) then resumed."""
    from ggufkit.qat.train import train

    d = tmp_path_factory.mktemp("qat")
    folder = synthetic_checkpoint("qwen2", "F32", tied=True)
    text = d / "text.txt"
    text.write_text(TEXT)
    whole = train(folder, d / "whole", text=text, **SETTINGS)
    stopped = train(folder, d / "split", text=text, stop_at=4, **SETTINGS)
    ckpt = (d / "split" / "checkpoint" / "state.pt").is_file()
    written = (d / "split" / "config.json").exists()
    resumed = train(folder, d / "split", text=text, **SETTINGS)
    return dict(
        d=d,
        folder=folder,
        text=text,
        whole=whole,
        stopped=stopped,
        ckpt=ckpt,
        written=written,
        resumed=resumed,
    )


def test_loss_is_finite_and_goes_down(run):
    losses = run["whole"].losses
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert losses[0] > 0
    # the repeated text: every window is nearly the same, so the steps fit one distribution
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses


def test_resume_continues_to_the_same_result(run):
    from safetensors.numpy import load_file

    assert run["stopped"].stopped_early and run["stopped"].steps == 4 and run["ckpt"]
    assert not run["written"]  # an interrupted run leaves no HF folder
    r = run["resumed"]
    assert r.resumed_from == 4 and r.steps == 8 and not r.stopped_early
    assert r.losses == run["whole"].losses  # the first 4 from the checkpoint, then the same steps
    a = load_file(run["d"] / "whole" / "model.safetensors")
    b = load_file(run["d"] / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    # and training changed the weights (else the comparison could not tell)
    base = load_file(run["folder"] / "model.safetensors")
    assert any(not np.array_equal(a[k], base[k]) for k in base if k in a)


def test_output_converts_to_the_weights_training_saw(run):
    """convert OUT at the level: each quantized tensor is libggml's quantization of a trained weight, equal
    to fake_quantize of the saved latent weight (qwen2: no q/k permutation)."""
    import transformers

    from ggufkit.conversion.job import convert
    from ggufkit.gguf.reader import open_gguf
    from ggufkit.qat import fake_quantize, plan_model

    out = run["d"] / "whole"
    dst = run["d"] / "whole-Q2_K.gguf"
    convert(out, dst, type="Q2_K")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float32
    plan = plan_model(model, "Q2_K")
    assert len({p.qtype for p in plan}) >= 2  # the level's mixture
    with open_gguf(dst) as gg:
        assert {t.name for t in gg.tensors if t.ggml_type.name != "F32"} == {p.gguf_name for p in plan}
        for p in plan:
            t = gg.tensor(p.gguf_name)
            assert t.ggml_type.name == p.qtype
            got = ggml_dequantize(np.asarray(t.data()), t.ggml_type, tuple(reversed(t.shape)))
            w = model.get_parameter(p.hf_name).detach()
            assert_same_floats(got, fake_quantize(w, p.qtype).numpy(), p.gguf_name)


def test_the_command_trains_and_resumes(tmp_path, run, capsys):
    args = ["qat", str(run["folder"]), str(tmp_path / "o"), "--level", "Q4_0", "--text", str(run["text"])]
    args += ["--steps", "2", "--ctx", "16", "--threads", "1", "--lr", "1e-3"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "2/2 steps" in out.out and "ggufkit convert" in out.out
    assert "step 2/2 loss" in out.err  # not a terminal: plain progress lines
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    # a checkpoint of other settings is refused, one line
    assert main([*args[:-2], "--lr", "5e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another run" in err and "lr" in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--level", "Q9_9"], ["unknown", "Q9_9"]),
        (["--level", "Q4_0", "--ctx", "4096"], ["tokens", "4096"]),
        (["--level", "Q4_0", "--text", "/nonexistent/t.txt"], ["cannot read"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, run, capsys, extra, words):
    assert main(["qat", str(run["folder"]), str(tmp_path / "o"), "--text", str(run["text"]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    for w in words:
        assert w in err, err


def test_not_an_hf_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["qat", str(src), str(tmp_path / "o"), "--level", "Q4_0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(src) in err and "folder" in err


def test_without_torch_one_line_exit_2(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from ggufkit.cli import main\n"
        f"sys.exit(main(['qat', {str(tmp_path)!r}, {str(tmp_path / 'o')!r}, '--level', 'Q4_0']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "ggufkit qat needs torch and transformers: pip install 'ggufkit[qat]'"
