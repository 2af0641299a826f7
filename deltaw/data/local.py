"""Load a user's own data from disk into :class:`TextDataset` or :class:`PromptResponseDataset`.

Accepted layouts, chosen to cover what people actually have lying around without a schema file:

* **a directory** - one document per ``*.txt`` file (entries whose name starts with ``.`` are skipped). If the directory holds ``*.txt`` files directly,
  they are unlabeled documents. If it holds only sub-directories of ``*.txt`` files
  (``root/<label>/*.txt``, the layout of the BBC corpus), the sub-directory name is the label. Both at
  once is ambiguous and rejected.
* **a ``.txt`` file** - one document per non-empty line (a "one example per line" file is far more
  common than blank-line-separated paragraphs, and it round-trips with ``str.splitlines``).
* **a ``.jsonl`` file** - one JSON object per line, all of the same schema:
  ``{"text": ...}`` (unlabeled), ``{"text": ..., "label": ...}`` (classification; labels may be strings
  or non-negative integers) or ``{"prompt": ..., "response": ...}`` (instruction tuning). Other keys
  are ignored, except ``"id"``, which becomes the example id.

Text is read as UTF-8 (a leading byte-order mark is dropped). A file that is not valid UTF-8 is decoded
with ``errors="replace"`` and a warning naming the file, rather than guessing a legacy encoding that
could silently garble it. Errors name the file (and line for JSONL) and say how to fix it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from deltaw.data.datasets import DatasetError, PromptResponseDataset, TextDataset

__all__ = ["load_local"]

logger = logging.getLogger(__name__)

_KINDS = ("text", "prompt_response")
_SCHEMAS = '{"text": ...}, {"text": ..., "label": ...} or {"prompt": ..., "response": ...}'


def load_local(path: str | os.PathLike[str], expect: str | None = None) -> TextDataset | PromptResponseDataset:
    """Load a local dataset (directory of .txt, a .txt file, or a .jsonl file; see the module docstring).

    Args:
        path: the directory or file.
        expect: ``"text"`` or ``"prompt_response"`` to fail early, with a message that says what was
            found, when the data is not of the kind the caller can use; ``None`` accepts either.

    Returns:
        :class:`PromptResponseDataset` for prompt/response JSONL, else :class:`TextDataset`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DatasetError: (a ``ValueError``) unsupported file type, no documents, a malformed JSONL line (file and line number
            are named), mixed schemas, or a kind other than ``expect``.
    """
    if expect is not None and expect not in _KINDS:
        raise DatasetError(f"expect={expect!r} is not one of {_KINDS} (or None).")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"Dataset path {str(p)!r} does not exist; pass a directory of .txt files, a .txt or a .jsonl file.")
    if p.is_dir():
        dataset: TextDataset | PromptResponseDataset = _load_dir(p)
    elif p.suffix.lower() == ".txt":
        dataset = _load_txt_lines(p)
    elif p.suffix.lower() == ".jsonl":
        dataset = _load_jsonl(p)
    else:
        raise DatasetError(
            f"Unsupported dataset file {str(p)!r} (suffix {p.suffix!r}); use a directory of .txt files, "
            "a .txt file (one document per line) or a .jsonl file (one JSON object per line)."
        )
    if len(dataset) == 0:
        raise DatasetError(f"Dataset {str(p)!r} contains no documents; add some text or point to another path.")
    kind = "prompt_response" if isinstance(dataset, PromptResponseDataset) else "text"
    if expect is not None and kind != expect:
        found = "prompt/response pairs" if kind == "prompt_response" else "plain texts"
        raise DatasetError(
            f"Dataset {str(p)!r} holds {found}, but {expect!r} data is needed here; "
            + ('give a .jsonl file of {"prompt": ..., "response": ...} lines.' if expect == "prompt_response"
               else 'give .txt files or a .jsonl file of {"text": ...} lines.')
        )
    logger.debug("loaded %d %s examples from %s", len(dataset), kind, p)
    return dataset


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        warnings.warn(
            f"{path} is not valid UTF-8 (first bad byte at offset {exc.start}); undecodable bytes became U+FFFD. "
            "Re-save the file as UTF-8 to keep every character.",
            UnicodeWarning,
            stacklevel=3,
        )
        return raw.decode("utf-8-sig", errors="replace")


def _visible(folder: Path) -> list[Path]:
    """Entries not starting with "." (skips .git, .ipynb_checkpoints and editors' swap files)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _load_dir(root: Path) -> TextDataset:
    top_files = sorted(p for p in _visible(root) if p.is_file() and p.suffix.lower() == ".txt")
    label_dirs = sorted(d for d in _visible(root) if d.is_dir() and any(f.suffix.lower() == ".txt" for f in _visible(d)))
    if top_files and label_dirs:
        raise DatasetError(
            f"Directory {str(root)!r} mixes .txt files ({top_files[0].name}, ...) with label sub-directories "
            f"({label_dirs[0].name}/, ...); put every document in a label sub-directory, or none of them."
        )
    texts: list[str] = []
    ids: list[str] = []
    labels: list[int] = []
    if top_files:
        for f in top_files:
            text = _read_text(f).strip()
            if text:
                texts.append(text)
                ids.append(f.name)
        return TextDataset(texts=texts, labels=[], label_names=[], ids=ids)
    label_names = [d.name for d in label_dirs]
    for label, d in enumerate(label_dirs):
        for f in sorted(p for p in _visible(d) if p.is_file() and p.suffix.lower() == ".txt"):
            text = _read_text(f).strip()
            if text:
                texts.append(text)
                labels.append(label)
                ids.append(f"{d.name}/{f.name}")
    return TextDataset(texts=texts, labels=labels, label_names=label_names if texts else [], ids=ids)


def _load_txt_lines(path: Path) -> TextDataset:
    texts: list[str] = []
    ids: list[str] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if line:
            texts.append(line)
            ids.append(f"{path.name}:{lineno}")
    return TextDataset(texts=texts, labels=[], label_names=[], ids=ids)


def _schema_of(record: dict[str, object]) -> str | None:
    if "prompt" in record or "response" in record:
        if "text" in record:
            return None  # ambiguous
        return "prompt_response" if "prompt" in record and "response" in record else None
    if "text" in record:
        return "labeled" if "label" in record else "text"
    return None


def _load_jsonl(path: Path) -> TextDataset | PromptResponseDataset:
    where = str(path)
    schema: str | None = None
    first_line = 0
    rows: list[tuple[int, dict[str, object]]] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                             "each line must be one JSON object.") from exc
        if not isinstance(record, dict):
            raise DatasetError(f"{where}, line {lineno}: expected a JSON object, got {type(record).__name__}; "
                             f"use one of {_SCHEMAS}.")
        this = _schema_of(record)
        if this is None:
            raise DatasetError(f"{where}, line {lineno}: keys {sorted(record)} match no schema; use one of {_SCHEMAS}.")
        if schema is None:
            schema, first_line = this, lineno
        elif this != schema:
            raise DatasetError(f"{where}, line {lineno}: schema {this!r} differs from {schema!r} set by line {first_line}; "
                             "every line of a file must use the same keys.")
        fields = ("prompt", "response") if this == "prompt_response" else ("text",)
        for key in fields:
            if not isinstance(record[key], str):
                raise DatasetError(f"{where}, line {lineno}: {key!r} must be a string, got {type(record[key]).__name__}.")
        rows.append((lineno, record))

    def example_id(lineno: int, record: dict[str, object]) -> str:
        return str(record["id"]) if "id" in record else f"{path.name}:{lineno}"

    ids = [example_id(n, r) for n, r in rows]
    if schema == "prompt_response":
        return PromptResponseDataset(
            prompts=[r["prompt"] for _, r in rows],  # type: ignore[misc]
            responses=[r["response"] for _, r in rows],  # type: ignore[misc]
            ids=ids,
        )
    texts = [r["text"] for _, r in rows]  # type: ignore[misc]
    if schema != "labeled":
        return TextDataset(texts=texts, labels=[], label_names=[], ids=ids)  # type: ignore[arg-type]
    return _with_labels(where, rows, texts, ids)  # type: ignore[arg-type]


