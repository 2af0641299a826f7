"""Datasets for deltaw: the embedded BBC News corpus and users' local files.

Everything here is plain Python (no torch, no Hugging Face ``datasets``) so that data can be loaded,
inspected and split before any model is touched. See :mod:`deltaw.data.bbc` and
:mod:`deltaw.data.local` for the formats and the guarantees (deterministic splits, error messages).
"""

from deltaw.data.bbc import BBC_SPLITS, BBC_TOPICS, bbc_data_dir, load_bbc
from deltaw.data.datasets import PromptResponseDataset, TextDataset
from deltaw.data.local import load_local

__all__ = [
    "BBC_SPLITS",
    "BBC_TOPICS",
    "PromptResponseDataset",
    "TextDataset",
    "bbc_data_dir",
    "load_bbc",
    "load_local",
]
