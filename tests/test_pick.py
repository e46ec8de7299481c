"""ggufkit.recommend (`ggufkit pick`): the decision rules over ggufkit.memory's estimates (which
test_memory.py checks against llama.cpp's measured peak memory), report lookup, and the command."""

from __future__ import annotations

import json

import pytest

from ggufkit import memory
from ggufkit import recommend as pick
from ggufkit.cli import main as cli_main

GIB = 1 << 30


@pytest.fixture(scope="module")
def llama8b():
    return memory.load_source("8B")


def needed(model, level, n_ctx=4096, **kw):
    return memory.estimate(model, n_ctx=n_ctx, level=level, **kw).needed_bytes


def test_headroom_thresholds(llama8b):
    q8, q5, q4 = (needed(llama8b, lv) for lv in ("Q8_0", "Q5_K_M", "Q4_K_M"))
    assert pick.pick(llama8b, ram_bytes=2 * q8, task="chat").level == "Q8_0"  # exactly 50% spare
    assert pick.pick(llama8b, ram_bytes=2 * q8 - 4096, task="chat").level == "Q5_K_M"
    assert pick.pick(llama8b, ram_bytes=int(q5 / 0.75) + 1, task="chat").level == "Q5_K_M"
    assert pick.pick(llama8b, ram_bytes=int(q5 / 0.75) - 4096, task="chat").level == "Q4_K_M"
    tight = pick.pick(llama8b, ram_bytes=q4, task="chat")
    assert tight.level == "Q4_K_M" and "tight" in tight.reason
    assert pick.pick(llama8b, ram_bytes=q4 - 1, task="chat").level is None


