"""The source tree keeps one home per fact: walked with ast, without importing anything.

- gguf-py (the `gguf` package) is imported by at most one module of src/: ggufkit.gguf.types holds the
  enums and block sizes (checked against gguf-py in test_gguf_file.py).
- Per-type facts live in quants/registry.py (block formats) and gguf/types.py (ggml's enums and sizes):
  no other module writes a tuple, list, set or dict of three or more ggml type names ("Q4_K" strings or
  GGMLQuantizationType members); it derives them from the registry instead.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "ggufkit"
# the homes of per-type facts, and the one module that may spell types in lists of its own
FACT_HOMES = {
    "quants/registry.py",  # block formats: sizes, kernels, native ops, search work, vec_dot partner
    "gguf/types.py",  # ggml's enums and block sizes
    "conversion/hf.py",  # convert_hf_to_gguf.py's --outtype choices
    "conversion/safetensors.py",  # safetensors' own dtype names, which ggml spells the same
    "quantize/levels.py",  # llama-quantize's levels and aliases, whose names are type names too
    "quantize/rules.py",  # llama-quant.cpp's per-tensor rules, naming types in conditions as the C++ does
}
# ggml's type names (ggml.h enum ggml_type), as gguf/types.py spells them; read from its source so that
# this test needs no import of the package
_TYPES_SRC = ast.parse((SRC / "gguf" / "types.py").read_text())
TYPE_NAMES = {
    t.id
    for node in ast.walk(_TYPES_SRC)
    if isinstance(node, ast.ClassDef) and node.name == "GGMLQuantizationType"
    for stmt in node.body
    if isinstance(stmt, ast.Assign)
    for t in stmt.targets
    if isinstance(t, ast.Name)
}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _imports_gguf_py(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "gguf" for a in node.names):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "gguf_").partition(".")[0] == "gguf"
        ):
            lines.append(node.lineno)
    return lines


_NAME_LIKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")


def _is_type_name(node: ast.AST | None) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in TYPE_NAMES
    return isinstance(node, ast.Attribute) and node.attr in TYPE_NAMES


def _is_other_name(node: ast.AST | None) -> bool:
    """A string spelled like a type that is not one: a level ("Q4_K_M") or ftype name; a collection
    holding one is a list of levels, where "Q8_0" or "Q6_K" name a level that shares its type's name."""
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and bool(_NAME_LIKE.fullmatch(node.value))
        and node.value not in TYPE_NAMES
    )


def _type_name_literals(tree: ast.AST) -> list[tuple[int, int]]:
    """(line, count) of every tuple, list or set literal, dict literal's keys or values, and string of
    space-separated words, holding >= 3 ggml type names and no level names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            groups = [node.elts]
        elif isinstance(node, ast.Dict):
            groups = [node.keys, node.values]
        else:
            groups = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "F32 F16 BF16".split()
            words = node.value.split()
            if all(w in TYPE_NAMES for w in words):
                groups = [[ast.Constant(w) for w in words]]
        for items in groups:
            n = sum(_is_type_name(item) for item in items)
            if n >= 3 and not any(_is_other_name(item) for item in items):
                found.append((node.lineno, n))
    return found


def test_the_type_names_are_read():
    assert {"F32", "F16", "BF16", "Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "Q8_K"} <= TYPE_NAMES


def test_gguf_py_is_imported_by_at_most_one_module():
    importers = {name: lines for name, tree in _modules() if (lines := _imports_gguf_py(tree))}
    assert len(importers) <= 1, f"gguf-py imported by {importers}; use ggufkit.gguf.types"


def test_no_per_type_lists_outside_the_registry():
    offenders = {
        name: hits
        for name, tree in _modules()
        if name not in FACT_HOMES and (hits := _type_name_literals(tree))
    }
    assert not offenders, f"collections of ggml type names (line, count) outside the fact homes: {offenders}"


@pytest.mark.parametrize(
    "code, hits",
    [
        ('X = ("Q4_K", "Q5_K", "Q6_K")', 1),
        ("X = {T.F16: 1, T.BF16: 2, T.F32: 3}", 1),
        ("X = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.IQ4_NL]", 1),
        ('X = ("Q4_K", "Q5_K")', 0),
        ('X = ("Q4_K_M", "Q5_K_S", "q4_k")', 0),
        ('LEVELS = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")', 0),
        ('X = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}', 1),
        ('X = frozenset(T[n] for n in "F32 F16 BF16".split())', 1),
    ],
)
def test_the_checks_see_literals(code, hits):
    assert len(_type_name_literals(ast.parse(code))) == hits


def test_the_checks_see_imports():
    code = "import gguf\nfrom gguf import GGUFValueType\nfrom .gguf import types\nfrom ggufkit import x"
    assert _imports_gguf_py(ast.parse(code)) == [1, 2]
