"""optimize/sensitivity.py: the perturbation passes resume from the unperturbed residual stream at the first
layer a replacement changes, and give exactly the KL divergences of full passes (llama and Gemma 3)."""

from __future__ import annotations

import numpy as np
import pytest

from ggufkit.gguf.reader import open_gguf
from ggufkit.optimize import sensitivity
from ggufkit.quants import registry


def _noisy(g, name: str, seed: int) -> np.ndarray:
    t = g.tensor(name)
    rows = t.n_elements // t.shape[0]
    w = registry.dequantize(np.asarray(t.data()), int(t.ggml_type), (rows, t.shape[0]))
    rng = np.random.default_rng(seed)
    return (w + rng.normal(0, 0.05 * float(w.std()), w.shape)).astype(np.float32)


def test_first_layer():
    assert sensitivity.first_layer(["blk.7.attn_q.weight", "blk.3.ffn_down.weight"], 30) == 3
    assert sensitivity.first_layer(["output.weight"], 30) == 30
    assert sensitivity.first_layer(["output.weight", "blk.29.ffn_up.weight"], 30) == 29
    assert sensitivity.first_layer(["token_embd.weight", "blk.29.ffn_up.weight"], 30) == 0


@pytest.mark.parametrize("which", ["synthetic_f32", "gemma3_path"])
def test_resumed_passes_are_the_full_passes(which, request, monkeypatch):
    from ggufkit.engine import model_args
    from ggufkit.evaluation import calibration_text

    path = request.getfixturevalue(which)
    monkeypatch.setattr(sensitivity, "PERTURB_TOKENS", 64)  # the resumption is the same at any length
    text = calibration_text()
    with open_gguf(path) as g:
        n = model_args(g).block_count
        names = [[f"blk.{n - 1}.ffn_down.weight"], [f"blk.{n // 2}.attn_q.weight", "blk.1.attn_v.weight"]]
        if which == "synthetic_f32":  # small enough to replace the embedding and the (untied) output
            names += [["token_embd.weight"], ["output.weight"]]
        reps = [{m: _noisy(g, m, i) for m in group} for i, group in enumerate(names)]
        starts = []
        first_layer = sensitivity.first_layer
        monkeypatch.setattr(
            sensitivity, "first_layer", lambda *a: starts.append(first_layer(*a)) or starts[-1]
        )
        resumed = sensitivity.perturbed_klds(g, text, reps)
        assert starts[:2] == [n - 1, 1]
        monkeypatch.setattr(sensitivity, "first_layer", lambda names, n_layer: 0)
        full = sensitivity.perturbed_klds(g, text, reps)
    assert all(k > 0 for k in full), full
    assert resumed == full
