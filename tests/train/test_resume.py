"""--resume continues bit for bit, and refuses checkpoints of another configuration, base model or training data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny_models
import torch

import deltaw
from deltaw.errors import BaseModelMismatchError
from deltaw.train import CheckpointError, TrainConfig, train


class Interrupt(Exception):
    pass


def stop_at(step):
    def callback(info):
        if info.step == step:
            raise Interrupt(f"killed after step {step}")
    return callback


def config(tmp_path, name, data, **overrides):
    # Dropout > 0 so that the RNG state matters; grad accumulation so that the data position matters.
    settings = dict(output_dir=str(tmp_path / name), data=str(data), model="tiny", steps=9, lr=5e-3, dropout=0.1,
                    batch_size=2, grad_accum=2, seq_len=48, checkpoint_every=3, eval_every=3, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def go(cfg, seed=0, callbacks=()):
    model, tok = tiny_models.tiny_llama(seed)
    return train(cfg, model=model, tokenizer=tok, callbacks=callbacks)


def step_losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "step"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, text_file):
    full = go(config(tmp_path, "full", text_file))
    with pytest.raises(Interrupt):
        go(config(tmp_path, "cut", text_file), callbacks=[stop_at(5)])  # dies between checkpoints 3 and 6
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000003"]
    resumed = go(config(tmp_path, "cut", text_file, resume=True))
    assert resumed.resumed_from.name == "step-000003" and resumed.steps == 9
    a = deltaw.read_adapter(full.adapter_dir).factors
    b = deltaw.read_adapter(resumed.adapter_dir).factors
    assert a.keys() == b.keys()
    for module in a:
        assert torch.equal(a[module]["A"], b[module]["A"]) and torch.equal(a[module]["B"], b[module]["B"]), module
    assert step_losses(full.log_path) == step_losses(resumed.log_path)  # the log reads like one run


def test_resume_refuses_another_config(tmp_path, text_file):
    go(config(tmp_path, "run", text_file, steps=4))
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.005, now 0.01"):
        go(config(tmp_path, "run", text_file, steps=4, lr=1e-2, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        go(config(tmp_path, "empty", text_file, resume=True))


def test_resume_refuses_another_base(tmp_path, text_file):
    go(config(tmp_path, "run", text_file, steps=4))
    with pytest.raises(BaseModelMismatchError):
        go(config(tmp_path, "run", text_file, steps=4, resume=True), seed=1)


def test_resume_refuses_changed_training_data(tmp_path, text_file):
    """Resume compared the config (the data *path*) but not the data: a file edited or replaced under the same
    name silently continued the run on other examples. The checkpoint records a sha256 of the file."""
    go(config(tmp_path, "run", text_file, steps=4))  # leaves checkpoints/step-000003
    original = text_file.read_bytes()
    tiny_models.write_text_jsonl(text_file, 40, seed=1)  # same name, other texts
    with pytest.raises(CheckpointError, match=rf"training data {re.escape(str(text_file.resolve()))} changed"):
        go(config(tmp_path, "run", text_file, steps=4, resume=True))
    text_file.write_bytes(original)  # the original data again: resumes
    assert go(config(tmp_path, "run", text_file, steps=4, resume=True)).steps == 4


def test_data_identity_covers_what_the_loader_reads(tmp_path):
    from deltaw.train.data import data_identity

    assert data_identity("bbc:tech") == {"spec": "bbc:tech"}  # the embedded corpus: the spec names it
    folder = tmp_path / "docs"
    (folder / "pos").mkdir(parents=True)
    (folder / "pos" / "a.txt").write_text("good news")
    (folder / "neg").mkdir()
    (folder / "neg" / "b.txt").write_text("bad news")
    before = data_identity(str(folder))
    assert before["path"] == str(folder.resolve()) and len(before["sha256"]) == 64
    (folder / ".notes.txt").write_text("hidden: never read")
    (folder / "pos" / "README.md").write_text("not a .txt: never read")
    assert data_identity(str(folder)) == before
    (folder / "neg" / "b.txt").rename(folder / "pos" / "b.txt")  # same bytes, another label
    assert data_identity(str(folder)) != before
    (folder / "pos" / "b.txt").rename(folder / "neg" / "b.txt")
    (folder / "pos" / "a.txt").write_text("good news!")
    assert data_identity(str(folder)) != before


def test_check_data_names_what_changed_and_refuses_unfingerprinted_checkpoints():
    from deltaw.train import checkpoint as ckpt

    old = {"data": {"path": "/old/place/t.jsonl", "sha256": "a" * 64}}
    ckpt.check_data({"data": old}, {"data": {"path": "/new/place/t.jsonl", "sha256": "a" * 64}}, Path("ck"))  # moved
    with pytest.raises(CheckpointError, match="validation data /v.jsonl changed"):
        ckpt.check_data({"data": old}, {**old, "val_data": {"path": "/v.jsonl", "sha256": "b" * 64}}, Path("ck"))
    with pytest.raises(CheckpointError, match="training data bbc:sport changed"):
        ckpt.check_data({"data": {"data": {"spec": "bbc:tech"}}}, {"data": {"spec": "bbc:sport"}}, Path("ck"))
    with pytest.raises(CheckpointError, match="no fingerprint of its training data"):
        ckpt.check_data({"format": ckpt.FORMAT}, old, Path("ck"))  # written before checkpoints recorded it


def test_restored_optimizer_state_sits_where_a_fresh_run_keeps_it():
    """Resuming moved every saved optimizer value to its parameter's device, Adam's step counts included; a
    fresh AdamW keeps those on the CPU (on a GPU each step then read them back: one device sync per parameter
    per step). Shown with parameters on the meta device: the moments follow the parameter, the counts stay."""
    from deltaw.train import checkpoint as ckpt
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    names = {id(p): f"p{i}" for i, p in enumerate(params)}
    opt = torch.optim.AdamW(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    opt.step()
    tensors, groups = ckpt.optimizer_tensors(opt, names)
    on_meta = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params]
    fresh = torch.optim.AdamW(on_meta, lr=0.1)
    ckpt.load_optimizer(fresh, {id(p): f"p{i}" for i, p in enumerate(on_meta)}, tensors, groups)
    for p in on_meta:
        state = fresh.state[p]
        assert state["step"].device.type == "cpu" and state["step"].item() == 1
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
