"""The two in-memory dataset shapes every loader in :mod:`deltaw.data` returns.

Why plain frozen dataclasses of lists rather than ``datasets.Dataset`` or a ``torch.utils.data.Dataset``:
the corpora we handle are small (thousands of documents), the trainers want random access and their own
batching/tokenisation, and a dependency-free container needs neither Hugging Face ``datasets`` nor a
tokenizer to build. ``frozen=True`` stops fields being rebound by accident; the lists
themselves are fresh copies per load, so mutating one never leaks into another caller's copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltaw.errors import DeltawError

__all__ = ["DatasetError", "TextDataset", "PromptResponseDataset"]


class DatasetError(DeltawError, ValueError):
    """Data that cannot be loaded as asked: unknown split/topic, empty or malformed file, inconsistent fields.

    A ``ValueError`` too, so generic argument-checking code keeps working; a ``DeltawError`` so that
    ``except deltaw.DeltawError`` catches every deltaw failure.
    """


@dataclass(frozen=True)
class TextDataset:
    """Documents, optionally with integer class labels.

    Attributes:
        texts: one string per document.
        labels: ``labels[i]`` indexes ``label_names`` for ``texts[i]``; **empty** when the data is
            unlabeled (an empty list fails loudly on indexing, where a sentinel such as ``-1`` would
            silently flow into a loss function).
        label_names: class names, position = label id; empty when unlabeled.
        ids: a stable identifier per document (e.g. ``"business/001.txt"`` or ``"data.jsonl:17"``), so
            predictions can be traced back to their source and splits can be compared across runs.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.labels and len(self.labels) != n:
            raise DatasetError(f"TextDataset: {len(self.labels)} labels for {n} texts; give one label per text, or none.")
        if self.ids and len(self.ids) != n:
            raise DatasetError(f"TextDataset: {len(self.ids)} ids for {n} texts; give one id per text, or none.")
        if self.labels:
            bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
            if bad:
                raise DatasetError(
                    f"TextDataset: label ids {sorted(set(bad))[:5]} are outside 0..{len(self.label_names) - 1}; "
                    "every label must index label_names."
                )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_labeled(self) -> bool:
        """True when every text carries a label (``labels`` is non-empty)."""
        return bool(self.labels)


@dataclass(frozen=True)
class PromptResponseDataset:
    """Prompt/response pairs for instruction (causal LM) fine-tuning.

    Attributes:
        prompts: the user turn / input of each example.
        responses: the target completion of each example (``responses[i]`` answers ``prompts[i]``).
        ids: a stable identifier per example (e.g. ``"chat.jsonl:3"``).
    """

    prompts: list[str]
    responses: list[str]
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise DatasetError(
                f"PromptResponseDataset: {len(self.prompts)} prompts but {len(self.responses)} responses; "
                "they must pair up one to one."
            )
        if self.ids and len(self.ids) != len(self.prompts):
            raise DatasetError(
                f"PromptResponseDataset: {len(self.ids)} ids for {len(self.prompts)} examples; give one id per example, or none."
            )

    def __len__(self) -> int:
        return len(self.prompts)
