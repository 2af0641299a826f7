"""Local datasets: directory / .txt / .jsonl layouts and error messages that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltaw.data import DatasetError, PromptResponseDataset, TextDataset, load_local


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_directory_of_txt_files_is_unlabeled(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst doc\nwith two lines", encoding="utf-8")  # BOM is dropped
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    ds = load_local(tmp_path)
    assert isinstance(ds, TextDataset)
    assert ds.texts == ["first doc\nwith two lines", "second"]
    assert ds.ids == ["a.txt", "b.txt"]
    assert ds.labels == [] and ds.label_names == [] and not ds.is_labeled


def test_label_subdirectories(tmp_path: Path) -> None:
    for label, docs in {"spam": ["buy now"], "ham": ["hello", "see you"]}.items():
        (tmp_path / label).mkdir()
        for i, doc in enumerate(docs):
            (tmp_path / label / f"{i}.txt").write_text(doc, encoding="utf-8")
    ds = load_local(str(tmp_path))
    assert isinstance(ds, TextDataset)
    assert ds.label_names == ["ham", "spam"]
    assert list(zip(ds.ids, ds.labels)) == [("ham/0.txt", 0), ("ham/1.txt", 0), ("spam/0.txt", 1)]

    (tmp_path / "loose.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match="mixes .txt files"):
        load_local(tmp_path)


def test_txt_file_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("one\n\n  two  \r\nthree", encoding="utf-8")
    ds = load_local(path)
    assert isinstance(ds, TextDataset)
    assert ds.texts == ["one", "two", "three"]
    assert ds.ids == ["lines.txt:1", "lines.txt:3", "lines.txt:4"]


def test_non_utf8_file_warns_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "legacy.txt"
    path.write_bytes("caf\xe9 costs \xa35".encode("latin-1"))
    with pytest.warns(UnicodeWarning, match=r"legacy.txt is not valid UTF-8 \(first bad byte at offset 3\)"):
        ds = load_local(path)
    assert ds.texts == ["caf\ufffd costs \ufffd5"]  # type: ignore[union-attr]


def test_jsonl_schemas(tmp_path: Path) -> None:
    text = load_local(_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, "", {"text": "b", "extra": 1}]))
    assert isinstance(text, TextDataset) and text.texts == ["a", "b"] and not text.is_labeled
    assert text.ids == ["t.jsonl:1", "t.jsonl:3"]

    labeled = load_local(_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg", "id": 7}]))
    assert isinstance(labeled, TextDataset)
    assert labeled.label_names == ["neg", "pos"] and labeled.labels == [1, 0] and labeled.ids == ["l.jsonl:1", "7"]

    ints = load_local(_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}]))
    assert isinstance(ints, TextDataset) and ints.labels == [2, 0] and ints.label_names == ["0", "1", "2"]

    pr = load_local(_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "response": "4"}]), expect="prompt_response")
    assert isinstance(pr, PromptResponseDataset) and (pr.prompts, pr.responses, len(pr)) == (["2+2?"], ["4"], 1)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"text": "a"}, {"text": "b"}, '{"text": "c",}'], r"bad\.jsonl, line 3: not valid JSON"),
        ([{"text": "a"}, "[1, 2]"], r"bad\.jsonl, line 2: expected a JSON object, got list"),
        ([{"text": "a"}, {"body": "b"}], r"bad\.jsonl, line 2: keys \['body'\] match no schema"),
        ([{"prompt": "p"}], r"bad\.jsonl, line 1: keys \['prompt'\] match no schema"),
        ([{"text": "a"}, {"prompt": "p", "response": "r"}], r"bad\.jsonl, line 2: schema 'prompt_response' differs from 'text' set by line 1"),
        ([{"text": 5}], r"bad\.jsonl, line 1: 'text' must be a string, got int"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], r"bad\.jsonl, line 2: label type differs from line 1"),
        ([{"text": "a", "label": -1}], r"bad\.jsonl, line 1: label -1 must be a string or a non-negative integer"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, rows: list[object], pattern: str) -> None:
    with pytest.raises(DatasetError, match=pattern):
        load_local(_jsonl(tmp_path / "bad.jsonl", rows))


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl' does not exist"):
        load_local(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"Unsupported dataset file .*data\.csv.*'\.csv'"):
        load_local(tmp_path / "data.csv")
    for name, content in (("empty.jsonl", "\n\n"), ("empty.txt", " \n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DatasetError, match=rf"{name}' contains no documents"):
            load_local(tmp_path / name)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DatasetError, match="nothing' contains no documents"):
        load_local(empty_dir)
    with pytest.raises(DatasetError, match=r"holds plain texts, but 'prompt_response' data is needed"):
        load_local(_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), expect="prompt_response")


def test_dataset_invariants() -> None:
    with pytest.raises(DatasetError, match="2 labels for 1 texts"):
        TextDataset(texts=["a"], labels=[0, 1], label_names=["x", "y"])
    with pytest.raises(DatasetError, match="outside 0..0"):
        TextDataset(texts=["a"], labels=[3], label_names=["x"])
    with pytest.raises(DatasetError, match="1 prompts but 0 responses"):
        PromptResponseDataset(prompts=["p"], responses=[])
    with pytest.raises(AttributeError):
        TextDataset(texts=["a"], labels=[], label_names=[]).texts = []  # type: ignore[misc]
