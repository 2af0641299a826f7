"""Fixtures for the server tests; the helpers they use live in serve_helpers.py."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serve_helpers import ADAPTERS, TARGETS, Offline, make_llama, make_tokenizer, save_adapters, start_server


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    save_adapters(make_llama(), root, ADAPTERS, TARGETS)
    return root


@pytest.fixture(scope="session")
def offline(adapters_dir, tokenizer) -> Offline:
    return Offline(adapters_dir, tokenizer)


@pytest.fixture(scope="module")
def served(adapters_dir, tokenizer) -> Iterator[tuple]:
    """The shared server: every adapter loadable, a generous budget, batches of up to 8."""
    server, thread, url = start_server(adapters_dir, tokenizer, max_batch_size=8, max_tokens_limit=64)
    yield server, url
    thread.stop()


@pytest.fixture
def private_root(tmp_path, adapters_dir) -> Path:
    """A fresh adapters dir (copies of the shared adapters) a test may add broken or hostile entries to."""
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ADAPTERS:
        shutil.copytree(adapters_dir / name, root / name)
    return root


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: one intra-op thread avoids OpenMP barrier stalls (10x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_http_logs():
    logging.getLogger("httpx").setLevel(logging.WARNING)
    yield
