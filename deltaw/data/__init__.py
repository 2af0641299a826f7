"""Datasets for deltaw: the embedded BBC News corpus and users' local files.

These modules use only the standard library (no torch, no Hugging Face ``datasets``): data is loaded,
inspected and split before any model is touched. See :mod:`deltaw.data.bbc` and
:mod:`deltaw.data.local` for the formats and the guarantees (deterministic splits, error messages).
"""

from deltaw.data.bbc import BBC_SPLITS, BBC_TOPICS, bbc_data_dir, load_bbc
from deltaw.data.datasets import DatasetError, PromptResponseDataset, TextDataset
from deltaw.data.local import load_local

__all__ = [
    "BBC_SPLITS",
    "BBC_TOPICS",
    "DatasetError",
    "PromptResponseDataset",
    "TextDataset",
    "bbc_data_dir",
    "load_bbc",
    "load_local",
]