def test_task_floors(llama8b):
    q5, q4, q3 = (needed(llama8b, lv) for lv in ("Q5_K_M", "Q4_K_M", "Q3_K_M"))
    # headroom alone would say Q4_K_M; code and creative are raised to Q5_K_M when it fits
    for task in ("code", "creative"):
        p = pick.pick(llama8b, ram_bytes=q5 + GIB // 10, task=task)
        assert p.level == "Q5_K_M" and f"{task} needs >= Q5_K_M" in p.reason
        below = pick.pick(llama8b, ram_bytes=q4 + GIB // 10, task=task)
        assert below.level is None and any("below the Q5_K_M floor" in t for t in below.suggestions)
    # classify and extract may go to Q3_K_M when Q4_K_M does not fit; generation never does
    for task in ("classify", "extract"):
        assert pick.pick(llama8b, ram_bytes=q3, task=task).level == "Q3_K_M"
    for task in ("chat", "summarize", "code", "creative"):
        assert pick.pick(llama8b, ram_bytes=q3, task=task).level is None


def test_nothing_below_q4_for_generation_across_budgets(llama8b):
    for ram in range(2 * GIB, 24 * GIB, GIB // 2):
        for task in sorted(pick.GENERATION):
            p = pick.pick(llama8b, ram_bytes=ram, task=task, n_ctx=8192)
            assert p.level in (None, "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
            if p.level:
                assert p.estimate.needed_bytes <= ram
                assert pick.LADDER.index(p.level) <= pick.LADDER.index(pick.FLOORS[task])


def test_nothing_fits_suggestions_are_true(llama8b):
    ram = 6 * GIB
    p = pick.pick(llama8b, ram_bytes=ram, task="chat", n_ctx=32768)
    assert p.level is None and p.reason.startswith("nothing fits")
    shorter = next(t for t in p.suggestions if "shorter context" in t)
    ctx = int(shorter.split("n_ctx ")[1].split()[0])
    assert needed(llama8b, "Q4_K_M", ctx) <= ram < needed(llama8b, "Q4_K_M", ctx + 256)
    kv = next(t for t in p.suggestions if "KV cache fits" in t)
    kv_type = kv.split("a ")[1].split()[0]
    assert needed(llama8b, "Q4_K_M", 32768, kv_type=kv_type) <= ram
    smaller = next(t for t in p.suggestions if "smaller model" in t)
    billions = float(smaller.split("about ")[1].split("B")[0])
    assert 0 < billions < llama8b.n_params / 1e9


def _report(levels: dict) -> dict:
    return {"model_sha256": "0" * 64, "levels": [{"level": lv, **row} for lv, row in levels.items()]}


def test_measured_quality_is_quoted_and_can_raise_the_level(llama8b):
    q5 = needed(llama8b, "Q5_K_M")
    ram = int(q5 / 0.75) - 4096  # headroom: Q4_K_M, and Q5_K_M still fits
    report = _report(
        {
            "Q4_K_M": {"ppl": 9.1, "kld_mean": 0.09, "same_top": 91.0},
            "Q5_K_M": {"ppl": 8.9, "kld_mean": 0.04, "same_top": 95.0},
            "Q8_0": {"ppl": 8.8, "kld_mean": 0.002, "same_top": 99.0},
        }
    )
    p = pick.pick(llama8b, ram_bytes=ram, task="chat", report=report)
    assert p.level == "Q5_K_M" and "KLD" in p.reason and "0.0900" in p.reason
    assert p.measured["kld_mean"] == 0.04
    good = _report({"Q4_K_M": {"ppl": 9.0, "kld_mean": 0.03, "same_top": 95.0}})
    p = pick.pick(llama8b, ram_bytes=ram, task="chat", report=good)
    assert p.level == "Q4_K_M" and "measured: PPL 9.000, KLD 0.0300, same top token 95.0%" in p.reason
    # a higher level that does not fit is never picked for its quality
    p = pick.pick(llama8b, ram_bytes=needed(llama8b, "Q4_K_M"), task="chat", report=report)
    assert p.level == "Q4_K_M"


def test_find_report_by_model_sha256(tmp_path, monkeypatch, smollm2_path):
    from ggufkit.cache import sha256_file

    monkeypatch.setenv("GGUFKIT_CACHE", str(tmp_path))
    assert pick.find_report(smollm2_path) is None
    other = tmp_path / "reports" / "other"
    other.mkdir(parents=True)
    (other / "report.json").write_text(json.dumps(_report({"Q8_0": {"kld_mean": 0.5}})))
    assert pick.find_report(smollm2_path) is None
    mine = tmp_path / "reports" / "smollm2"
    mine.mkdir()
    report = _report({"Q8_0": {"ppl": 20.5, "kld_mean": 0.001, "same_top": 99.0}})
    report["model_sha256"] = sha256_file(smollm2_path)
    (mine / "report.json").write_text(json.dumps(report))
    assert pick.find_report(smollm2_path)["levels"][0]["ppl"] == 20.5
    # the command finds it too, and quotes it
    assert cli_main(["pick", str(smollm2_path), "--ram", "4G", "--json"]) == 0


def test_cli_pick_json_and_report_path(tmp_path, smollm2_path, capsys, monkeypatch):
    monkeypatch.setenv("GGUFKIT_CACHE", str(tmp_path / "empty"))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(
        json.dumps(_report({"Q8_0": {"ppl": 20.0, "kld_mean": 0.001}}))
    )
    assert (
        cli_main(["pick", str(smollm2_path), "--ram", "4G", "--report", str(tmp_path / "r"), "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["level"] == "Q8_0" and out["measured"]["ppl"] == 20.0 and out["needed_bytes"] < 4 * GIB
    assert cli_main(["pick", "8B", "--ram", "auto", "--json"]) in (0, 1)
    out = json.loads(capsys.readouterr().out)
    assert out["ram_bytes"] == pytest.approx(memory.available_memory(), rel=0.2)
    assert cli_main(["pick", "70B", "--ram", "8G", "--task", "code"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("nothing fits") and "smaller model" in text


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["pick", "7B", "--ram", "lots"], "lots"),
        (["pick", "7Q"], "unknown model"),
        (["pick", "7B", "--ram", "8G", "--report", "/nonexistent/report.json"], "no such report"),
    ],
)
def test_cli_pick_bad_input_exits_2(argv, expect, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err
