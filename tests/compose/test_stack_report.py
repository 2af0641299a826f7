"""The stacking report on a tiny random Llama with three tiny adapters (seconds, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from compose_helpers import TOPIC_WORDS, tiny_lm_dir, topic_texts, train_topic_adapter
from typer.testing import CliRunner

import deltaw
from deltaw.compose.stack_report import StackSettings, run_stack_report, stack_sets, token_blocks

TOPICS = list(TOPIC_WORDS)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    model, tok = tiny_lm_dir(root / "model")
    dirs = {}
    for i, topic in enumerate(TOPICS):
        train_topic_adapter(model, tok, topic, seed=i)
        dirs[topic] = deltaw.save(model, root / topic, topic)
    texts = {t: topic_texts(t, 6, 99) for t in TOPICS}  # held out: another seed
    (root / "eval.json").write_text(json.dumps(texts))
    return root, model, tok, dirs, texts


def test_stack_sets_all_or_sampled():
    names = ["a", "b", "c", "d", "e"]
    assert stack_sets(names, "a", 4, 1, 0) == [("b", "c", "d", "e")]
    assert len(stack_sets(names, "a", 2, 100, 0)) == 6  # every combination when they fit
    draw = stack_sets(names, "a", 2, 2, 0)
    assert len(draw) == 2 and draw == stack_sets(names, "a", 2, 2, 0) and all("a" not in s for s in draw)


def test_run_stack_report_numbers(tiny_setup):
    _, model, tok, _, texts = tiny_setup
    blocks = {t: token_blocks(tok, texts[t], 32, 2) for t in TOPICS}
    before = deltaw.active(model)
    report = run_stack_report(model, TOPICS, blocks, StackSettings(samples=5))
    assert deltaw.active(model) == before and "_stack_report_tmp" not in deltaw.adapters(model)
    assert set(report.curves) == {"live_sum", "live_mean", "linear", "svd", "ties", "dare"}
    for t in TOPICS:
        assert report.own[t] < report.base[t]  # the tiny adapters did learn their topic
        for m, per in report.curves.items():
            assert len(per[t]) == 3
        for m in ("live_sum", "live_mean", "linear", "svd"):
            assert report.curves[m][t][0] == report.own[t]
        # merged linear is the live stack (same function): perplexities agree to float round-off
        for a, b in zip(report.curves["linear"][t], report.curves["live_sum"][t]):
            assert a == pytest.approx(b, rel=1e-4)
    # k=1 with samples=5 averages both possible partners
    assert len([m for m in report.measurements if m.topic == "alpha" and m.k == 1 and m.method == "ties"]) == 2
    ov = report.overlap
    assert len(ov["cos2"]) == 3 and all(abs(ov["cos2"][i][i] - 1) < 1e-6 for i in range(3))
    assert all(0 <= v <= 1 + 1e-9 for row in ov["cos2"] for v in row)
    assert "Criterion" in report.finding


def test_stack_report_cli(tiny_setup, tmp_path):
    from deltaw.cli.main import app

    root, _, _, dirs, _ = tiny_setup
    args = ["stack-report", "--out", str(tmp_path / "rep"), "--quick", "--model", str(root / "model"),
            "--eval-texts", str(root / "eval.json"), "--block-tokens", "32",
            "--adapters", *[f"{t}={d}" for t, d in dirs.items()]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["topics"] == TOPICS
    assert set(data["base"]) == set(TOPICS)
    assert set(data["curves"]) == {"live_sum", "live_mean", "linear", "svd", "ties", "dare"}
    assert all(len(v) == 3 for per in data["curves"].values() for v in per.values())
    assert "cos2" in data["overlap"] and data["finding"]
    for f in ("report.md", "stacking.png", "overlap.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    assert "Criterion" in (tmp_path / "rep" / "report.md").read_text()


def test_compose_cli(tiny_setup, tmp_path):
    from deltaw.cli.main import app

    root, model, _, dirs, _ = tiny_setup
    out = tmp_path / "ab"
    result = CliRunner().invoke(app, ["compose", f"{dirs['alpha']}:1.0", f"{dirs['beta']}:-0.5", "--method", "svd",
                                      "--rank", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "energy kept" in result.output
    deltaw.load(model, out, "ab_cli", activate=False)
    try:
        x = torch.randint(0, 50, (1, 12))
        rep = deltaw.compose.compose(model, {"alpha": 1.0, "beta": -0.5}, "svd", name="ab_mem", rank=2)
        with torch.no_grad(), deltaw.using(model, "ab_cli"):
            y1 = model(x).logits
        with torch.no_grad(), deltaw.using(model, "ab_mem"):
            y2 = model(x).logits
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        assert rep.mean_energy_kept < 1.0
    finally:
        deltaw.delete(model, "ab_cli")
        deltaw.delete(model, "ab_mem")
    bad = CliRunner().invoke(app, ["compose", str(dirs["alpha"]), "--method", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown compose method" in bad.output


def test_parse_source():
    from pathlib import Path

    from deltaw.cli.compose import parse_source

    assert parse_source("runs/a:0.5") == (Path("runs/a"), 0.5)
    assert parse_source("runs/a:-1") == (Path("runs/a"), -1.0)
    assert parse_source("runs/a") == (Path("runs/a"), 1.0)
    assert parse_source("runs/x:y") == (Path("runs/x:y"), 1.0)  # not a number: part of the path
