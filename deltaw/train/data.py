"""From a data spec (``bbc:tech`` or a local path) to tokenized examples and deterministic global batches.

Why a position-indexed stream instead of a DataLoader: the batch of step ``s`` is a pure function of
``(seed, s)`` -- positions ``s*G .. s*G+G-1`` of an endless concatenation of per-epoch permutations. So a
resumed run needs nothing but the step number to continue with exactly the examples an uninterrupted run
would have seen, and every DDP rank can compute the whole global batch (and its token count, the loss
normaliser) locally, taking only its own share to the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DatasetError, PromptResponseDataset, TextDataset, load_bbc, load_local

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what torch's cross_entropy ignores; prompt and padding positions carry it
VAL_FRACTION = 0.1  # held out of a local file when no validation data is given
_VAL_SEED = 1234  # fixed, so the held-out part of a file never depends on the training seed
_MIN_HOLD_OUT = 10  # smaller files train on everything (a 0-1 example validation set measures nothing)
_LIMIT_SEED = 4321  # fixed, so capped train/validation subsets never depend on the training seed


# ---- data specs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSplits:
    """Raw datasets for one spec: what trains, what validates during training, what ``eval`` measures."""

    train: TextDataset | PromptResponseDataset
    validation: TextDataset | PromptResponseDataset | None
    test: TextDataset | PromptResponseDataset | None
    source: str


def parse_bbc_spec(spec: str) -> list[str] | None:
    """'bbc' -> None (all topics); 'bbc:tech' -> ['tech']; 'bbc:tech,sport' -> ['tech', 'sport']; else not BBC."""
    head, _, tail = spec.partition(":")
    if head.lower() != "bbc" or (Path(spec).exists() and ":" not in spec):
        raise ValueError("not a bbc spec")
    topics = [t.strip() for t in tail.split(",") if t.strip()] if tail else []
    return topics or None


def is_bbc_spec(spec: str) -> bool:
    try:
        parse_bbc_spec(spec)
    except ValueError:
        return False
    return True


def data_identity(spec: str) -> dict[str, str]:
    """What a checkpoint records about a data spec, so that ``--resume`` can tell the data is still the same.

    Why content and not the path: the config (and so the checkpoint) already holds the spec as typed, but a file
    edited or replaced under the same name would silently continue the run on other examples. The embedded BBC
    corpus ships with the package, so its spec names it. A local file is hashed whole; a directory by exactly
    what ``load_local`` reads (its visible ``*.txt`` files, top level or one label folder down), each with its
    relative path so that a document moved to another label counts as a change.
    """
    if is_bbc_spec(spec):
        return {"spec": spec}
    path = Path(spec).expanduser().resolve()
    digest = hashlib.sha256()
    if path.is_dir():
        files = _txt_files(path) + [f for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")
                                    for f in _txt_files(d)]
        for f in sorted(files, key=lambda f: f.relative_to(path).as_posix()):
            one = hashlib.sha256()
            _hash_file(f, one)
            digest.update(f.relative_to(path).as_posix().encode() + b"\x00" + one.digest())
    else:
        _hash_file(path, digest)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _txt_files(folder: Path) -> list[Path]:
    """The documents ``load_local`` reads from one folder: visible files ending in .txt (any case)."""
    return [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix.lower() == ".txt"]


def _hash_file(path: Path, digest: Any) -> None:
    """Feed ``path``'s bytes to a hashlib object in chunks (data files may not fit in memory twice)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def load_splits(spec: str, val_spec: str | None = None) -> DataSplits:
    """Resolve ``spec`` into train / validation / test datasets.

    BBC uses its fixed 80/10/10 split. A local path trains on everything except a deterministic ~10 % held out
    for validation (unless ``val_spec`` names validation data); a local path has no test split. Labels of a
    separate ``val_spec`` keep their own ids here: :func:`align_labels` maps them onto the training names.
    """
    if is_bbc_spec(spec):
        topics = parse_bbc_spec(spec)
        train = load_bbc("train", topics)
        validation = load_bbc("validation", topics)
        test = load_bbc("test", topics)
    else:
        full = load_local(spec)
        train, validation = full, None
        if val_spec is None:
            held = hold_out(full)
            if held is not None:
                train, validation = held
                log.info("held out %d of %d examples of %s for validation", len(validation), len(full), spec)
        test = None
    if val_spec is not None:
        validation = load_eval_dataset(val_spec, split="validation")
    if len(train) == 0:
        raise DatasetError(f"training data {spec!r} holds no examples")
    return DataSplits(train, validation, test, spec)


