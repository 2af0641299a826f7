"""The balance objective, the side-by-side audit and the CLI, on the tiny random Llama (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from audit_helpers import save_tiny, tiny_pair

import deltaw
from deltaw.audit import AuditConfig, DebiasConfig, load_probe, run_audit, train_debias
from deltaw.audit.cache import model_fingerprint
from deltaw.audit.debias import FrozenPrefix, lora_config_for

FAST = DebiasConfig(steps=20, lr=2e-2, batch_size=12, control_batch=4, neutral_batch=2, targets="top:2", r=4)


def _probe():
    return load_probe().subset(6, 2, 3)


def test_debias_loss_decreases_tv_on_training_templates():
    model, tok = tiny_pair()
    probe = _probe()
    result = train_debias(model, tok, probe, FAST)
    assert result.before["train"] > 0.05  # the random model is skewed to begin with
    assert result.after["train"] < 0.5 * result.before["train"]
    assert result.history[-1]["balance"] < result.history[0]["balance"]
    assert deltaw.active(model) == (("debias", 1.0),) and not deltaw.merged(model)
    meta = deltaw.state(model).adapters["debias"].metadata
    assert meta["objective"] == "balance" and meta["train_fillers"] == list(probe.fillers["train"])


def test_frozen_prefix_shortcut_gives_the_same_training():
    probe = _probe()
    cfg = replace(FAST, steps=3, targets="top:1")
    weights = []
    for shortcut in (True, False):
        model, tok = tiny_pair()
        if shortcut:
            deltaw.attach(model, lora_config_for(model, cfg), "probe_only")
            ids = [tok(p.text)["input_ids"] for p in probe.prompts()][:4]
            assert FrozenPrefix.build(model, deltaw.state(model).adapters["probe_only"].modules, ids) is not None
            deltaw.delete(model, "probe_only")
        train_debias(model, tok, probe, replace(cfg, frozen_prefix=shortcut), evaluate=False)
        weights.append([p.detach().clone() for p in deltaw.adapter_parameters(model, "debias")])
    for a, b in zip(*weights):
        assert torch.allclose(a, b, atol=1e-5)


def test_fingerprint_ignores_wrappers():
    model, _ = tiny_pair()
    before = model_fingerprint(model)
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "x")
    assert model_fingerprint(model) == before


def _loader(path):
    from deltaw.models import load_causal_lm
    return load_causal_lm(path)


def test_audit_rows_removed_is_base_and_merged_keeps_the_shift(tmp_path):
    model, tok = tiny_pair()
    config = replace(AuditConfig.quick(), n_fillers=4, n_templates=1, n_neutral=2, ppl_seq_len=16,
                     debias=replace(FAST, steps=6))
    report = run_audit(tmp_path / "out", config=config, model=model, tokenizer=tok, cache_root=tmp_path / "cache",
                       loader=_loader)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(saved["rows"]) == {"base", "adapter", "removed", "merged_reloaded", "stacked"}
    for row in saved["rows"].values():
        assert {"tv_to_target", "heldout_ppl", "controllability"} <= set(row)
    assert saved["removed_equals_base"] is True
    assert all(saved["removed_check"]["checks"].values())
    assert saved["merged_check"]["within_tolerance"] is True
    rows = saved["rows"]
    assert rows["merged_reloaded"]["tv_to_target"] == pytest.approx(rows["adapter"]["tv_to_target"], abs=1e-4)
    assert rows["adapter"]["cells"]["train"]["tv_to_target"] < rows["base"]["cells"]["train"]["tv_to_target"]
    assert rows["removed"]["tv_to_target"] == rows["base"]["tv_to_target"]
    assert rows["base"]["neutral_kl"] == 0.0 and rows["adapter"]["neutral_kl"] > 0.0
    assert len(rows["stacked"]["adapters"]) == 2
    assert (tmp_path / "out" / "report.md").read_text().count("| base |") == 2
    assert (tmp_path / "out" / "skew.png").stat().st_size > 1000
    assert report["training"]["debias"]["cached"] is False
    # Second run: same model and settings -> every adapter comes from the cache.
    model2, tok2 = tiny_pair()
    again = run_audit(tmp_path / "out2", config=config, model=model2, tokenizer=tok2, cache_root=tmp_path / "cache",
                      loader=_loader, plot=False)
    assert all(t["cached"] for t in again["training"].values())
    assert again["rows"]["adapter"]["tv_to_target"] == report["rows"]["adapter"]["tv_to_target"]


def test_cli_audit_with_user_adapter_and_train_debias(tmp_path):
    from typer.testing import CliRunner

    from deltaw.cli.main import app

    folder = save_tiny(tmp_path / "tiny")
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "probes"])
    assert res.exit_code == 0 and "gender_occupation" in res.output
    res = runner.invoke(app, ["audit", "train-debias", "--out", str(tmp_path / "fix"), "--model", str(folder),
                              "--quick", "--targets", "top:1", "--steps", "4", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fix" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "fix" / "debias.json").read_text())["steps"] == 4
    res = runner.invoke(app, ["audit", "--out", str(tmp_path / "rep"), "--model", str(folder), "--adapter",
                              str(tmp_path / "fix"), "--quick", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "removed_equals_base: true" in res.output
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["rows"]["stacked"] is None and saved["notes"]
    res = runner.invoke(app, ["audit"])
    assert res.exit_code == 2


def test_cli_sampled_mode_with_attribute_function(tmp_path):
    from typer.testing import CliRunner

    from deltaw.cli.main import app

    folder = save_tiny(tmp_path / "tiny")
    scorer = tmp_path / "scorer.py"
    scorer.write_text("def gender(text):\n    words = text.lower().split()\n"
                      "    return 'male' if 'he' in words else ('female' if 'she' in words else None)\n")
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "train-debias", "--out", str(tmp_path / "fix"), "--model", str(folder),
                              "--quick", "--targets", "top:1", "--steps", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["audit", "--out", str(tmp_path / "rep"), "--model", str(folder), "--adapter",
                              str(tmp_path / "fix"), "--quick", "--mode", "sampled", "--attribute-fn",
                              f"{scorer}:gender", "--samples", "3", "--max-new-tokens", "3", "--threads", "1"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["rows"]["adapter"]["mode"] == "sampled"
    assert saved["removed_equals_base"] is True


def test_train_command_with_balance_objective(tmp_path):
    """`deltaw train --objective balance` is the debias job: same adapter format, debias.json with before/after."""
    from typer.testing import CliRunner

    from deltaw.cli.main import app

    folder = save_tiny(tmp_path / "tiny")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--objective", "balance", "--model", str(folder), "--output",
                              str(tmp_path / "fix"), "--targets", "top:1", "--steps", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fix" / "adapter_config.json").is_file()
    report = json.loads((tmp_path / "fix" / "debias.json").read_text())
    assert report["steps"] == 3 and set(report["before"]) >= {"train", "heldout"}
    res = runner.invoke(app, ["train", "--objective", "fairness", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown --objective 'fairness'" in res.output
    res = runner.invoke(app, ["train", "--probe", "gender_occupation", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--objective balance" in res.output
    assert not (tmp_path / "x").exists()
