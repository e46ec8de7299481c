"""The public Python API: the names in ggufkit/__init__.py, lazy imports, README's "From Python" example."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ggufkit
from ggufkit.errors import GgufkitError

README = Path(__file__).parents[1] / "README.md"


def _run(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=900)


def test_import_loads_nothing_else():
    """`import ggufkit` is cheap: no submodule, no numpy; a name loads only its own module."""
    done = _run(
        "import sys, json, ggufkit\n"
        "before = sorted(m for m in sys.modules if m.startswith('ggufkit') or m == 'numpy')\n"
        "ggufkit.open_gguf\n"
        "after = sorted(m for m in sys.modules if m.startswith('ggufkit') or m == 'numpy')\n"
        "print(json.dumps([before, after]))"
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    assert before == ["ggufkit"]
    assert "ggufkit.gguf.reader" in after and "numpy" not in after, after


def test_every_public_name_resolves_to_its_module_object():
    for name in ggufkit.__all__:
        value = getattr(ggufkit, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        module, attr = ggufkit._API[name]
        assert value is getattr(importlib.import_module(f"ggufkit.{module}"), attr), name
        if inspect.isclass(value):
            assert issubclass(value, GgufkitError), name
        else:
            assert callable(value) and not inspect.ismodule(value), name
    assert set(ggufkit._API) <= set(dir(ggufkit))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ggufkit.nope  # noqa: B018


def test_functions_stay_functions_whatever_is_imported_first():
    """A public name never turns into the module that defines it (evaluate, pick and inspect sit beside
    modules of related names): checked after importing every module of the package, in a fresh process."""
    done = _run(
        "import pkgutil, importlib, inspect, ggufkit\n"
        "for m in pkgutil.walk_packages(ggufkit.__path__, 'ggufkit.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "bad = [n for n in ggufkit.__all__ if inspect.ismodule(getattr(ggufkit, n))]\n"
        "print(bad)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _readme_example() -> str:
    text = README.read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's From Python section holds one python block"
    return blocks[0]


def test_readme_from_python_example_runs(tmp_path, smollm2_path):
    """The README example, as written, in an empty folder: it quantizes, evaluates, estimates and picks."""
    done = _run(_readme_example(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^Q4_K_M: \d+\.\d MiB, \d+ tensors fell back$", out, re.M), out
    assert re.search(r"^llama \d+ tensors$", out, re.M), out
    assert re.search(r"^PPL \d+\.\d+ ± \d+\.\d+, mean KLD \d\.\d{4}$", out, re.M), out
    assert re.search(r"^Q4_K_M at 8K context needs \d+ MiB$", out, re.M), out
    assert re.search(r"^refused: .*requantiz", out, re.M | re.I), out
    assert (tmp_path / "smollm2-Q4_K_M.gguf").stat().st_size > 0
    assert not (tmp_path / "again.gguf").exists()