def load_eval_dataset(spec: str, split: str = "test", *, held_out: bool = False) -> TextDataset | PromptResponseDataset:
    """A dataset to measure on: a BBC split, or a local file.

    A local file is used whole (the user held it out), unless ``held_out``: then only the part that training
    on ``spec`` held out for validation -- what ``deltaw eval`` measures when it falls back to the adapter's
    own training data, which would otherwise score the examples the adapter was trained on.
    """
    if is_bbc_spec(spec):
        return load_bbc(split, parse_bbc_spec(spec))
    full = load_local(spec)
    if not held_out:
        return full
    held = hold_out(full)
    if held is None:
        raise DatasetError(f"{spec!r} is too small ({len(full)} examples) to have had a held-out part; every "
                           "example was trained on. Give evaluation data explicitly (--data)")
    return held[1]


def align_labels(ds: TextDataset | PromptResponseDataset, label_names: Sequence[str], what: str) -> TextDataset:
    """``ds`` with its label ids re-expressed in ``label_names`` (matched by name, not by position).

    Why: label ids are positions in each file's own sorted label set, so a validation file lacking one training
    class would otherwise have every later class silently shifted onto the wrong id.
    """
    if not isinstance(ds, TextDataset) or not ds.is_labeled:
        raise DatasetError(f"{what}: classification needs labeled texts")
    names = list(label_names)
    if list(ds.label_names) == names:
        return ds
    unknown = sorted(set(ds.label_names[y] for y in ds.labels) - set(names))
    if unknown:
        raise DatasetError(f"{what}: label(s) {unknown} do not occur in the training labels {names}; "
                           "evaluate with data whose labels the model was trained on")
    index = {n: i for i, n in enumerate(names)}
    return TextDataset(list(ds.texts), [index[ds.label_names[y]] for y in ds.labels], names, list(ds.ids))


def _subset(ds: TextDataset | PromptResponseDataset, idx: Sequence[int]) -> TextDataset | PromptResponseDataset:
    ids = [ds.ids[i] for i in idx] if ds.ids else []
    if isinstance(ds, PromptResponseDataset):
        return PromptResponseDataset([ds.prompts[i] for i in idx], [ds.responses[i] for i in idx], ids)
    labels = [ds.labels[i] for i in idx] if ds.labels else []
    return TextDataset([ds.texts[i] for i in idx], labels, list(ds.label_names), ids)


def _normalised(ds: TextDataset | PromptResponseDataset, i: int) -> str:
    """The text an example is grouped by: case- and whitespace-insensitive, so near-verbatim copies match."""
    raw = f"{ds.prompts[i]}\x00{ds.responses[i]}" if isinstance(ds, PromptResponseDataset) else ds.texts[i]
    return " ".join(raw.casefold().split())


def hold_out(ds: TextDataset | PromptResponseDataset, fraction: float = VAL_FRACTION):
    """Split ``ds`` into (train, held-out) with about ``fraction`` of the examples held out, or None if too small.

    Examples are grouped by their normalised text and whole groups are assigned, in the order of a stable hash
    of that text, so every copy of a duplicated example lands on the same side (splitting by position leaked
    duplicates into both). The choice depends only on the texts: not on file order, seeds or the process.
    """
    n = len(ds)
    if n < _MIN_HOLD_OUT:
        return None
    groups: dict[str, list[int]] = {}
    for i in range(n):
        groups.setdefault(_normalised(ds, i), []).append(i)
    if len(groups) < 2:
        return None
    order = sorted(groups, key=lambda t: hashlib.sha256(f"{_VAL_SEED}:{t}".encode()).digest())
    k = max(1, int(round(n * fraction)))
    held: list[int] = []
    for text in order:
        if len(held) + len(groups[text]) <= k:
            held.extend(groups[text])
            if len(held) == k:
                break
    if not held:  # every group is larger than the target: hold out the smallest one
        held = list(min((groups[t] for t in order), key=len))
    held_set = set(held)
    if len(held_set) == n:
        return None
    return _subset(ds, [i for i in range(n) if i not in held_set]), _subset(ds, sorted(held_set))


def limit(ds, max_examples: int | None, seed: int = _LIMIT_SEED):
    """At most ``max_examples`` examples: a fixed-seed random subset, kept in the data's order.

    Why not the first N: BBC (and many files) are sorted by label, so the head of a split can hold only one or
    two classes. The subset depends only on ``seed`` and the dataset size, so it is the same every run.
    """
    if max_examples is None or len(ds) <= max_examples:
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return _subset(ds, sorted(perm[:max_examples]))


