"""Hold-out splits, capped subsets, label alignment and config validation (review fixes, no model needed)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import tiny_models
import torch

from deltaw.data import DatasetError, TextDataset
from deltaw.train import TrainConfig, train
from deltaw.train import checkpoint as ckpt
from deltaw.train.data import align_labels, hold_out, limit, load_eval_dataset, load_splits
from deltaw.train.distributed import pick_device


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hold_out_keeps_duplicates_on_one_side(tmp_path: Path) -> None:
    rng = random.Random(0)
    base = [f"sentence number {i} about topic {i % 7}" for i in range(50)]
    lines = base + rng.sample(base, 50) + [base[3].upper() + "  "]  # a case/whitespace variant is a copy too
    s = load_splits(str(_write_lines(tmp_path / "dupes.txt", lines)))
    norm = lambda t: " ".join(t.casefold().split())  # noqa: E731
    assert not {norm(t) for t in s.train.texts} & {norm(t) for t in s.validation.texts}
    assert len(s.train) + len(s.validation) == len(lines)
    assert abs(len(s.validation) - 0.1 * len(lines)) <= 2  # still about 10 %


def test_hold_out_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(60)]
    a = load_splits(str(_write_lines(tmp_path / "a.txt", lines)))
    b = load_splits(str(_write_lines(tmp_path / "b.txt", lines[::-1])))
    assert sorted(a.validation.texts) == sorted(b.validation.texts)
    assert len(a.validation) == 6
    assert hold_out(TextDataset(["same"] * 20, [], [])) is None  # one group: nothing can be held out


def test_eval_dataset_held_out_is_the_validation_part(tmp_path: Path) -> None:
    path = str(tiny_models.write_text_jsonl(tmp_path / "t.jsonl", 40))
    splits = load_splits(path)
    held = load_eval_dataset(path, held_out=True)
    assert held.texts == splits.validation.texts
    assert not set(held.texts) & set(splits.train.texts)
    assert len(load_eval_dataset(path)) == 40  # without held_out a local file is used whole
    small = str(tiny_models.write_text_jsonl(tmp_path / "s.jsonl", 5))
    with pytest.raises(DatasetError, match="--data"):
        load_eval_dataset(small, held_out=True)


def test_limit_is_a_seeded_subset_not_the_head() -> None:
    labels = [i // 20 for i in range(100)]  # sorted by class, like BBC
    ds = TextDataset([f"t{i}" for i in range(100)], labels, [f"c{k}" for k in range(5)])
    capped = limit(ds, 20)
    assert len(capped) == 20 and len(set(capped.labels)) >= 4
    assert capped.texts == limit(ds, 20).texts  # deterministic
    assert capped.texts == sorted(capped.texts, key=lambda t: int(t[1:]))  # data order kept
    assert limit(ds, 200) is ds and limit(ds, None) is ds


def test_align_labels_maps_by_name_and_rejects_unknown() -> None:
    val = TextDataset(["x", "y"], [0, 1], ["b", "c"])
    aligned = align_labels(val, ["a", "b", "c"], "validation data")
    assert aligned.labels == [1, 2] and aligned.label_names == ["a", "b", "c"]
    with pytest.raises(DatasetError, match=r"'z'"):
        align_labels(TextDataset(["x"], [0], ["z"]), ["a", "b"], "validation data")


def test_train_refuses_validation_labels_unknown_to_training(tmp_path: Path) -> None:
    rows = [{"text": f"{l} {i}", "label": l} for i in range(10) for l in "ab"]
    tr = tmp_path / "tr.jsonl"
    tr.write_text("".join(json.dumps(r) + "\n" for r in rows))
    va = tmp_path / "va.jsonl"
    va.write_text("".join(json.dumps({**r, "label": "z" if r["label"] == "a" else "b"}) + "\n" for r in rows))
    model, tok = tiny_models.tiny_bert_classifier(2)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), task="classification", data=str(tr), val_data=str(va),
                      steps=1, seq_len=16, progress=False)
    with pytest.raises(DatasetError, match=r"'z'"):
        train(cfg, model=model, tokenizer=tok)


@pytest.mark.parametrize("field", ["weight_decay", "early_stopping_min_delta", "max_grad_norm"])
def test_config_rejects_nan(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(output_dir="x", **{field: math.nan})


def test_device_is_validated_early() -> None:
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig(output_dir="x", device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu")


def test_resume_identity_covers_eval_cadence_with_early_stopping() -> None:
    base = dict(output_dir="x", eval_every=2, early_stopping_patience=1)
    saved = {"format": ckpt.FORMAT, "identity": TrainConfig(**base).identity(), "world_size": 1}
    for change in ({"eval_every": 5}, {"eval_max_examples": 8}):
        with pytest.raises(ckpt.CheckpointError, match=next(iter(change))):
            ckpt.check_compatible(saved, TrainConfig(**{**base, **change}).identity(), 1, Path("ck"))
    plain = {"format": ckpt.FORMAT, "identity": TrainConfig(output_dir="x", eval_every=2).identity(), "world_size": 1}
    ckpt.check_compatible(plain, TrainConfig(output_dir="x", eval_every=5).identity(), 1, Path("ck"))  # cadence only
