"""The CLI verbs end to end on tiny local models: train, eval, generate, merge, inspect (typer CliRunner)."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
import typer
from typer.testing import CliRunner

from deltaw.cli import inspect_cmd, train as train_cli


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    train_cli.register(app)
    inspect_cmd.register(app)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory, app):
    """A tiny model folder, toy data, and one adapter trained through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = tiny_models.save_tiny_llama(root / "tiny")
    data = tiny_models.write_text_jsonl(root / "texts.jsonl", 40)
    out = root / "run"
    result = CliRunner().invoke(app, ["train", "-o", str(out), "--model", str(model_dir), "--data", str(data),
                                      "--steps", "8", "--lr", "1e-2", "--seq-len", "48", "--no-progress",
                                      "--checkpoint-every", "4"])
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model_dir, "data": data, "out": out, "train_output": result.output}


def invoke(app, args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_reports_and_refuses_to_clobber(app, world):
    assert f"adapter: {world['out']}" in world["train_output"]
    assert (world["out"] / "checkpoints" / "step-000004").is_dir()
    again = invoke(app, ["train", "-o", world["out"], "--model", world["model"], "--data", world["data"], "--steps", "2",
                         "--no-progress"])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = invoke(app, ["train", "-o", world["root"] / "bad", "--model", world["model"], "--data", world["data"],
                       "--targets", "nope", "--no-progress"])
    assert bad.exit_code == 2 and "matched no supported module" in bad.output and "q_proj" in bad.output
    assert not (world["root"] / "bad").exists()


def test_eval_compares_base_adapter_and_merged(app, world):
    result = invoke(app, ["eval", "-a", world["out"], "--data", world["data"], "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert set(rows) == {"base", "run", "merged"}
    assert rows["run"]["perplexity"] < rows["base"]["perplexity"]
    assert rows["merged"]["perplexity"] == pytest.approx(rows["run"]["perplexity"], rel=1e-5)
    table = invoke(app, ["eval", "-a", world["out"], "--data", world["data"]])
    assert "| variant" in table.output and "| merged" in table.output


def test_generate_with_adapter(app, world):
    result = invoke(app, ["generate", "the cat", "-a", world["out"], "--max-new-tokens", "5", "--compare-base"])
    assert result.exit_code == 0, result.output
    assert "--- base" in result.output and "--- run" in result.output


def test_merge_writes_a_plain_transformers_model(app, world):
    from transformers import AutoModelForCausalLM

    import deltaw

    out = world["root"] / "merged"
    result = invoke(app, ["merge", "-a", world["out"], "-o", out])
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model, tok = tiny_models.tiny_llama(0)
    deltaw.load(model, world["out"])
    ids = tok(["a red dog ran to its bed."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
    assert invoke(app, ["merge", "-a", world["out"], "-o", out]).exit_code == 2  # exists
    assert invoke(app, ["merge", "-a", world["out"], "-o", out, "--overwrite"]).exit_code == 0


def test_inspect_and_base_fit(app, world):
    result = invoke(app, ["inspect", world["out"], "--base", world["model"]])
    assert result.exit_code == 0, result.output
    for text in ("r=8", "targets:", "fingerprint:", "parameters:", "fits", ": yes"):
        assert text in result.output
    other = tiny_models.save_tiny_llama(world["root"] / "other", seed=1)
    mismatch = invoke(app, ["inspect", world["out"], "--base", other, "--json"])
    assert mismatch.exit_code == 1
    info = json.loads(mismatch.stdout)
    assert info["fits_base"] is False and "another base model" in info["fits_reason"]
    assert info["params"] == sum(int(v) for v in [info["lora_params"], info["saved_params"]])


def test_resume_via_cli(app, world, tmp_path):
    args = ["train", "-o", tmp_path / "r", "--model", world["model"], "--data", world["data"], "--steps", "4",
            "--seq-len", "32", "--checkpoint-every", "2", "--no-progress"]
    assert invoke(app, args).exit_code == 0
    resumed = invoke(app, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output and "steps: 4/4" in resumed.output
    changed = invoke(app, args[:-1] + ["--r", "4", "--resume"])
    assert changed.exit_code == 2 and "another configuration" in changed.output


def test_classification_via_cli(app, tmp_path):
    model_dir = tiny_models.save_tiny_bert(tmp_path / "bert")
    data = tiny_models.write_labeled_jsonl(tmp_path / "labeled.jsonl", 40)
    result = invoke(app, ["train", "-o", tmp_path / "cls", "--task", "classification", "--model", model_dir,
                          "--data", data, "--steps", "20", "--lr", "1e-2", "--batch-size", "8", "--seq-len", "32",
                          "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    ev = invoke(app, ["eval", "-a", tmp_path / "cls", "--data", data, "--json"])
    assert ev.exit_code == 0, ev.output
    rows = json.loads(ev.stdout)
    assert rows["cls"]["accuracy"] >= 0.9 and rows["merged"]["accuracy"] == rows["cls"]["accuracy"]