def _with_labels(where: str, rows: list[tuple[int, dict[str, object]]], texts: list[str], ids: list[str]) -> TextDataset:
    """Map raw labels to ids: strings sort into label names; integers are used as given (names "0".."k")."""
    raw = [(n, r["label"]) for n, r in rows]
    kinds = {"int" if isinstance(v, int) and not isinstance(v, bool) else "str" if isinstance(v, str) else "bad" for _, v in raw}
    for n, v in raw:
        if not (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
            raise DatasetError(f"{where}, line {n}: label {v!r} must be a string or a non-negative integer.")
    if kinds == {"int", "str"}:
        n = next(n for n, v in raw if isinstance(v, str) != isinstance(raw[0][1], str))
        raise DatasetError(f"{where}, line {n}: label type differs from line {raw[0][0]}; use all strings or all integers.")
    if kinds == {"str"}:
        names = sorted({v for _, v in raw})  # type: ignore[type-var]
        index = {name: i for i, name in enumerate(names)}
        labels = [index[v] for _, v in raw]  # type: ignore[index]
    else:
        labels = [int(v) for _, v in raw]  # type: ignore[call-overload]
        names = [str(i) for i in range(max(labels) + 1)]
    return TextDataset(texts=texts, labels=labels, label_names=names, ids=ids)
