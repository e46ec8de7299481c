"""`ggufkit report --optimize`: llama.cpp's imatrix quant and ggufkit's optimized file beside each level.

On the seeded synthetic llama (full precision, 256-wide rows, so every K-quant is a candidate), a short ladder
with the cheap weighting ("none") and a few calibration chunks: the rows are where they belong (none for
Q8_0, whose block type llama.cpp quantizes without the imatrix), each imatrix row is the real llama-quantize
--imatrix's file byte for byte, each opt file is no larger than the real llama-quantize's level file, uses
only types ggml accepts for each shape, and loads and runs in llama.cpp; the table, report.json and the
plot hold them; `pick` ignores them; the cache is reused, and remade when the optimize code changes; the
report without --optimize is unchanged. On a synthetic model stored as Q4_1 (a dequantized base on a grid),
Q4_1 and Q5_1, which contain that grid, are left out of the opt file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ggufkit import report as rep
from ggufkit.cache import sha256_file
from ggufkit.gguf.layout import pad
from ggufkit.gguf.reader import open_gguf
from ggufkit.quants.registry import FORMATS
from tests.test_report import _modules_outside, fresh_cache, own_cache, report_in

LEVELS = ["Q8_0", "Q4_K_M", "Q2_K"]
OPTIONS = dict(ctx=128, chunks=2, engine="builtin", threads=2, ram_bytes=8 << 30)
OPT = dict(optimize=True, calib_chunks=3, weighting="none")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return fresh_cache(tmp_path_factory.mktemp("ggufkit-cache"))


@pytest.fixture(scope="module")
def opt_report(synthetic_f32, tmp_path_factory, cache_root):
    return report_in(cache_root, tmp_path_factory, synthetic_f32, levels=LEVELS, **OPTIONS, **OPT)


def _rows(r) -> dict[str, dict]:
    return {row["level"]: row for row in r.levels}


def test_rows_beside_each_calibrated_level(opt_report):
    r, _, events = opt_report
    calibrated = ["Q4_K_M", "Q2_K"]  # Q8_0 ignores an imatrix (test_imatrix_rows_... shows it on llama.cpp)
    expected = ["F32"]
    for lv in LEVELS:
        expected += [lv] + ([f"{lv} imatrix", f"{lv} opt"] if lv in calibrated else [])
    assert [row["level"] for row in r.levels] == expected
    for row in r.levels:
        if row.get("variant"):
            assert row["of_level"] in calibrated and row["level"] == f"{row['of_level']} {row['variant']}"
            assert (
                row["kld_mean"] > 0
                and np.isfinite(row["ppl"])
                and row["size_bytes"] == Path(row["path"]).stat().st_size
            )
    assert r.data["options"]["optimize"]["levels"] == calibrated
    imx = r.data["options"]["optimize"]["imatrix"]
    assert imx["computed"] and imx["chunks"] == OPT["calib_chunks"]
    assert r.data["options"]["optimize"]["excluded"] == []  # a full-precision base: no grid to recover
    # the progress runs over every step, the calibrated ones included, and ends at the last
    assert events[-1].index == events[-1].n_steps - 1 == len(LEVELS) + 1 + 2 * len(calibrated)
    assert events[-1].fraction == 1.0


def test_imatrix_rows_are_llama_quantize_imatrix_bytes(opt_report, synthetic_f32):
    from ggufkit.report.records import tensor_sha256
    from tests.helpers.llama_programs import reference_quantized

    r, _, _ = opt_report
    imx = r.data["options"]["optimize"]["imatrix"]["path"]
    # why Q8_0 has no calibrated rows: llama-quantize's Q8_0 tensors are the same with the imatrix or without
    with_imx = reference_quantized(synthetic_f32, "Q8_0", imatrix=imx)
    assert tensor_sha256(with_imx) == tensor_sha256(reference_quantized(synthetic_f32, "Q8_0"))
    for lv in ("Q4_K_M", "Q2_K"):
        row = _rows(r)[f"{lv} imatrix"]
        ref = reference_quantized(synthetic_f32, lv, imatrix=imx)
        assert row["file_sha256"] == sha256_file(ref), lv
        assert row["file_sha256"] != _rows(r)[lv]["file_sha256"]  # the imatrix changed the bytes


def test_opt_files_are_no_larger_than_llama_quantize(opt_report, synthetic_f32):
    from tests.helpers.llama_programs import reference_quantized

    r, _, _ = opt_report
    for lv in ("Q4_K_M", "Q2_K"):
        opt, plain, imx = (_rows(r)[n] for n in (f"{lv} opt", lv, f"{lv} imatrix"))
        ref = reference_quantized(synthetic_f32, lv)
        assert opt["size_bytes"] <= ref.stat().st_size == plain["size_bytes"], lv
        assert opt["size_bytes"] <= imx["size_bytes"]
        with open_gguf(opt["path"]) as g:
            data = sum(pad(t.nbytes) for t in g.tensors)
        assert data <= opt["budget_bytes"] == opt["reference_bytes"]
        assert opt["file_sha256"] not in (plain["file_sha256"], imx["file_sha256"])


def test_opt_files_use_only_types_ggml_accepts(opt_report, synthetic_f32):
    r, _, _ = opt_report
    with open_gguf(synthetic_f32) as g:
        shapes = {t.name: tuple(t.shape) for t in g.tensors}
    for lv in ("Q4_K_M", "Q2_K"):
        row = _rows(r)[f"{lv} opt"]
        with open_gguf(row["path"]) as g:
            assert {t.name: tuple(t.shape) for t in g.tensors} == shapes
            used = [t.ggml_type.name for t in g.tensors]
            for t in g.tensors:
                assert t.ggml_type.name in FORMATS and t.shape[0] % FORMATS[t.ggml_type.name].block_size == 0
        assert row["types"] == dict(Counter(used))


def test_calibrated_files_run_in_llama_cpp(opt_report):
    import llama_cpp

    r, _, _ = opt_report
    for row in r.levels:
        if not row.get("variant"):
            continue
        llm = llama_cpp.Llama(model_path=row["path"], n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval(list(range(1, 33)))
        logits = np.array(llm.scores[:32], dtype=np.float32)
        llm.close()
        assert np.isfinite(logits).all() and logits.std() > 0, row["level"]


def test_table_json_and_plot_hold_the_rows(opt_report):
    from ggufkit.report.render import size_quality_figure

    r, _, _ = opt_report
    data = json.loads((r.out_dir / "report.json").read_text())
    assert [row["level"] for row in data["levels"]] == [row["level"] for row in r.levels]
    md = (r.out_dir / "report.md").read_text()
    html = (r.out_dir / "report.html").read_text()
    table = rep.format_table(data)
    for name in ("Q4_K_M imatrix", "Q4_K_M opt", "Q2_K imatrix", "Q2_K opt"):
        assert f"| {name} " in table and f"| {name} " in md and f"<td>{name}</td>" in html
    assert any("'LEVEL opt'" in n for n in data["notes"])
    fig = size_quality_figure(data)
    for ax, key in zip(fig.axes, ("kld_mean", "same_top")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) >= {"llama.cpp levels", "llama.cpp + imatrix", "ggufkit optimized"}
        markers = {
            lines[k].get_marker() for k in ("llama.cpp levels", "llama.cpp + imatrix", "ggufkit optimized")
        }
        assert len(markers) == 3
        for label, variant in (("llama.cpp + imatrix", "imatrix"), ("ggufkit optimized", "opt")):
            rows = sorted(
                (x for x in data["levels"] if x.get("variant") == variant), key=lambda x: x["size_bytes"]
            )
            assert list(lines[label].get_xdata()) == pytest.approx(
                [x["size_bytes"] / (1 << 20) for x in rows]
            )
            assert list(lines[label].get_ydata()) == pytest.approx([x[key] for x in rows])
        assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == [
            "llama.cpp levels",
            "llama.cpp + imatrix",
            "ggufkit optimized",
        ]
    # without calibrated rows the plot has no legend, as before
    plain = dict(data, levels=[x for x in data["levels"] if not x.get("variant")])
    assert all(ax.get_legend() is None for ax in size_quality_figure(plain).axes)


def test_pick_ignores_the_calibrated_rows(opt_report, synthetic_f32):
    from ggufkit import memory, recommend

    r, _, _ = opt_report
    info = memory.load_source(synthetic_f32)
    p = recommend.pick(info, ram_bytes=8 << 30, task="chat", report=r.data)
    assert p.measured is not None and not p.measured.get("variant") and p.measured["level"] == p.level
    # a report whose only row for the picked level is a calibrated one quotes no measurement for it
    only = dict(r.data, levels=[dict(x, level=p.level) for x in r.levels if x.get("variant")])
    assert recommend.pick(info, ram_bytes=8 << 30, task="chat", report=only).measured is None


def test_rerun_reuses_and_optimize_code_change_remakes(
    opt_report, synthetic_f32, tmp_path, cache_root, monkeypatch
):
    from ggufkit.report import optimized

    r, work, _ = opt_report
    with own_cache(cache_root):
        again = rep.run_report(synthetic_f32, levels=LEVELS, out=tmp_path / "a", work=work, **OPTIONS, **OPT)
    for row in again.levels[1:]:
        assert not row["quantized_now"] and not row["measured_now"], row["level"]
    real = optimized.code_fingerprint
    monkeypatch.setattr(
        optimized,
        "code_fingerprint",
        lambda parts: real(parts) + ("-edited" if parts == optimized.OPT_CODE else ""),
    )
    with own_cache(cache_root):
        edited = rep.run_report(synthetic_f32, levels=LEVELS, out=tmp_path / "b", work=work, **OPTIONS, **OPT)
    for row in edited.levels[1:]:
        # the opt files are made again; the llama.cpp files depend on the quantizer's code and the imatrix's
        # bytes (computed again, the same bytes) only
        assert row["quantized_now"] == (row.get("variant") == "opt"), row["level"]
        assert row["file_sha256"] == _rows(r)[row["level"]]["file_sha256"]  # deterministic


def test_given_imatrix_file_makes_the_same_files(opt_report, synthetic_f32, tmp_path, cache_root):
    r, work, _ = opt_report
    given = tmp_path / "given.imatrix.gguf"
    given.write_bytes(Path(r.data["options"]["optimize"]["imatrix"]["path"]).read_bytes())
    with own_cache(cache_root):
        g = rep.run_report(
            synthetic_f32, levels=["Q2_K"], out=tmp_path / "o", work=work, **OPTIONS,
            optimize=True, imatrix=given, weighting="none",
        )  # fmt: skip
    assert g.data["options"]["optimize"]["imatrix"]["computed"] is False
    assert _rows(g)["Q2_K opt"]["tensor_sha256"] == _rows(r)["Q2_K opt"]["tensor_sha256"]
    assert _rows(g)["Q2_K imatrix"]["tensor_sha256"] == _rows(r)["Q2_K imatrix"]["tensor_sha256"]


def test_without_optimize_the_report_is_unchanged(opt_report, synthetic_f32, tmp_path, cache_root):
    r, work, _ = opt_report
    with own_cache(cache_root):
        plain = rep.run_report(synthetic_f32, levels=LEVELS, out=tmp_path, work=work, **OPTIONS)
    assert [row["level"] for row in plain.levels] == ["F32", *LEVELS]
    assert "optimize" not in plain.data["options"]
    assert not any("LEVEL opt" in n for n in plain.data["notes"])
    for row in plain.levels[1:]:
        assert not row["quantized_now"] and not row["measured_now"]  # the same cache as the --optimize run
        assert row["kld_mean"] == _rows(r)[row["level"]]["kld_mean"]


def test_grid_types_are_left_out_for_a_dequantized_base(synthetic_f32, tmp_path):
    """A model stored as Q4_1: its dequantized base sits on the Q4_1 grid, which Q4_1 itself and Q5_1 (same
    d and m, a wider range of q) contain. Those two re-encode it exactly and are left out of the opt file."""
    from ggufkit.quantize.job import quantize_file

    q41 = tmp_path / "synthetic-Q4_1.gguf"
    quantize_file(synthetic_f32, q41, "Q4_1", pure=True, threads=2)
    with own_cache(fresh_cache(tmp_path / "cache")):
        r = rep.run_report(
            q41, levels=["Q4_K_M"], out=tmp_path / "out", work=tmp_path / "work", **OPTIONS, **OPT
        )
    o = r.data["options"]["optimize"]
    assert r.data["base"]["dequantized_from"] == "Q4_1"
    for q in ("Q4_1", "Q5_1"):
        assert o["grid"][q] == {"exact": 1.0, "error_ratio": 0.0}
    assert o["excluded"] == ["Q4_1", "Q5_1"]
    assert all(g["exact"] < 0.5 for q, g in o["grid"].items() if q not in o["excluded"])
    # a symmetric format (no min) cannot hold Q4_1's blocks: moving the weights off the grid barely matters
    assert 0.5 < o["grid"]["Q4_0"]["error_ratio"] < 1.5
    with open_gguf(_rows(r)["Q4_K_M opt"]["path"]) as g:
        assert not {t.ggml_type.name for t in g.tensors} & {"Q4_1", "Q5_1"}
    assert any("Q4_1 and Q5_1 out" in n for n in r.data["notes"])


def test_opt_code_covers_the_optimize_job_modules(synthetic_f32, tmp_path):
    """Every module an optimize run imports (calibrating on text, measuring, the perturbation engine) is
    under OPT_CODE, so editing any of them remakes the cached opt files."""
    from ggufkit.report.optimized import OPT_CODE

    text = tmp_path / "calib.txt"
    from ggufkit.evaluation import calibration_text

    text.write_text(calibration_text()[:20000], encoding="utf-8")
    script = (
        "from ggufkit.optimize.job import optimize_file\n"
        "from ggufkit.optimize import sensitivity\n"
        "from ggufkit.gguf.reader import open_gguf\n"
        f"optimize_file({str(synthetic_f32)!r}, {str(tmp_path / 'o.gguf')!r}, 'Q4_K_M', calib={str(text)!r}, "
        "ctx=64, chunks=2, threads=2, weighting='none')\n"
        f"with open_gguf({str(synthetic_f32)!r}) as g:\n"
        f"    sensitivity.perturbed_klds(g, open({str(text)!r}).read(), [])\n"
    )
    must = (
        "ggufkit.optimize.job",
        "ggufkit.optimize.sensitivity",
        "ggufkit.calibrate.run",
        "ggufkit.engine.llama",
    )
    assert _modules_outside(script, OPT_CODE, must) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(imatrix="x.gguf"), "add optimize"),
        (dict(calib_chunks=4), "add optimize"),
        (dict(optimize=True, weighting="best"), "unknown weighting"),
        (dict(optimize=True, calib_chunks=0), "at least 1"),
        (dict(optimize=True, imatrix="/nonexistent/x.gguf"), "no such imatrix"),
    ],
)
def test_bad_options(kwargs, match, synthetic_f32, tmp_path):
    with pytest.raises(rep.ReportError, match=match):
        rep.run_report(synthetic_f32, levels=["Q4_K_M"], out=tmp_path, work=tmp_path / "w", **kwargs)
    assert not (tmp_path / "w").exists()  # refused before any work


def test_cli_bad_weighting_is_one_line(synthetic_f32, tmp_path, capsys):
    from ggufkit.cli import main

    assert (
        main(["report", str(synthetic_f32), "--optimize", "--weighting", "best", "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown weighting" in err[0]
