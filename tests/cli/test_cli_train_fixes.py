"""Review fixes in the train/eval/merge/compose CLI: held-out eval, recorded paths, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models
import typer
from typer.testing import CliRunner

from deltaw.cli import compose as compose_cli, train as train_cli
from deltaw.train.data import load_splits


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    train_cli.register(app)
    compose_cli.register(app)
    return app


def invoke(app: typer.Typer, args: list[object]):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory, app) -> dict:
    """One tiny run trained with *relative* --model / --data paths (from inside its folder)."""
    root = tmp_path_factory.mktemp("fixes")
    tiny_models.save_tiny_llama(root / "tiny")
    tiny_models.write_text_jsonl(root / "texts.jsonl", 40)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        result = invoke(app, ["train", "-o", "run", "--model", "tiny", "--data", "texts.jsonl", "--steps", "2",
                              "--seq-len", "48", "--no-progress"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return {"root": root, "out": root / "run"}


def test_relative_paths_are_recorded_absolute(run: dict) -> None:
    config = json.loads((run["out"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run["root"] / "tiny").resolve())
    from deltaw.train.session import adapter_defaults

    defaults = adapter_defaults(run["out"])
    assert defaults.data == str((run["root"] / "texts.jsonl").resolve())
    assert defaults.model == str((run["root"] / "tiny").resolve())


def test_eval_without_data_scores_the_held_out_part(app, run: dict, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # another cwd: the recorded paths must still resolve
    result = invoke(app, ["eval", "-a", run["out"], "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    held = load_splits(str(run["root"] / "texts.jsonl")).validation
    assert rows["base"]["n_examples"] == len(held) == 4  # not the 40 lines the adapter trained on


def test_output_path_that_is_a_file_is_an_error_not_a_traceback(app, run: dict, tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    merged = invoke(app, ["merge", "-a", run["out"], "-o", afile])
    assert merged.exit_code == 2 and "error:" in merged.output, merged.output
    composed = invoke(app, ["compose", run["out"], run["out"], "-o", afile])
    assert composed.exit_code == 2 and "error:" in composed.output, composed.output


@pytest.mark.parametrize("device", ["bogus", "cuda:999"])
def test_bad_device_is_an_error_not_a_traceback(app, run: dict, tmp_path, device: str) -> None:
    result = invoke(app, ["train", "-o", tmp_path / "o", "--model", run["root"] / "tiny", "--data",
                          run["root"] / "texts.jsonl", "--steps", "1", "--no-progress", "--device", device])
    assert result.exit_code == 2 and "error:" in result.output and device.split(":")[0] in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_balance_objective_refuses_options_it_ignores(app, tmp_path) -> None:
    result = invoke(app, ["train", "-o", tmp_path / "b", "--objective", "balance", "--data", "x.jsonl",
                          "--device", "cpu", "--batch-size", "9", "--no-progress"])
    assert result.exit_code == 2, result.output
    for option in ("--data", "--device", "--batch-size"):
        assert option in result.output
    assert not (tmp_path / "b").exists()


def _fake_train_result(rank: int, tmp_path: Path):
    from types import SimpleNamespace

    return SimpleNamespace(adapter_dir=tmp_path / "o", steps=1, total_steps=1, final_train_loss=1.0,
                           train_seconds=0.1, trainable_params=10, validation=None, stopped_early=False,
                           log_path=tmp_path / "o" / "train_log.jsonl", plot_path=None, rank=rank)


@pytest.mark.parametrize("rank,prints", [(0, True), (1, False)])
def test_train_summary_is_printed_by_rank_0_only(app, tmp_path, monkeypatch, rank: int, prints: bool) -> None:
    """Under torchrun, train() destroys its process group before returning, so the command must take the rank
    from the result: asking torch.distributed afterwards made every rank print the summary."""
    import deltaw.train

    monkeypatch.setattr(deltaw.train, "train", lambda config: _fake_train_result(rank, tmp_path))
    result = invoke(app, ["train", "-o", tmp_path / "o", "--data", "x.jsonl", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert ("adapter:" in result.output) is prints, result.output


def test_train_help_says_balance_refuses_text_data_options(app) -> None:
    """The help said these options were "not used" with --objective balance; they are refused (an error)."""
    text = " ".join(invoke(app, ["train", "--help"]).output.split())
    assert "refused" in text and "not used" not in text
    readme = (Path(__file__).resolve().parents[2] / "deltaw" / "audit" / "README.md").read_text()
    section = " ".join(readme.split("### From `deltaw train`")[1].split("## ")[0].split())
    assert "are refused" in section and "not used" not in section
