"""Audit tests run single-threaded: on a small shared CPU, OpenMP threads of concurrent processes spin-wait
on each other and a 2-thread forward can be several times slower than a 1-thread one."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
