"""The balance objective, the side-by-side audit and the CLI, on the tiny random Llama (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from audit_helpers import save_tiny, tiny_pair

import deltaw
from deltaw.audit import AuditConfig, DebiasConfig, ProbeError, load_probe, run_audit, train_debias
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


def test_failed_training_leaves_the_model_as_it_was_and_can_be_retried():
    model, tok = tiny_pair()
    probe = load_probe().subset(3, 1, 2)
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj"]), "other")
    deltaw.activate(model, "other")
    deltaw.set_trainable(model, "other")
    model.train()
    grads = [p.requires_grad for p in model.parameters()]
    boom = replace(FAST, steps=5, lr=1e38, targets="top:1")
    with pytest.raises(FloatingPointError):
        train_debias(model, tok, probe, boom, evaluate=False)
    # Used to leave "debias" attached, active and trainable, in eval mode: a retry raised AdapterNameError.
    assert deltaw.adapters(model) == ["other"]
    assert deltaw.active(model) == (("other", 1.0),)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert model.training
    result = train_debias(model, tok, probe, replace(boom, lr=1e-3, steps=1), evaluate=False)
    assert result.steps == 1 and deltaw.adapters(model) == ["other", "debias"]


def test_training_leaves_the_global_rng_alone():
    model, tok = tiny_pair()
    torch.manual_seed(1234)
    torch.rand(3)
    before = torch.get_rng_state()
    train_debias(model, tok, load_probe().subset(3, 1, 1), replace(FAST, steps=1, targets="top:1"), evaluate=False)
    assert torch.equal(before, torch.get_rng_state())  # was reseeded to config.seed


def test_target_override_is_what_before_and_after_measure():
    from deltaw.audit.debias import _tv_by_cell
    from deltaw.audit.measure import attribute_tokens

    model, tok = tiny_pair()
    probe = load_probe().subset(3, 1, 1)
    result = train_debias(model, tok, probe, replace(FAST, steps=1, targets="top:1"), target={"male": 9, "female": 1})
    goal = probe.with_target({"male": 0.9, "female": 0.1})
    tokens = attribute_tokens(tok, goal)
    fillers, templates = list(probe.fillers["train"]), list(probe.templates["train"])
    # Used to be measured against the probe's 50/50 while training pulled towards 90/10.
    assert result.before == pytest.approx(_tv_by_cell(model, tok, goal, tokens, fillers, templates, base=True))
    assert result.after == pytest.approx(_tv_by_cell(model, tok, goal, tokens, fillers, templates))
    assert deltaw.state(model).adapters["debias"].metadata["target"] == pytest.approx({"male": 0.9, "female": 0.1})
    with pytest.raises(ProbeError, match="finite"):
        train_debias(model, tok, probe, FAST, name="again", target={"male": float("nan"), "female": 1})
    assert deltaw.adapters(model) == ["debias"]


def test_cache_key_hashes_every_weight_byte_and_the_tokenizer():
    from audit_helpers import make_model, make_tokenizer

    from deltaw.audit.cache import cache_key

    a, tok = tiny_pair()
    b, _ = tiny_pair()
    probe, cfg = load_probe(), DebiasConfig()
    args = (probe, cfg, probe.fillers["train"], probe.templates["train"], dict(probe.target))
    assert cache_key(a, *args, tokenizer=tok) == cache_key(b, *args, tokenizer=tok)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.view(-1)[1] += 1.0  # a value the old 32-sample hash never read
    assert cache_key(a, *args, tokenizer=tok) != cache_key(b, *args, tokenizer=tok)
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    assert cache_key(a, *args, tokenizer=tok) != cache_key(a, *args, tokenizer=other)
    # Any dtype: bf16 has no numpy type; a different dtype is a different model.
    half = make_model(len(tok)).to(torch.bfloat16)
    assert model_fingerprint(half) != model_fingerprint(make_model(len(tok)))


def _audit_cli(args):
    from typer.testing import CliRunner

    from deltaw.cli.main import app

    return CliRunner().invoke(app, ["audit", *args])


@pytest.mark.parametrize(("args", "message"), [
    (["--target", '{"male": 1}'], "exactly the values"),
    (["--target", '{"male": -1, "female": 2}'], ">= 0"),
    (["--target", '{"male": NaN, "female": 1}'], "finite"),
    (["--fillers", "HELDOUT,carpentr"], "'carpentr'"),  # a held-out filler and a typo
])
def test_cli_train_debias_validates_target_and_fillers_before_loading(tmp_path, args, message):
    probe = load_probe()
    held = probe.fillers["heldout"][0]
    args = [a.replace("HELDOUT", held) for a in args]
    res = _audit_cli(["train-debias", "--out", str(tmp_path / "fix"), "--model", str(tmp_path / "no_model"),
                      "--threads", "1", *args])
    assert res.exit_code == 2, res.output  # the CLI contract: one error line, exit 2
    assert "error:" in res.output and message in res.output
    if "--fillers" in args:
        assert "held-out" in res.output and held in res.output
    assert not isinstance(res.exception, (KeyError, TypeError))
    assert not (tmp_path / "fix").exists()


def test_cli_audit_options_are_checked(tmp_path, monkeypatch):
    import deltaw.audit

    seen = {}

    def fake_run_audit(out, *, config, **kw):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(deltaw.audit, "run_audit", fake_run_audit)
    res = _audit_cli(["--out", str(tmp_path / "r"), "--steps", "0", "--threads", "1"])
    assert res.exit_code == 2 and "stop here" in res.output
    assert seen["config"].debias.steps == 0  # "--steps 0" used to be dropped as falsy
    for bad in (["--samples", "0"], ["--max-new-tokens", "0"], ["--samples", "-2"], ["--steps", "-1"]):
        res = _audit_cli(["--out", str(tmp_path / "r"), "--mode", "sampled", *bad])
        assert res.exit_code == 2, (bad, res.output)
    afile = tmp_path / "afile"
    afile.write_text("")
    res = _audit_cli(["--out", str(afile), "--threads", "1"])
    assert res.exit_code == 2 and "not a directory" in res.output
    assert not isinstance(res.exception, OSError)
    res = _audit_cli(["train-debias", "--out", str(afile), "--threads", "1"])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_failed_training_on_a_plain_model_takes_the_wrappers_back_out():
    from deltaw.layers import LoraLayer

    model, tok = tiny_pair()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a caller's own flag, kept as it was
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    boom = replace(FAST, steps=3, batch_size=2, lr=1e38, targets="top:1")
    with pytest.raises(FloatingPointError):
        train_debias(model, tok, load_probe().subset(3, 1, 1), boom, evaluate=False)
    # Used to leave the LoRA wrappers in place: keys read ...q_proj.base_layer.weight, so save_pretrained wrote
    # a checkpoint that does not load as the base model.
    assert deltaw.adapters(model) == []
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    sd1 = model.state_dict()
    assert list(sd1) == list(sd0) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    result = train_debias(model, tok, load_probe().subset(3, 1, 1), replace(boom, lr=1e-3, steps=1), evaluate=False)
    assert result.steps == 1 and deltaw.adapters(model) == ["debias"]


@pytest.mark.parametrize("fail", [False, True])
def test_training_restores_every_submodule_mode(fail):
    # Used to save model.training only and restore with model.train(flag): a block the caller keeps in eval
    # came back in train mode (dropout on).
    model, tok = tiny_pair()
    model.train()
    model.model.layers[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}

    def boom(entry):
        if fail and entry["step"] == 2:
            raise RuntimeError("boom")

    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            train_debias(model, tok, load_probe().subset(3, 1, 1), replace(FAST, steps=3, batch_size=2),
                         evaluate=False, callback=boom)
    else:
        train_debias(model, tok, load_probe().subset(3, 1, 1), replace(FAST, steps=2, batch_size=2),
                     evaluate=False)
    after = {n: m.training for n, m in model.named_modules()}
    assert {n: after[n] for n in modes if n in after} == modes
    # new adapter modules follow their parent: off in the eval-mode block, on elsewhere
    for name, flag in after.items():
        if name not in modes:
            assert flag == name.startswith("model.layers.1"), name


def test_eval_mode_restores_every_submodule_mode():
    from deltaw.audit.measure import measure

    model, tok = tiny_pair()
    model.train()
    model.model.layers[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    measure(model, tok, load_probe().subset(3, 1, 1))
    assert {n: m.training for n, m in model.named_modules()} == modes
