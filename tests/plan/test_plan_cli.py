"""``deltaw plan`` through typer's CliRunner, on an app built here with the module's ``register``."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
import typer
from typer.testing import CliRunner

from deltaw.cli.plan import register


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    # A Typer app with a single command runs that command directly, without its name; the main deltaw app has
    # several commands, so give this one a callback to make it a group and call "plan" by name as users do.
    @app.callback()
    def _group() -> None:
        pass

    register(app)
    return app


runner = CliRunner()


@pytest.fixture(autouse=True)
def _rule_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the command, not the parser: without the learned parser registered, ``get_parser``
    returns the rule parser, so a clean machine never trains the parser adapter here (test_llm_parser.py covers
    the learned parser on a tiny model)."""
    from deltaw.plan import PARSERS

    monkeypatch.delitem(PARSERS, "llm", raising=False)


def test_issue_command(app: typer.Typer, tmp_path) -> None:
    out = tmp_path / "team"
    result = runner.invoke(
        app,
        [
            "plan",
            "a female basketball team of five players",
            "--mix",
            "skin_tone=light:1,medium:1,dark:1",
            "--seed",
            "7",
            "--out",
            str(out),
            "--no-llm",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["entities"]) == 5
    assert sorted(Counter(e["attributes"]["skin_tone"] for e in plan["entities"]).values()) == [1, 2, 2]
    for entity in plan["entities"]:
        assert set(entity) == {"noun", "attributes", "prompt", "box"}
    assert {"background", "negative"} <= set(plan)
    gligen = json.loads((out / "gligen.json").read_text())
    assert gligen["gligen_phrases"] == [e["prompt"] for e in plan["entities"]]
    lmd = json.loads((out / "lmd.json").read_text())
    assert len(lmd["objects"]) == 5 and lmd["canvas"] == [512, 512]
    assert (out / "lmd.txt").read_text().startswith("Caption: ")
    assert (out / "layout.png").stat().st_size > 1000
    assert "a female basketball player with" in result.output
    # same seed, same plan
    again = runner.invoke(
        app,
        [
            "plan",
            "a female basketball team of five players",
            "--mix",
            "skin_tone=light:1,medium:1,dark:1",
            "--seed",
            "7",
            "--out",
            str(tmp_path / "b"),
            "--no-png",
        ],
    )
    assert again.exit_code == 0
    assert json.loads((tmp_path / "b" / "plan.json").read_text()) == plan


def test_several_mix_options_joint_and_axes(app: typer.Typer, tmp_path) -> None:
    axes = tmp_path / "axes.json"
    axes.write_text(
        json.dumps(
            {"axes": {"jersey": {"position": "after", "values": {"red": "a red jersey", "blue": "a blue jersey"}}}}
        )
    )
    result = runner.invoke(
        app,
        [
            "plan",
            "twelve players on a court",
            "-m",
            "skin_tone=light,dark",
            "-m",
            "jersey=red,blue",
            "--joint",
            "--axes",
            str(axes),
            "--out",
            str(tmp_path / "o"),
            "--no-png",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["mode"] == "joint"
    cells = Counter((e["attributes"]["skin_tone"], e["attributes"]["jersey"]) for e in plan["entities"])
    assert set(cells.values()) == {3}


def test_joint_table_option(app: typer.Typer, tmp_path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("skin_tone,age,weight\nlight,senior,1\ndark,young_adult,1\n")
    result = runner.invoke(
        app, ["plan", "four nurses", "--joint-table", str(table), "--out", str(tmp_path / "o"), "--no-png"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert {(e["attributes"]["skin_tone"], e["attributes"]["age"]) for e in plan["entities"]} == {
        ("light", "senior"),
        ("dark", "young_adult"),
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["zero nurses"], "count 0 is out of range"),
        (["seventy nurses"], "count 70 is out of range"),
        (["three nurses", "--mix", "skin_tone=light:-1"], "negative"),
        (["three nurses", "--mix", "skin_tone=light:0,dark:0"], "sum to 0"),
        (["three nurses", "--mix", "eye_color=blue:1"], "unknown axis 'eye_color'"),
        (["three nurses", "--mix", "skin_tone=green:1"], "unknown value 'green'"),
        (["beautiful sunset over the sea"], "no countable entity"),
        (["three nurses", "--joint"], "joint quotas need axes"),
    ],
)
def test_bad_input_exits_2_with_message(app: typer.Typer, tmp_path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["plan", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "plan.json").exists()


def test_render_without_diffusers_is_a_clear_error(app: typer.Typer, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without diffusers looks like
    result = runner.invoke(app, ["plan", "three nurses", "--render", "--out", str(tmp_path / "o"), "--no-png"])
    assert result.exit_code == 2
    assert "--render needs diffusers" in result.output
    assert (tmp_path / "o" / "plan.json").exists()  # the plan is still written, to render elsewhere


def test_render_refuses_more_boxes_than_gligen_takes(app: typer.Typer, tmp_path) -> None:
    result = runner.invoke(app, ["plan", "31 nurses", "--render", "--out", str(tmp_path / "o"), "--no-png"])
    assert result.exit_code == 2
    assert "at most 30 boxes" in result.output
    assert (tmp_path / "o" / "lmd.json").exists()  # LMD's layout has no such limit


def test_bad_paths_exit_2_without_traceback(app: typer.Typer, tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    cases = [
        (["--out", str(afile)], "not a directory"),
        (["--out", str(tmp_path / "o"), "--joint-table", str(folder)], "not a file"),
        (["--out", str(tmp_path / "o"), "--axes", str(folder)], "is a directory"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["plan", "three nurses", "--no-png", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert not isinstance(result.exception, OSError)


def test_unwritable_out_is_a_clean_error(app: typer.Typer, tmp_path, monkeypatch) -> None:
    from deltaw.plan.planner import ScenePlan

    def denied(self, out_dir, *, layout_png=True):
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr(ScenePlan, "write", denied)
    result = runner.invoke(app, ["plan", "three nurses", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Permission denied" in result.output
