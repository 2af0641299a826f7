"""Sequence classification: encoder LoRA + a new head saved with the adapter (modules_to_save)."""

from __future__ import annotations

import tiny_models
import torch

import deltaw
from deltaw.train import TrainConfig, evaluate, macro_f1, train
from deltaw.train.data import load_splits, tokenize_classification


def test_classifier_learns_and_its_head_travels_with_the_adapter(tmp_path, labeled_file):
    model, tok = tiny_models.tiny_bert_classifier(2, seed=0)
    head_before = model.classifier.weight.clone()
    cfg = TrainConfig(output_dir=str(tmp_path / "cls"), task="classification", data=str(labeled_file), model="tiny",
                      steps=30, lr=1e-2, batch_size=8, seq_len=32, targets="attention", progress=False)
    result = train(cfg, model=model, tokenizer=tok)
    assert result.label_names == ["digits", "vowels"]
    assert result.validation.accuracy == 1.0 and result.validation.macro_f1 == 1.0
    assert torch.equal(model.classifier.original_module.weight, head_before)  # the original head is untouched
    adapter = deltaw.read_adapter(result.adapter_dir)
    assert set(adapter.saved) == {"classifier"}
    # A fresh base + the saved adapter predicts exactly as the trained model does.
    fresh, _ = tiny_models.tiny_bert_classifier(2, seed=0)
    deltaw.load(fresh, result.adapter_dir)
    val = load_splits(str(labeled_file)).validation
    examples = tokenize_classification(val, tok, 32)
    a = evaluate(result.model, examples, "classification", pad_id=0)
    b = evaluate(fresh, examples, "classification", pad_id=0)
    assert a.accuracy == b.accuracy and abs(a.loss - b.loss) < 1e-6


def test_macro_f1_matches_the_definition():
    f1, per = macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert per == {"a": 0.5, "b": 0.8, "c": 0.0}
    assert abs(f1 - 1.3 / 3) < 1e-12
