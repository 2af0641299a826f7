"""A shared check for the CPU kernels that split work over torch's OpenMP threads."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def assert_same_bits_for_any_thread_count(update: Callable[[torch.Tensor, torch.Tensor, float], bool],
                                          x: torch.Tensor, y0: torch.Tensor) -> None:
    """``update(y, x, factor)`` (y += factor · its LoRA update of x, in place) gives the same bits on 1, 2 and 3
    threads, with and without flush-to-zero, and torch's threads keep their own flush setting afterwards.

    Flushed pass: normal x, scale and outputs (x·1e-10, factor 1e-30, y·1e-37) but denormal rank-space values
    (~1e-39) and updates, which only FTZ/DAZ drop: a worker running without the caller's MXCSR gives other bits."""
    before = torch.get_num_threads()
    try:
        for flush, factor, tiny_x, tiny_y in ((False, 1.0, 1.0, 1.0), (True, 1e-30, 1e-10, 1e-37)):
            if flush and not torch.set_flush_denormal(True):
                pytest.skip("this CPU cannot flush denormals")
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                y = y0 * tiny_y
                assert update(y, x * tiny_x, factor)
                outs.append(y.numpy().tobytes())
            assert outs[0] == outs[1] == outs[2]
            torch.set_flush_denormal(False)
        torch.set_num_threads(2)
        tiny = torch.full((1 << 20,), 1e-40)  # a parallel torch op: no worker may have kept the flush setting
        assert int(((tiny * 1.0) == 0).sum()) == 0
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
