"""train(): what it trains, what it writes, and how it refuses bad input (tiny random models, < 1 s each)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import tiny_models
import torch

import deltaw
from deltaw.data import DatasetError, PromptResponseDataset, TextDataset
from deltaw.errors import TargetError
from deltaw.train import BatchStream, OutputExistsError, TrainConfig, lr_at, tokenize_causal, train
from deltaw.train.data import IGNORE_INDEX, shard


def run(tmp_path, data, name="run", model_seed=0, **overrides):
    model, tok = tiny_models.tiny_llama(model_seed)
    settings = dict(output_dir=str(tmp_path / name), data=str(data), model="tiny-llama", steps=6, lr=1e-2,
                    batch_size=4, seq_len=64, progress=False)
    settings.update(overrides)
    return train(TrainConfig(**settings), model=model, tokenizer=tok)


def base_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_only_adapter_trains_and_base_is_unchanged(tmp_path, text_file):
    model, tok = tiny_models.tiny_llama(0)
    before = base_weights(model)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), data=str(text_file), model="tiny", steps=25, lr=1e-2,
                      seq_len=64, progress=False)
    result = train(cfg, model=model, tokenizer=tok)
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    # Wrapping renames base weights (x.weight -> x.base_layer.weight): compare by the original names.
    after = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    adapter_ids = {id(p) for p in deltaw.adapter_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in adapter_ids for p in trainable)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # A fresh backward reaches adapter parameters only.
    model.train()
    batch = tok(["the cat sat on the mat."], return_tensors="pt")
    model(**batch).logits.sum().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    log = [json.loads(x) for x in result.log_path.read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "step"]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert deltaw.merged(model) == ()  # training never merges


def test_outputs_are_a_loadable_peft_adapter(tmp_path, text_file):
    result = run(tmp_path, text_file, eval_every=3)
    out = result.adapter_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss_curve.png",
                 "train_config.json"):
        assert (out / name).is_file(), name
    events = [json.loads(x) for x in result.log_path.read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 7))
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    fresh, tok = tiny_models.tiny_llama(0)
    deltaw.load(fresh, out)
    ids = tok(["a red dog ran."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, result.model(ids).logits, atol=1e-6)
    assert result.validation is not None and math.isfinite(result.validation.perplexity)


def test_prompt_response_masks_the_prompt(tmp_path, prompt_file):
    _, tok = tiny_models.tiny_llama()
    ds = PromptResponseDataset(["Q: 1+2="], [" 3"])
    (ex,) = tokenize_causal(ds, tok, 64)
    n_prompt = len(tok("Q: 1+2=")["input_ids"])
    assert all(y == IGNORE_INDEX for y in ex.labels[:n_prompt])
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:])
    assert ex.input_ids[-1] == tok.eos_token_id and ex.n_targets() == 3  # " ", "3", eos
    result = run(tmp_path, prompt_file, steps=3)
    assert result.steps == 3


def test_truncation_is_counted_and_logged(caplog):
    _, tok = tiny_models.tiny_llama()
    ds = TextDataset(["short", "a much longer text than eight bytes", "another long text here"], [], [])
    with caplog.at_level(logging.INFO, logger="deltaw.train.data"):
        examples = tokenize_causal(ds, tok, 8, "toy")
    assert all(len(e.input_ids) <= 8 for e in examples)
    assert "truncated 2 of 3 examples to seq_len=8" in caplog.text


def test_empty_dataset_is_refused_before_touching_disk(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no documents"):
        run(tmp_path, empty)
    assert not (tmp_path / "run").exists()
    _, tok = tiny_models.tiny_llama()
    with pytest.raises(DatasetError, match="no usable example"):
        tokenize_causal(PromptResponseDataset(["x" * 50], ["y"]), tok, 8)


def test_unknown_targets_and_oversized_rank(tmp_path, text_file):
    with pytest.raises(TargetError, match="q_proj"):  # the message lists what can be targeted
        run(tmp_path, text_file, targets="nope_proj")
    with pytest.raises(TargetError, match="exceeds min"):
        run(tmp_path, text_file, r=64)
    assert not (tmp_path / "run").exists()


def test_presets_resolve_per_architecture():
    from deltaw.train.targets import resolve_targets

    llama, _ = tiny_models.tiny_llama()
    bert, _ = tiny_models.tiny_bert_classifier()
    assert resolve_targets("qv", llama) == ("q_proj", "v_proj")
    assert resolve_targets("attention", bert) == ("query", "key", "value", "attention.output.dense")
    assert resolve_targets("all-linear", bert) == "all-linear"
    assert resolve_targets("q_proj, o_proj", llama) == ("q_proj", "o_proj")
    assert resolve_targets(r"re:.*\.q_proj", llama) == r".*\.q_proj"
    with pytest.raises(TargetError, match="no 'mlp' preset"):
        resolve_targets("mlp", torch.nn.Linear(2, 2))


def test_existing_output_dir_is_refused_unless_overwrite(tmp_path, text_file):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(tmp_path, text_file, name="mine")
    with pytest.raises(OutputExistsError, match="not a deltaw run directory"):
        run(tmp_path, text_file, name="mine", overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    run(tmp_path, text_file, steps=2)
    with pytest.raises(OutputExistsError):
        run(tmp_path, text_file, steps=2)
    assert run(tmp_path, text_file, steps=3, overwrite=True).steps == 3


def test_early_stopping_keeps_the_best_adapter(tmp_path, text_file):
    result = run(tmp_path, text_file, steps=40, lr=1e-9, eval_every=2, early_stopping_patience=2,
                 early_stopping_min_delta=1.0)
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    best = deltaw.read_adapter(result.adapter_dir / "best").factors
    final = deltaw.read_adapter(result.adapter_dir).factors
    assert all(torch.equal(best[m]["B"], final[m]["B"]) for m in best)


def test_config_validation():
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(output_dir="x", early_stopping_patience=2)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(output_dir="x", schedule="step")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(output_dir="x", batch_size=0)
    with pytest.raises(ValueError, match="contradict"):
        TrainConfig(output_dir="x", resume=True, overwrite=True)


def test_lr_schedules():
    assert lr_at(0, 100, 10, 1.0, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(55, 100, 10, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(99, 100, 0, 1.0, "constant") == 1.0
    assert 0 < lr_at(99, 100, 0, 1.0, "cosine") < 0.01


def test_batch_stream_is_a_pure_function_of_seed_and_step():
    from deltaw.train.data import Example

    examples = [Example((i, i + 1), (i, i + 1)) for i in range(10)]
    a, b = BatchStream(examples, 4, seed=3), BatchStream(examples, 4, seed=3)
    assert [a.indices(s) for s in range(6)] == [b.indices(s) for s in reversed(range(6))][::-1]
    first_epoch = a.indices(0) + a.indices(1) + a.indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert BatchStream(examples, 4, seed=4).indices(0) != a.indices(0)
    glob = list(range(8))
    assert shard(glob, 2, 2, 0) == [[0, 1], [2, 3]] and shard(glob, 2, 2, 1) == [[4, 5], [6, 7]]


def test_gradient_checkpointing_and_grad_accum_give_the_same_adapter(tmp_path, text_file):
    plain = run(tmp_path, text_file, name="plain", steps=3, batch_size=4)
    ckpt = run(tmp_path, text_file, name="ckpt", steps=3, batch_size=2, grad_accum=2, gradient_checkpointing=True)
    a, b = deltaw.read_adapter(plain.adapter_dir).factors, deltaw.read_adapter(ckpt.adapter_dir).factors
    assert max(float((a[m][k] - b[m][k]).abs().max()) for m in a for k in "AB") < 1e-5
    assert run(tmp_path, text_file, name="bf16", steps=2, precision="bf16").steps == 2


def test_classification_needs_two_labels(tmp_path, text_file):
    model, tok = tiny_models.tiny_bert_classifier(2)
    cfg = TrainConfig(output_dir=str(tmp_path / "c"), task="classification", data=str(text_file), model="t",
                      steps=2, progress=False)
    with pytest.raises(DatasetError, match="at least 2 labels"):
        train(cfg, model=model, tokenizer=tok)


def test_seq_len_beyond_the_model_context_is_refused(tmp_path, text_file):
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        run(tmp_path, text_file, seq_len=1024)
    assert not (tmp_path / "run").exists()


def test_a_refused_model_comes_back_as_it_was_passed_in(tmp_path, text_file, monkeypatch):
    """train(model=...) on a model whose other adapter was still trainable was refused only after attaching its
    own adapter and activating it: the model kept both, and a retry failed on the name. Any error before training
    starts now takes the new adapter out again."""
    from deltaw.train import loop

    settings = dict(output_dir=str(tmp_path / "run"), data=str(text_file), steps=2, batch_size=2, seq_len=32,
                    targets="v_proj", r=2, progress=False)
    model, tok = tiny_models.tiny_llama()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj"]), "old")
    with pytest.raises(ValueError, match="outside the adapter require grad"):
        train(TrainConfig(**settings), model=model, tokenizer=tok)
    assert deltaw.adapters(model) == ["old"] and deltaw.active(model) == (("old", 1.0),)
    assert not (tmp_path / "run").exists()

    # A model without adapters gets its plain modules and requires_grad flags back (a failure after attaching).
    plain, _ = tiny_models.tiny_llama()
    modules = [n for n, _ in plain.named_modules()]
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_prepare_output_dir", disk_full)
        with pytest.raises(OSError, match="disk full"):
            train(TrainConfig(**settings), model=plain, tokenizer=tok)
    assert deltaw.adapters(plain) == [] and not any(isinstance(m, deltaw.layers.LoraLayer) for m in plain.modules())
    assert [n for n, _ in plain.named_modules()] == modules
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags

    deltaw.set_trainable(model, None)  # the cause fixed, a retry trains
    train(TrainConfig(**settings), model=model, tokenizer=tok)
    assert deltaw.adapters(model) == ["old", "default"]
