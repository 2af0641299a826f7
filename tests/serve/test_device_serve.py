"""The server with its model on the device of ``DELTAW_TEST_DEVICE`` (conftest.py; default cpu): concurrent
requests over several adapters, streamed or not, each equal to greedy generation with its own adapter on the
same device. test_generation.py covers the protocol in depth on CPU; this is the contract
benchmarks/device_check runs on CUDA (the engine moves ids to the model's device and samples on the host)."""

from __future__ import annotations

import pytest

import deltaw
from serve_helpers import ADAPTERS, Offline, make_llama, mixed_requests, start_server, wrong_answers

pytestmark = pytest.mark.device


def test_mixed_adapters_on_the_device_equal_offline(device, adapters_dir, tokenizer):
    reference = Offline(adapters_dir, tokenizer, device)
    assert len({reference.text("w1 w2 w3", a, 8) for a in (None, *ADAPTERS)}) == 5, "adapters must matter"
    server, thread, url = start_server(adapters_dir, tokenizer, model=make_llama().to(device), max_batch_size=8,
                                       max_tokens_limit=64)
    try:
        assert wrong_answers(url, mixed_requests(7, 24, (4, 16)), reference) == []
        loaded = list(deltaw.adapter_parameters(server.model))
        assert loaded and all(p.device.type == device.type for p in loaded)  # adapters loaded onto the device
    finally:
        thread.stop()
