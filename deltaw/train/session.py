"""Load a base model plus saved adapters for evaluation, generation and merging (what the CLI verbs share).

Why a helper: ``eval``, ``generate``, ``merge`` and ``inspect`` all need "the base this adapter was trained on,
with the adapter loaded", and the adapter directory already says which base, which task, which data and which
labels (in its PEFT config and deltaw metadata). Explicit arguments override what the adapter says.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import api
from ..io import peft as peft_io
from .loading import load_for_task

log = logging.getLogger(__name__)


@dataclass
class AdapterDefaults:
    """What an adapter directory says about how it was trained."""

    task: str | None = None
    model: str | None = None
    data: str | None = None
    val_data: str | None = None  # the run's separate validation data, if it had one
    seq_len: int | None = None
    label_names: list[str] = field(default_factory=list)


def adapter_defaults(directory: str | Path) -> AdapterDefaults:
    adapter = peft_io.read_adapter(directory)
    meta = adapter.deltaw_meta.get("metadata", {}) or {}
    task = meta.get("deltaw_task") or {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}.get(
        adapter.peft.get("task_type") or "")
    return AdapterDefaults(task=task, model=meta.get("base_model_name_or_path") or adapter.peft.get("base_model_name_or_path"),
                           data=meta.get("data"), val_data=meta.get("val_data"), seq_len=meta.get("seq_len"), label_names=list(meta.get("label_names", [])))


def model_argument(value: str | None) -> str | None:
    """'embedded'/'default' -> None (the loader's default model for the task); names and paths pass through."""
    if value is None or value.strip().lower() in ("embedded", "default"):
        return None
    return value


def adapter_name_for(directory: str | Path, index: int, taken: set[str]) -> str:
    """A valid, unique adapter name derived from the directory name."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(directory).resolve().name)[:60] or "adapter"
    if not re.match(r"[A-Za-z_]", stem):
        stem = f"a_{stem}"
    name = stem if stem not in taken else f"{stem}_{index}"
    taken.add(name)
    return name


@dataclass
class Session:
    model: nn.Module
    tokenizer: Any
    task: str
    adapters: list[str]
    defaults: AdapterDefaults
    label_names: list[str]


def open_session(adapter_dirs: Sequence[str | Path], *, model: str | None = None, task: str | None = None,
                 label_names: Sequence[str] = (), seed: int = 0, device: str = "cpu",
                 allow_base_mismatch: bool = False) -> Session:
    """Load the base (from ``model`` or the first adapter's metadata) and every adapter, none active."""
    defaults = adapter_defaults(adapter_dirs[0]) if adapter_dirs else AdapterDefaults()
    task = task or defaults.task or "causal-lm"
    labels = list(label_names) or defaults.label_names
    base = model_argument(model if model is not None else defaults.model)
    net, tokenizer = load_for_task(task, base, num_labels=len(labels), label_names=labels, seed=seed, device=device)
    names: list[str] = []
    taken: set[str] = set()
    for i, directory in enumerate(adapter_dirs):
        name = adapter_name_for(directory, i, taken)
        peft_io.load(net, directory, name, activate=False, allow_base_mismatch=allow_base_mismatch)
        names.append(name)
    if names:
        api.deactivate(net)
    return Session(net, tokenizer, task, names, defaults, labels)
