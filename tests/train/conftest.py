"""Fixtures for training tests: tiny models, toy data files, one CPU thread.

One thread because the models are tiny (threads only add synchronisation) and because, on a loaded 2-core
machine, OpenMP's spin-waiting makes two threads up to 100x slower than one.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import tiny_models  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def text_file(tmp_path):
    return tiny_models.write_text_jsonl(tmp_path / "texts.jsonl", 40)


@pytest.fixture
def prompt_file(tmp_path):
    return tiny_models.write_prompt_jsonl(tmp_path / "pairs.jsonl", 30)


@pytest.fixture
def labeled_file(tmp_path):
    return tiny_models.write_labeled_jsonl(tmp_path / "labeled.jsonl", 40)