# ---- tokenization --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One tokenized example. Causal LM: ``labels`` per token (IGNORE_INDEX where no loss). Classification:
    ``label`` is the class id and ``labels`` is empty."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...] = ()
    label: int = -1

    def n_targets(self) -> int:
        """Loss terms this example contributes (causal: shifted label positions that count; else 1)."""
        if self.label >= 0:
            return 1
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


@contextlib.contextmanager
def _quiet_tokenizer_warnings() -> Iterator[None]:
    """Tokenizing without truncation on purpose (to count what truncation cuts) makes transformers warn."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def tokenize_causal(ds: TextDataset | PromptResponseDataset, tokenizer, seq_len: int, what: str = "data") -> list[Example]:
    """Plain texts: next-token loss on every token (eos appended). Prompt/response: loss on the response only.

    Longer examples are truncated to ``seq_len`` (counted and logged); examples left with no target token are
    dropped (counted and logged).
    """
    eos = _eos_id(tokenizer)
    tail = [eos] if eos is not None else []
    out: list[Example] = []
    truncated = dropped = 0
    with _quiet_tokenizer_warnings():
        if isinstance(ds, PromptResponseDataset):
            prompts = tokenizer(list(ds.prompts))["input_ids"] if len(ds) else []
            responses = tokenizer(list(ds.responses), add_special_tokens=False)["input_ids"] if len(ds) else []
            pairs = [(list(p), [IGNORE_INDEX] * len(p), list(r) + tail) for p, r in zip(prompts, responses)]
            raw = [(p + r, mask + r) for p, mask, r in pairs]
        else:
            encoded = tokenizer(list(ds.texts))["input_ids"] if len(ds) else []
            raw = [(list(ids) + tail, list(ids) + tail) for ids in encoded]
    for ids, labels in raw:
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        ex = Example(tuple(ids), tuple(labels))
        if ex.n_targets() == 0:
            dropped += 1
            continue
        out.append(ex)
    if truncated:
        log.info("%s: truncated %d of %d examples to seq_len=%d tokens", what, truncated, len(raw), seq_len)
    if dropped:
        log.warning("%s: dropped %d example(s) with no target token left (empty text, or a prompt filling all "
                    "%d tokens)", what, dropped, seq_len)
    if not out:
        raise DatasetError(f"{what}: no usable example (all {len(raw)} empty or without a target token)")
    return out


def tokenize_classification(ds: TextDataset, tokenizer, seq_len: int, what: str = "data") -> list[Example]:
    """Texts with labels -> truncated token ids (the tokenizer's special tokens kept) and class ids."""
    if not isinstance(ds, TextDataset) or not ds.is_labeled:
        raise DatasetError(f"{what}: classification needs labeled texts (BBC, a folder of <label>/*.txt, or JSONL "
                           'with {"text": ..., "label": ...})')
    if len(ds) == 0:
        raise DatasetError(f"{what}: no examples")
    with _quiet_tokenizer_warnings():
        full = tokenizer(list(ds.texts))["input_ids"]
        cut = tokenizer(list(ds.texts), truncation=True, max_length=seq_len)["input_ids"]
    truncated = sum(1 for a, b in zip(full, cut) if len(a) > len(b))
    if truncated:
        log.info("%s: truncated %d of %d texts to seq_len=%d tokens", what, truncated, len(ds), seq_len)
    return [Example(tuple(ids), (), int(y)) for ids, y in zip(cut, ds.labels)]


# ---- the deterministic stream --------------------------------------------------------------------------
class BatchStream:
    """Global batches by step number: a pure function of (seed, step). See the module docstring."""

    def __init__(self, examples: Sequence[Example], global_batch: int, seed: int) -> None:
        if not examples:
            raise DatasetError("no training examples")
        self.examples = list(examples)
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _perm(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.examples), generator=g).tolist()
            self._perms = {epoch: perm}  # one epoch cached at a time; older ones are never asked for again
        return perm

    def indices(self, step: int) -> list[int]:
        """Example indices of the global batch of (0-based) optimizer step ``step``."""
        n = len(self.examples)
        start = step * self.global_batch
        return [self._perm(p // n)[p % n] for p in range(start, start + self.global_batch)]

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / len(self.examples)

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.examples) / self.global_batch))


def shard(indices: Sequence[int], batch_size: int, grad_accum: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: chunk k of ``batch_size`` goes to rank k // grad_accum."""
    chunks = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    return chunks[rank * grad_accum:(rank + 1) * grad_accum]


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, and labels (causal: per token; classification: per row)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, :len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].label >= 0:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
